"""Calibrated match probabilities (issue 15), measured on Flickr8k's test split, which the
calibration never saw (it is fitted on dev):

- calibration: expected calibration error (ECE, 10 equal-width bins) of the top-1 result's
  match_probability, per direction, with a reliability plot (PNG);
- "no good match": each query's true match removed from the gallery for half the queries (seeded);
  AUROC of the top-1 probability for present vs absent, against the raw top-1 cosine; and the
  same for ~50 out-of-domain sentences (things Flickr8k does not show) against the test captions;
- the cost: p50 latency of in-process engine searches (text -> image, k=10, over an index of test
  images built by index-builder) with and without probabilities, alternating query by query.

    python bench/bench_confidence.py --data ../shared/datasets/flickr8k

Vectors come from bench/.cache/flickr8k-MODEL.npz when its query banks equal the model's (the same
heads), else they are encoded here (the test and dev splits) and cached.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from sklearn.metrics import roc_auc_score

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from retrieval.embedding.calibration import calibrations_of  # noqa: E402
from retrieval.embedding.factory import create_model  # noqa: E402
from retrieval.embedding.querybank import querybank_of  # noqa: E402
from retrieval.encoding.bulk import encode_image_files, encode_texts  # noqa: E402
from retrieval.encoding.datasets import load_caption_dataset  # noqa: E402
from retrieval.training.calibration import direction_data  # noqa: E402

CACHE = ROOT / "bench" / ".cache"
RESULTS = ROOT / "bench" / "results"
BINS = 10
OUT_OF_DOMAIN = [
    "a spreadsheet with quarterly revenue figures in green cells",
    "a spiral galaxy photographed by a space telescope",
    "a violin resting on a velvet case",
    "the source code of a python function",
    "a bar chart of inflation rates",
    "an x-ray of a broken wrist",
    "a plate of sushi with wasabi and ginger",
    "a nebula glowing red and blue",
    "a circuit board with capacitors and resistors",
    "a page of handwritten sheet music",
    "a microscope image of bacteria",
    "the periodic table of elements",
    "a stock market candlestick chart",
    "a tax form with boxes to fill in",
    "a 3d rendering of a protein molecule",
    "a satellite map of a desert highway",
    "a screenshot of an email inbox",
    "a cello and a piano on a concert stage",
    "a cup of espresso on a marble counter",
    "a vintage typewriter with a sheet of paper",
    "a diagram of the human heart",
    "a crossword puzzle half solved",
    "the moon's craters seen through a telescope",
    "a pie chart of market share",
    "a keyboard and a computer mouse",
    "a bowl of ramen with a boiled egg",
    "a chessboard in the middle of a game",
    "a solar panel array on a roof",
    "a wind turbine against a grey sky",
    "a jar of pickled cucumbers",
    "a museum painting of a royal portrait",
    "an electric guitar amplifier",
    "a pile of coins and banknotes",
    "a wedding cake with five tiers",
    "a thermometer showing a fever",
    "a loaf of sourdough bread on a cutting board",
    "an invoice with a company logo",
    "a saxophone player in a jazz club",
    "a weather map with isobars",
    "a hard drive opened to show its platters",
    "a stained glass window in a cathedral",
    "a calculator next to a notebook",
    "a tray of chocolate truffles",
    "a black hole simulation with an accretion disk",
    "a harp in an empty room",
    "a world map with time zones",
    "a pharmacy shelf of medicine bottles",
    "a subway map of tokyo",
    "a mathematical equation on a chalkboard",
    "a row of server racks in a data center",
]


def split_vectors(model, preprocess, tokenizer, data: str, model_name: str) -> dict:
    """{split: (image_vecs, text_vecs, caption_image)} for dev and test."""
    cache = CACHE / f"flickr8k-{model_name.replace('/', '_')}.npz"
    bank = querybank_of(model)
    out = {}
    if cache.is_file():
        with np.load(cache, allow_pickle=False) as z:
            if np.array_equal(z["text_bank"], bank.text) and np.array_equal(z["image_bank"], bank.image):
                for split in ("dev", "test"):
                    ds = load_caption_dataset(data, split)
                    out[split] = (
                        z["image"][z["image_split"] == split],
                        z["text"][z["text_split"] == split],
                        ds.caption_image,
                    )
                return out
    for split in ("dev", "test"):
        ds = load_caption_dataset(data, split)
        images, bad = encode_image_files(model, ds.image_paths(), preprocess, desc=f"{split} images")
        assert not bad, bad
        texts = encode_texts(model, tokenizer, ds.captions, desc=f"{split} captions")
        out[split] = (images, texts, ds.caption_image)
    CACHE.mkdir(parents=True, exist_ok=True)
    np.savez(
        cache,
        image=np.vstack([out[s][0] for s in out]),
        text=np.vstack([out[s][1] for s in out]),
        image_split=np.repeat(list(out), [len(out[s][0]) for s in out]),
        text_split=np.repeat(list(out), [len(out[s][1]) for s in out]),
        text_bank=bank.text,
        image_bank=bank.image,
    )
    return out


def reliability(p: np.ndarray, y: np.ndarray) -> tuple[float, list[dict]]:
    """ECE over BINS equal-width bins and the per-bin (count, mean probability, accuracy)."""
    bins = np.minimum((p * BINS).astype(int), BINS - 1)
    rows, ece = [], 0.0
    for b in range(BINS):
        m = bins == b
        if m.any():
            ece += m.mean() * abs(p[m].mean() - y[m].mean())
            rows.append(
                {
                    "bin": [b / BINS, (b + 1) / BINS],
                    "count": int(m.sum()),
                    "mean_probability": float(p[m].mean()),
                    "accuracy": float(y[m].mean()),
                }
            )
    return float(ece), rows


def top1(cal, queries, gallery, bias, top_k, removed=None):
    """Top-1 (probability, cosine) per query over the gallery, `removed[i]` ids hidden from query i."""
    cos_all = queries @ gallery.T
    if removed is not None:
        for i, ids in enumerate(removed):
            cos_all[i, ids] = -np.inf
    score = cos_all + bias[None, :]
    ids = np.argsort(-score, axis=1, kind="stable")[:, :top_k]
    cos = np.take_along_axis(cos_all, ids, 1)
    p = cal.match_probability(queries, cos, bias[ids])
    return p[:, 0], cos[:, 0]


def no_good_match(cals, bank, images, texts, caption_image, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    out = {}
    captions_of = [np.flatnonzero(caption_image == i) for i in range(len(images))]
    for direction in ("t2i", "i2t"):
        cal = cals[direction]
        queries, gallery, own = (
            (texts, images, [np.array([c]) for c in caption_image])
            if direction == "t2i"
            else (images, texts, captions_of)
        )
        bias = bank.bias(gallery, "image" if direction == "t2i" else "text")
        absent = rng.random(len(queries)) < 0.5
        removed = [own[i] if absent[i] else np.array([], np.int64) for i in range(len(queries))]
        p, cos = top1(cal, queries, gallery, bias, cal.top_k, removed)
        present = (~absent).astype(int)
        out[direction] = {
            "queries": len(queries),
            "absent": int(absent.sum()),
            "auroc_top1_probability": float(roc_auc_score(present, p)),
            "auroc_top1_cosine": float(roc_auc_score(present, cos)),
        }
    return out


def out_of_domain(model, tokenizer, cal, bank, images, texts) -> dict:
    ood = encode_texts(model, tokenizer, OUT_OF_DOMAIN, progress=False)
    bias = bank.bias(images, "image")
    p_in, cos_in = top1(cal, texts, images, bias, cal.top_k)
    p_out, cos_out = top1(cal, ood, images, bias, cal.top_k)
    label = np.r_[np.ones(len(p_in)), np.zeros(len(p_out))]
    return {
        "in_domain_queries": len(p_in),
        "out_of_domain_queries": len(p_out),
        "auroc_top1_probability": float(roc_auc_score(label, np.r_[p_in, p_out])),
        "auroc_top1_cosine": float(roc_auc_score(label, np.r_[cos_in, cos_out])),
        "median_top1_probability": {"in_domain": float(np.median(p_in)), "out_of_domain": float(np.median(p_out))},
        "no_confident_match_at_0.2": {
            "in_domain": float((p_in < 0.2).mean()),
            "out_of_domain": float((p_out < 0.2).mean()),
        },
    }


def plot(curves: dict[str, list[dict]], path: Path) -> None:
    """Reliability diagrams, one panel per direction: accuracy against mean probability per bin."""
    w, h, pad = 420, 420, 50
    img = Image.new("RGB", (w * len(curves), h + 30), "white")
    d = ImageDraw.Draw(img)
    for panel, (name, rows) in enumerate(curves.items()):
        x0 = panel * w + pad
        size = w - 2 * pad

        def xy(px: float, py: float, x0: float = x0, size: float = size) -> tuple[float, float]:
            return x0 + px * size, pad + (1 - py) * size

        d.rectangle([xy(0, 1), xy(1, 0)], outline="black")
        d.line([xy(0, 0), xy(1, 1)], fill=(160, 160, 160), width=1)
        for t in (0.0, 0.5, 1.0):
            d.text((xy(t, 0)[0] - 8, xy(t, 0)[1] + 4), f"{t:.1f}", fill="black")
            d.text((x0 - 28, xy(0, t)[1] - 6), f"{t:.1f}", fill="black")
        for r in rows:
            lo, hi = r["bin"]
            d.rectangle([xy(lo, r["accuracy"]), xy(hi, 0)], outline=(40, 90, 200), fill=(170, 195, 240))
        pts = [xy(r["mean_probability"], r["accuracy"]) for r in rows]
        d.line(pts, fill=(200, 40, 40), width=2)
        for px, py in pts:
            d.ellipse([px - 3, py - 3, px + 3, py + 3], fill=(200, 40, 40))
        d.text((x0, 15), f"{name}: fraction correct vs top-1 match_probability", fill="black")
        d.text((x0 + size / 2 - 60, h + 10), "match_probability (bin)", fill="black")
    img.save(path)


def latency(data: str, model_name: str, n_images: int, repeats: int) -> dict:
    """p50 of in-process text -> image searches (k=10) with and without probabilities, alternating."""
    from index_builder.cli import main as build
    from retrieval.serving.engine import Engine

    tmp = Path(tempfile.mkdtemp(prefix="bench-confidence-"))
    ds = load_caption_dataset(data, "test")
    mini = tmp / "data"
    (mini / "images").mkdir(parents=True)
    (mini / "splits").mkdir()
    names = ds.images[:n_images]
    for name in names:
        (mini / "images" / name).symlink_to(Path(data).resolve() / "images" / name)
    (mini / "splits" / "test.txt").write_text("\n".join(names) + "\n")
    rows = [(ds.images[i], c) for c, i in zip(ds.captions, ds.caption_image) if i < n_images]
    with (mini / "captions.csv").open("w", newline="") as f:
        csv.writer(f).writerows([("image", "caption"), *rows])
    assert (
        build(
            [
                "-q",
                "build",
                "--out",
                str(tmp / "index"),
                "--dataset",
                str(mini),
                "--split",
                "test",
                "--model",
                model_name,
                "--workers",
                "0",
                "--no-progress",
            ]
        )
        == 0
    )
    engine = Engine(tmp / "index")
    engine.load()
    encoder = engine.live().encoder
    calibrations = encoder.calibrations
    queries = [c for _, c in rows]
    times = {"with": [], "without": []}

    async def run() -> None:
        for r in range(repeats):
            for i, q in enumerate(queries):
                order = ("with", "without") if (i + r) % 2 == 0 else ("without", "with")
                for mode in order:
                    encoder.calibrations = calibrations if mode == "with" else {}
                    t = time.perf_counter()
                    hits, _ = await engine.search(q, "image", 10)
                    times[mode].append(time.perf_counter() - t)
                    assert (hits[0].match_probability is not None) == (mode == "with")

    asyncio.run(run())
    p50 = {m: statistics.median(v) * 1000 for m, v in times.items()}
    paired = [w / o for w, o in zip(times["with"], times["without"])]
    return {
        "gallery_images": n_images,
        "searches_each": len(times["with"]),
        "k": 10,
        "p50_ms_with": round(p50["with"], 3),
        "p50_ms_without": round(p50["without"], 3),
        "ratio": round(p50["with"] / p50["without"], 4),
        "median_paired_ratio": round(statistics.median(paired), 4),
        "probability_step_us": probability_step_us(calibrations["t2i"], encoder.dim),
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
    }


def probability_step_us(cal, dim: int, reps: int = 5000) -> float:
    """Median microseconds of what probabilities add to one search: the features and the
    calibrator over its top-10 candidates (timed alone, so the encoder's noise does not hide it)."""
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, dim)).astype(np.float32)
    q /= np.linalg.norm(q)
    cos, bias = np.sort(rng.uniform(0.2, 0.5, (1, 10)))[:, ::-1], rng.uniform(-0.05, 0.05, (1, 10))
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        cal.match_probability(q, cos, bias)
        out.append(time.perf_counter() - t)
    return round(statistics.median(out) * 1e6, 1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "datasets" / "flickr8k"))
    ap.add_argument("--model", default="lite0-minilm")
    ap.add_argument("--latency-images", type=int, default=100)
    ap.add_argument("--latency-repeats", type=int, default=1)
    args = ap.parse_args(argv)
    model, preprocess, tokenizer = create_model(args.model)
    cals = calibrations_of(model)
    assert cals, f"{args.model} carries no calibration"
    bank = querybank_of(model)
    vecs = split_vectors(model, preprocess, tokenizer, args.data, args.model)
    images, texts, caption_image = vecs["test"]
    result: dict = {
        "command": "python bench/bench_confidence.py " + shlex.join(argv or sys.argv[1:]),
        "model": args.model,
        "fingerprint": model.fingerprint(),
        "split": "test",
        "images": len(images),
        "captions": len(texts),
        "calibration": {},
    }
    curves = {}
    for direction in ("t2i", "i2t"):
        queries, cos, bias, labels, _ = direction_data(
            direction, images, texts, caption_image, bank, cals[direction].top_k
        )
        p = cals[direction].match_probability(queries, cos, bias)[:, 0]
        y = labels[:, 0].astype(float)
        ece, rows = reliability(p, y)
        curves[direction] = rows
        result["calibration"][direction] = {
            "queries": len(queries),
            "top1_accuracy": float(y.mean()),
            "mean_top1_probability": float(p.mean()),
            "ece": ece,
            "bins": rows,
        }
    RESULTS.mkdir(parents=True, exist_ok=True)
    plot(curves, RESULTS / "confidence_reliability.png")
    result["no_good_match"] = no_good_match(cals, bank, images, texts, caption_image)
    result["out_of_domain"] = out_of_domain(model, tokenizer, cals["t2i"], bank, images, texts)
    result["latency"] = latency(args.data, args.model, args.latency_images, args.latency_repeats)
    (RESULTS / "confidence.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "confidence.md").write_text(report(result))
    print(report(result))
    return 0


def report(r: dict) -> str:
    c, n, o, lat = r["calibration"], r["no_good_match"], r["out_of_domain"], r["latency"]
    lines = [
        "# Calibrated match probabilities",
        "",
        f"`{r['command']}` — model `{r['model']}` ({r['fingerprint']}), calibrated on Flickr8k dev, measured on "
        f"the test split ({r['images']} images, {r['captions']} captions), which the fit never saw.",
        "",
        "## Calibration of the top-1 result",
        "",
        "| direction | queries | top-1 correct | mean top-1 probability | ECE (10 bins) |",
        "| --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {d} | {v['queries']} | {v['top1_accuracy']:.3f} | {v['mean_top1_probability']:.3f} | **{v['ece']:.3f}** |"
        for d, v in c.items()
    ]
    lines += [
        "",
        "![reliability](confidence_reliability.png)",
        "",
        "## No good match: true match removed for half the queries (AUROC, present vs absent)",
        "",
        "| direction | queries | absent | top-1 probability | top-1 cosine (baseline) |",
        "| --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {d} | {v['queries']} | {v['absent']} | **{v['auroc_top1_probability']:.3f}** | "
        f"{v['auroc_top1_cosine']:.3f} |"
        for d, v in n.items()
    ]
    lines += [
        "",
        f"Out-of-domain text queries ({o['out_of_domain_queries']} sentences about spreadsheets, galaxies, "
        f"violins...) against the {o['in_domain_queries']} test captions, text -> image: AUROC "
        f"**{o['auroc_top1_probability']:.3f}** by the top-1 probability, {o['auroc_top1_cosine']:.3f} by the "
        f"top-1 cosine; median top-1 probability {o['median_top1_probability']['in_domain']:.3f} in domain, "
        f"{o['median_top1_probability']['out_of_domain']:.3f} out of domain; with `min_probability` 0.2, "
        f"{o['no_confident_match_at_0.2']['out_of_domain']:.0%} of the out-of-domain queries and "
        f"{o['no_confident_match_at_0.2']['in_domain']:.0%} of the in-domain ones get no_confident_match.",
        "",
        "## Cost",
        "",
        f"In-process engine searches (text -> image, k={lat['k']}, {lat['gallery_images']} indexed test images, "
        f"{lat['searches_each']} searches each, alternating): p50 **{lat['p50_ms_with']:.2f} ms** with "
        f"probabilities, {lat['p50_ms_without']:.2f} ms without: ratio **{lat['ratio']:.3f}** (median of the "
        f"paired ratios {lat['median_paired_ratio']:.3f}). The probability step alone (features and calibrator "
        f"over the top 10, timed apart from the encoder): **{lat['probability_step_us']:.0f} µs** a search. "
        f"Load average at the end: {lat['load_average_at_end']}.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
