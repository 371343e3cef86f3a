"""What each training lever buys on Flickr8k: a ladder of variants trained on the same cached
tower features, each selected on dev and scored on the 1K test split.

    python bench/bench_levers.py --data ../shared/datasets/flickr8k

Writes bench/results/levers.json (with the command) and bench/results/levers.md. Every
variant is scored through the model's own projection (`project_image/project_text`): what the
index builder and the server compute for live queries.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

import torch

from retrieval.evaluate import recall_at_k
from retrieval.factory import build_sphere_model, get_model_config
from retrieval.train import SplitFeatures, TrainConfig, split_features, train

RESULTS = Path(__file__).parent / "results"
# Image feature layout of the default taps [5, 6, "head"]: 192 + 320 + 1280 columns.
HEAD_TAP_COLUMNS = slice(192 + 320, None)


def variants(views: int) -> list[tuple[str, str, dict, dict]]:
    """(name, what changes, model-config overrides, train-config overrides): a cumulative ladder.
    Each rung pins its settings, so a rung's numbers do not move when the defaults change."""
    mlp = {"head": {"hidden": 1024, "dropout": 0.2}}
    early = {"weight_decay": 0.05, "epochs": 40}
    return [
        ("linear", "linear heads on the 1280-d head features, center crop only",
         {"image_tower": {"taps": ["head"]}, "head": {"hidden": 0, "dropout": 0.0}}, {"views": 1, "center": False, **early}),
        ("+stages", "image features: stages 5 and 6 pooled and concatenated with the head",
         {"head": {"hidden": 0, "dropout": 0.0}}, {"views": 1, "center": False, **early}),
        ("+mlp+dropout", "residual MLP branch (1024) and input dropout 0.2", mlp, {"views": 1, "center": False, **early}),
        (f"+{views}views", f"{views} cached views per training image (center + random crops)", mlp,
         {"views": views, "center": False, **early}),
        ("+centering", "subtract each modality's training mean before normalizing", mlp, {"views": views, "center": True, **early}),
        ("siglip", "+centering with SigLIP's sigmoid loss instead of InfoNCE", mlp,
         {"views": views, "center": True, "loss": "siglip", **early}),
        ("hidden512", "+centering with a 512-wide MLP branch (half the shipped size)", {"head": {"hidden": 512, "dropout": 0.2}},
         {"views": views, "center": True, **early}),
        ("+regularization", "+centering with dropout 0.5, weight decay 0.5, 60 epochs: the shipped default (best dev)",
         {"head": {"hidden": 1024, "dropout": 0.5}}, {"views": views, "center": True, "weight_decay": 0.5, "epochs": 60}),
        ("reg-wd0.2", "+regularization with weight decay 0.2 (lower dev)", {"head": {"hidden": 1024, "dropout": 0.5}},
         {"views": views, "center": True, "weight_decay": 0.2, "epochs": 60}),
        ("reg-wd1.0", "+regularization with weight decay 1.0 (lower dev)", {"head": {"hidden": 1024, "dropout": 0.5}},
         {"views": views, "center": True, "weight_decay": 1.0, "epochs": 60}),
    ]


def merged(config: dict, overrides: dict) -> dict:
    out = copy.deepcopy(config)
    for key, value in overrides.items():
        out[key] = {**out.get(key, {}), **value} if isinstance(value, dict) else value
    return out


def sliced(f: SplitFeatures, taps_head_only: bool) -> SplitFeatures:
    return SplitFeatures(f.dataset, f.image[..., HEAD_TAP_COLUMNS] if taps_head_only else f.image, f.text)


@torch.no_grad()
def test_recall(model, test: SplitFeatures) -> dict:
    model.eval()
    return recall_at_k(model.project_image(test.image[0]).numpy(), model.project_text(test.text).numpy(),
                       test.dataset.caption_image)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="../shared/datasets/flickr8k")
    p.add_argument("--views", type=int, default=TrainConfig.views)
    p.add_argument("--only", nargs="*", default=None, help="run only these variants")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    base_config = get_model_config("lite0-minilm")
    full = build_sphere_model("lite0-minilm", base_config)
    cfg0 = TrainConfig(data=args.data, views=args.views, out="runs/bench-levers")
    t0 = time.time()
    train_f, dev_f, test_f = (split_features(full, "train", cfg0, args.views), split_features(full, "dev", cfg0, 1),
                              split_features(full, "test", cfg0, 1))
    feature_seconds = time.time() - t0
    rows = []
    for name, what, model_over, train_over in variants(args.views):
        if args.only and name not in args.only:
            continue
        config = merged(base_config, model_over)
        head_only = config["image_tower"]["taps"] == ["head"]
        model = build_sphere_model("lite0-minilm", config)
        cfg = dataclasses.replace(cfg0, out=f"runs/bench-levers/{name}", **train_over)
        feats = tuple(sliced(f, head_only) for f in (train_f, dev_f))
        if cfg.views < args.views:
            feats = (SplitFeatures(feats[0].dataset, feats[0].image[: cfg.views], feats[0].text), feats[1])
        started = time.time()
        summary = train(cfg, model, features=feats)
        row = {"variant": name, "what": what, "train_seconds": round(time.time() - started, 1),
               "dev_R@1_mean": round(summary["best_dev_R@1_mean"], 2), "checkpoint": summary["checkpoint"],
               "test": {k: round(v, 2) for k, v in test_recall(model, sliced(test_f, head_only)).items()},
               "model_config": config, "train_config": dataclasses.asdict(cfg)}
        rows.append(row)
        print(f"{name:14s} test t2i R@1 {row['test']['t2i_R@1']:5.1f}  i2t R@1 {row['test']['i2t_R@1']:5.1f}  "
              f"({row['train_seconds']:.0f}s)", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"command": "python bench/bench_levers.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()},
              "feature_seconds_cached_or_computed": round(feature_seconds, 1), "variants": rows}
    previous = out / "levers.json"
    if args.only and previous.is_file():  # keep the other rungs' rows from the last full run
        fresh = {r["variant"] for r in rows}
        kept = [r for r in json.loads(previous.read_text())["variants"] if r["variant"] not in fresh]
        order = [v[0] for v in variants(args.views)]
        rows = sorted(kept + rows, key=lambda r: order.index(r["variant"]) if r["variant"] in order else len(order))
        result["variants"] = rows
        result["command"] += "  (other rows: an earlier full run)"
    previous.write_text(json.dumps(result, indent=2))
    lines = ["# Training levers on Flickr8k (1K test, R@1 %)", "", f"`{result['command']}`; selected on dev, scored on test.", "",
             "| variant | what changes | dev R@1 mean | t2i R@1 | i2t R@1 | t2i R@5 | i2t R@5 | mean R | train s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        t = r["test"]
        lines.append(f"| {r['variant']} | {r['what']} | {r['dev_R@1_mean']:.2f} | {t['t2i_R@1']:.1f} | {t['i2t_R@1']:.1f} | {t['t2i_R@5']:.1f} | "
                     f"{t['i2t_R@5']:.1f} | {t['mean_R']:.1f} | {r['train_seconds']:.0f} |")
    (out / "levers.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
