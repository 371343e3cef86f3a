"""What the sphere as a query language buys, measured on Flickr8k test (1,000 images, 5,000 captions)
with the shipped model (lite0-minilm). Sections (each its own function; run one with --section):

  multi      text -> image R@1/5/10 for the Karcher mean of 2, 3 and 5 of an image's captions against
             one caption alone and against their normalized linear sum; ranked as served (cosine plus
             the inverted softmax's bias of each image).
  negatives  pairs (a positive word, a word that often shares its captions) from the captions: the
             query "a <pos>" alone, and with "<neg>" as a negative term (weight -1), geodesic and
             linear; the share of the top 10 images whose captions mention each word.
  walk       a live gRPC server over an index of the test split: Walks between caption pairs, the
             spread (max - min) of the angles between consecutive steps and the median time per
             streamed step.

    python bench/bench_queries.py                    # every section
    python bench/bench_queries.py --section walk

Vectors come from bench/.cache/flickr8k-lite0-minilm.npz (every Flickr8k image and caption encoded
by the model; made here when missing) and the walk's index from bench/.cache/queries-index (built
with index-builder when missing). Writes bench/results/queries.json (with the command; sections
merge, so one section reruns alone) and queries.md.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
CACHE = ROOT / "bench" / ".cache"
RESULTS = ROOT / "bench" / "results"
DATA = ROOT.parent / "shared" / "datasets" / "flickr8k"
MODEL = "lite0-minilm"
STOP = set(
    "a an the of in on at and with is are to his her their its while for by from into two three four "
    "other one some as it up down near next front who through over out this that there".split()
)


def test_split():
    """Test images (1,000), their captions (5 each), the caption -> image map, the image biases."""
    from retrieval.embedding.querybank import bias_from_bank
    from retrieval.encoding.datasets import load_caption_dataset

    path = CACHE / f"flickr8k-{MODEL}.npz"
    if not path.is_file():
        sys.path.insert(0, str(ROOT / "bench"))
        raise SystemExit(f"{path} is missing: make it with bench/scale_data.py's real_vectors (encodes Flickr8k)")
    z = np.load(path)
    ds = load_caption_dataset(DATA, None)
    test = np.flatnonzero(z["image_split"] == "test")
    position = {int(i): n for n, i in enumerate(test)}
    caps = np.flatnonzero(np.isin(ds.caption_image, test))
    owner = np.array([position[int(ds.caption_image[c])] for c in caps])
    images = z["image"][test]
    bias = bias_from_bank(images, z["text_bank"], float(z["beta"]))
    return images, bias, z["text"][caps], owner, [ds.captions[c] for c in caps]


def rank(images: np.ndarray, bias: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Image positions by cos + bias (text -> image, as served), best first."""
    return np.argsort(-(queries @ images.T + bias[None]), axis=1, kind="stable")


def recall(order: np.ndarray, truth: np.ndarray, k: int) -> float:
    return float(np.mean(np.any(order[:, :k] == truth[:, None], axis=1)) * 100)


def section_multi() -> dict:
    from retrieval.sphere.compose import compose_linear, karcher_mean

    images, bias, texts, owner, _ = test_split()
    by_image = [np.flatnonzero(owner == i) for i in range(len(images))]
    out = {}
    for m in (1, 2, 3, 5):
        geo = np.stack([karcher_mean(texts[c[:m]]) for c in by_image])
        lin = np.stack([compose_linear(texts[c[:m]], np.ones(m)) for c in by_image])
        truth = np.arange(len(images))
        out[str(m)] = {
            name: {f"R@{k}": round(recall(rank(images, bias, q), truth, k), 2) for k in (1, 5, 10)}
            for name, q in (("geodesic", geo), ("linear", lin))
        }
    single = rank(images, bias, texts)  # every caption alone (5,000 queries): the served number
    out["every_caption_alone"] = {f"R@{k}": round(recall(single, owner, k), 2) for k in (1, 5, 10)}
    return {
        "images": len(images),
        "captions": len(texts),
        "by_captions": out,
        "note": "m captions = the image's first m captions; 1 = its first caption alone",
    }


SUBJECTS = ("dog", "man", "woman", "boy", "girl", "child", "people", "dogs", "person", "children", "player", "biker")
NOT_SCENE = set("white black red blue brown green yellow young little small large big wearing shirt".split())


def word_pairs(captions: list[str], owner: np.ndarray, count: int = 10) -> list[tuple[str, str]]:
    """(positive, negative): subject words by frequency in the captions, each with the scene word (not a colour,
    size or verb) that appears most often in its images' captions."""
    words = [set(re.findall(r"[a-z]+", c.lower())) - STOP for c in captions]
    per_image: dict[int, set] = {}
    for w, o in zip(words, owner):
        per_image.setdefault(int(o), set()).update(w)
    freq = Counter(w for ws in per_image.values() for w in ws)
    pairs = []
    for pos in sorted((w for w in SUBJECTS if w in freq), key=lambda w: -freq[w]):
        if len(pairs) == count:
            break
        co = Counter(w for ws in per_image.values() if pos in ws for w in ws if w != pos)
        neg = next(
            (
                w
                for w, _ in co.most_common()
                if len(w) > 3
                and w not in NOT_SCENE
                and w not in SUBJECTS
                and not w.endswith("ing")
                and w not in {p[1] for p in pairs}
            ),
            None,
        )
        if neg:
            pairs.append((pos, neg))
    return pairs


def section_negatives() -> dict:
    from retrieval.embedding.factory import create_model
    from retrieval.encoding.bulk import encode_texts
    from retrieval.sphere.compose import compose_geodesic, compose_linear

    images, bias, _, owner, captions = test_split()
    mentions: dict[int, str] = {}
    for c, o in zip(captions, owner):
        mentions[int(o)] = mentions.get(int(o), "") + " " + c.lower()
    pairs = word_pairs(captions, owner)
    model, _, tokenizer = create_model(MODEL)
    vec = dict(
        zip(
            [w for p in pairs for w in (f"a {p[0]}", p[1])],
            encode_texts(model, tokenizer, [w for p in pairs for w in (f"a {p[0]}", p[1])]),
        )
    )
    rows, share = (
        [],
        lambda top, word: float(np.mean([re.search(rf"\b{word}", mentions[int(i)]) is not None for i in top])),
    )
    for pos, neg in pairs:
        x, w = np.stack([vec[f"a {pos}"], vec[neg]]), np.array([1.0, -1.0])
        row = {"positive": pos, "negative": neg}
        queries = (("alone", vec[f"a {pos}"]), ("geodesic", compose_geodesic(x, w)), ("linear", compose_linear(x, w)))
        for name, q in queries:
            top = rank(images, bias, q[None])[0, :10]
            row[name] = {"pos": share(top, pos), "neg": share(top, neg)}
        rows.append(row)
    mean = {
        name: {s: round(float(np.mean([r[name][s] for r in rows])), 3) for s in ("pos", "neg")}
        for name in ("alone", "geodesic", "linear")
    }
    return {
        "pairs": rows,
        "mean": mean,
        "negative_weight": -1.0,
        "note": "share of the top 10 images with a caption mentioning the word (prefix match)",
    }


def section_walk(walks: int = 20, steps: int = 10, k: int = 10) -> dict:
    from index_builder.cli import main as build
    from retrieval.client import RetrievalClient
    from retrieval.serving.server import ServeConfig, ServerThread

    root = CACHE / "queries-index"
    if not (root / "CURRENT").is_file():
        assert (
            build(
                [
                    "-q",
                    "build",
                    "--out",
                    str(root),
                    "--dataset",
                    str(DATA),
                    "--split",
                    "test",
                    "--model",
                    MODEL,
                    "--workers",
                    "0",
                    "--no-progress",
                ]
            )
            == 0
        )
    _, _, _, _, captions = test_split()
    rng = np.random.default_rng(0)
    spreads, per_step = [], []
    with (
        ServerThread(ServeConfig(index=str(root), port=0, metrics_port=-1)) as srv,
        RetrievalClient(srv.address, timeout=60) as client,
    ):
        list(client.walk(captions[0], captions[1], steps=2, k=1))  # warm
        for a, b in rng.choice(len(captions), size=(walks, 2), replace=False):
            times, angles = [time.perf_counter()], []
            for step in client.walk(captions[a], captions[b], steps=steps, k=k):
                times.append(time.perf_counter())
                angles.append(step.angle_deg)
            spreads.append(float(np.ptp(np.diff(angles))))
            per_step.extend(np.diff(times).tolist())
    return {
        "walks": walks,
        "steps": steps,
        "k": k,
        "max_consecutive_angle_spread_deg": max(spreads),
        "median_ms_per_step": round(float(np.median(per_step)) * 1000, 2),
        "p90_ms_per_step": round(float(np.percentile(per_step, 90)) * 1000, 2),
        "note": "angles as the server reports them (float32 on the wire); time from the call (step 0 "
        "includes encoding both ends) or the previous step to each step's arrival",
    }


SECTIONS = {"multi": section_multi, "negatives": section_negatives, "walk": section_walk}


def markdown(results: dict) -> str:
    lines = [
        "# Queries on the sphere",
        "",
        "Made by `python bench/bench_queries.py` (each section's command is in queries.json).",
        "",
    ]
    if "multi" in results:
        m = results["multi"]
        lines += [
            "## Multi-caption queries: text -> image on Flickr8k test",
            "",
            f"{m['images']} images; ranked by cosine + the inverted softmax's bias, as served. Every caption "
            f"alone ({m['captions']} queries): R@1 {m['by_captions']['every_caption_alone']['R@1']}.",
            "",
            "| captions | geodesic R@1 | linear R@1 | geodesic R@5 | linear R@5 | geodesic R@10 | linear R@10 |",
            "|---|---|---|---|---|---|---|",
        ]
        for n in ("1", "2", "3", "5"):
            g, li = m["by_captions"][n]["geodesic"], m["by_captions"][n]["linear"]
            lines.append(f"| {n} | {g['R@1']} | {li['R@1']} | {g['R@5']} | {li['R@5']} | {g['R@10']} | {li['R@10']} |")
        lines.append("")
    if "negatives" in results:
        n = results["negatives"]
        lines += [
            "## Negative terms: \"a <pos>\" minus \"<neg>\" (weight -1)",
            "",
            n["note"] + ".",
            "",
            "| query | pos share | neg share |",
            "|---|---|---|",
        ]
        for name in ("alone", "geodesic", "linear"):
            lines.append(
                f"| {name} (mean of {len(n['pairs'])} pairs) | {n['mean'][name]['pos']} | {n['mean'][name]['neg']} |"
            )
        lines += ["", "| pair | alone pos/neg | geodesic pos/neg | linear pos/neg |", "|---|---|---|---|"]
        for r in n["pairs"]:
            cells = " | ".join(f"{r[x]['pos']:.1f} / {r[x]['neg']:.1f}" for x in ("alone", "geodesic", "linear"))
            lines.append(f"| {r['positive']} - {r['negative']} | {cells} |")
        lines.append("")
    if "walk" in results:
        w = results["walk"]
        lines += [
            "## Walk over gRPC",
            "",
            f"{w['walks']} walks between test captions, {w['steps']} steps of k="
            f"{w['k']} (images): largest spread of consecutive step angles "
            f"{w['max_consecutive_angle_spread_deg']:.2e} degrees; per streamed step median "
            f"{w['median_ms_per_step']} ms (p90 {w['p90_ms_per_step']} ms).",
            "",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--section", choices=sorted(SECTIONS), action="append", help="run only these (repeatable)")
    args = p.parse_args(argv)
    path = RESULTS / "queries.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    for name in args.section or SECTIONS:
        results[name] = {"command": f"python bench/bench_queries.py --section {name}", **SECTIONS[name]()}
        print(name, json.dumps(results[name])[:400], flush=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / "queries.md").write_text(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
