"""Precision and recall of `index-builder audit` on Flickr8k with planted corruptions, and the
near-duplicate angle distribution its default comes from.

    python bench/bench_audit.py                     # the 1,000 test images and their 5,000 captions

A copy of the split (under bench/.cache/audit/, reused by reruns) gets, with a fixed seed
(`tests/corruptions.py`): 1% of images duplicated (half re-encoded at JPEG quality 30, half 80%
crops; the copies have no captions, like a re-upload) and 2% of captions moved to a random other
image. It is built with `index-builder build --images --captions` and audited with the defaults.
A planted duplicate is found when the original and its copy are in one flagged group; a moved
caption when it is flagged on the image it was moved to. Flags that were not planted count against
precision even where Flickr8k itself holds near-identical shots (the report lists them to look at).
The angle sweep shows, for each threshold, the planted pairs within it and the distinct photos
(not planted) whose nearest other image is within it.
Results: bench/results/audit.json (with the command) and audit.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

from index_builder.audit import AuditConfig, audit, caption_scores, image_neighbours, read_vectors  # noqa: E402
from index_builder.cli import main as index_builder  # noqa: E402
from retrieval.sphere import angle_deg  # noqa: E402
from retrieval.store.reader import IndexVersion  # noqa: E402
from tests.conftest import make_mini_dataset  # noqa: E402
from tests.corruptions import plant  # noqa: E402

ANGLES = (5, 10, 15, 18, 20, 22, 24, 26, 28, 30, 35)
CAPTION_Z = (1.0, 1.5, 2.0, 2.5, 3.0)


def prepare(cache: Path, split: str, n: int, seed: int) -> dict:
    data = cache / "data"
    if not (cache / "truth.json").is_file():
        make_mini_dataset(data, {split: n})
        n_captions = sum(1 for _ in (data / "captions.csv").open()) - 1
        dups = max(2, round(0.01 * n))
        truth = plant(
            data, split, reencoded=dups // 2, cropped=dups - dups // 2, moved=round(0.02 * n_captions), seed=seed
        )
        (cache / "truth.json").write_text(json.dumps(truth, indent=1))
    if not (cache / "index" / "CURRENT").is_file():
        assert (
            index_builder(
                [
                    "-q",
                    "build",
                    "--out",
                    str(cache / "index"),
                    "--images",
                    str(data / "images"),
                    "--captions",
                    str(data / "captions.csv"),
                    "--no-progress",
                ]
            )
            == 0
        )
    return json.loads((cache / "truth.json").read_text())


def pr(flagged: set, planted: set) -> dict:
    hit = len(flagged & planted)
    return {
        "flagged": len(flagged),
        "planted": len(planted),
        "found": hit,
        "precision": round(hit / len(flagged), 3) if flagged else None,
        "recall": round(hit / len(planted), 3) if planted else None,
    }


def angle_sweep(version: IndexVersion, truth: dict) -> dict:
    ids, images = read_vectors(version, "image")
    uris = [r["uri"] for r in version.metadata("image", ids.tolist())]
    row = {u: i for i, u in enumerate(uris)}
    planted = {(row[a], row[b]): kind for a, b, kind in truth["duplicates"]}
    pair_angle = {p: float(angle_deg(images[p[0]] @ images[p[1]])) for p in planted}
    cos, rows = image_neighbours(images, 2)
    in_pair = {r for p in planted for r in p}
    nearest = np.asarray([angle_deg(cos[r, 0]) for r in range(len(uris)) if r not in in_pair])
    by_kind = {k: sorted(round(a, 2) for p, a in pair_angle.items() if planted[p] == k) for k in ("reencode", "crop")}
    sweep = [
        {
            "angle_deg": t,
            "planted_pairs_within": sum(a <= t for a in pair_angle.values()),
            "distinct_photos_with_a_neighbour_within": int((nearest <= t).sum()),
        }
        for t in ANGLES
    ]
    return {
        "planted_pair_angles_deg": by_kind,
        "distinct_photos": len(nearest),
        "distinct_nearest_angle_percentiles_deg": {
            str(q): round(float(np.percentile(nearest, q)), 2) for q in (0.1, 0.5, 1, 5, 25, 50)
        },
        "sweep": sweep,
    }


def caption_sweep(version: IndexVersion, truth: dict, k: int) -> list[dict]:
    img_ids, images = read_vectors(version, "image")
    txt_ids, captions = read_vectors(version, "text")
    uri = {int(i): r["uri"] for i, r in zip(img_ids, version.metadata("image", img_ids.tolist()))}
    meta = version.metadata("text", txt_ids.tolist())
    row_of = {int(i): r for r, i in enumerate(img_ids)}
    s = caption_scores(images, captions, np.asarray([row_of[int(m["image_id"])] for m in meta]))
    moved = {(m["caption"], m["to"]) for m in truth["moved"]}
    key = [(m["caption"], uri[int(m["image_id"])]) for m in meta]
    return [
        {"caption_z": z, **pr({key[j] for j in np.flatnonzero((s.z < -z) & (s.rank > k))}, moved)} for z in CAPTION_Z
    ]


def markdown(res: dict) -> str:
    a, d, c = res["audit"], res["duplicates"], res["captions"]
    lines = [
        "# Collection audit on Flickr8k with planted corruptions",
        "",
        f"`{res['command']}`",
        "",
        f"{res['collection']['images']} images ({res['collection']['planted_duplicates']} planted near-duplicate "
        f"copies: re-encoded at JPEG quality 30 or 80% crops) and {res['collection']['captions']} captions "
        f"({res['collection']['moved_captions']} moved to a random other image), seed {res['seed']}; "
        f"audited with the defaults in {a['seconds']} s. The defaults (20 degrees, caption z 3) were read off "
        f"the sweeps below on the test split; the same run on the dev split checks them (`audit_dev.md`).",
        "",
        "| flag | flagged | planted | found | precision | recall |",
        "| --- | --- | --- | --- | --- | --- |",
        f"| near-duplicate pairs (within {a['near_duplicate_angle']} deg) | {d['flagged']} | {d['planted']} | "
        f"{d['found']} | {d['precision']} | {d['recall']} |",
        f"| captions that do not fit their image | {c['flagged']} | {c['planted']} | {c['found']} | {c['precision']} | "
        f"{c['recall']} |",
        f"| outlier images (no ground truth) | {a['outlier_images']} | - | - | - | - |",
        "",
        "## The near-duplicate angle",
        "",
        f"Planted pairs (degrees apart): re-encodes {res['angles']['planted_pair_angles_deg']['reencode']}, crops "
        f"{res['angles']['planted_pair_angles_deg']['crop']}. Nearest other image of the "
        f"{res['angles']['distinct_photos']} distinct photos, percentiles: "
        + ", ".join(f"{q}%: {v}" for q, v in res["angles"]["distinct_nearest_angle_percentiles_deg"].items())
        + ".",
        "",
        "| threshold (deg) | planted pairs within | distinct photos with a neighbour within |",
        "| --- | --- | --- |",
    ]
    lines += [
        f"| {s['angle_deg']} | {s['planted_pairs_within']} | {s['distinct_photos_with_a_neighbour_within']} |"
        for s in res["angles"]["sweep"]
    ]
    lines += [
        "",
        "## Caption threshold",
        "",
        "| caption_z | flagged | found | precision | recall |",
        "| --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {s['caption_z']} | {s['flagged']} | {s['found']} | {s['precision']} | {s['recall']} |"
        for s in res["caption_sweep"]
    ]
    lines += ["", "Unplanted near-duplicate groups (flagged, not planted; look at them):", ""]
    lines += [f"- {', '.join(g)}" for g in res["unplanted_groups"]] or ["- none"]
    lines += ["", "Geometry of the version (manifest `geometry`):", "", "```", json.dumps(res["geometry"]), "```"]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--split", default="test")
    p.add_argument("--images", type=int, default=1000, help="first N images of the split")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", type=Path, default=REPO / "bench" / ".cache" / "audit")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = p.parse_args(argv)
    args.cache.mkdir(parents=True, exist_ok=True)
    truth = prepare(args.cache, args.split, args.images, args.seed)
    version = IndexVersion.open(args.cache / "index")
    cfg = AuditConfig()
    start = time.perf_counter()
    report = audit(version, cfg)
    seconds = time.perf_counter() - start
    planted_pairs = {frozenset(d[:2]) for d in truth["duplicates"]}
    groups = [[i["uri"] for i in g["images"]] for g in report["near_duplicates"]]
    flagged_pairs = {frozenset((a, b)) for g in groups for i, a in enumerate(g) for b in g[i + 1 :]}
    flagged_captions = {(f["caption"], f["image"]["uri"]) for f in report["mismatched_captions"]}
    res = {
        "command": shlex.join(["python", "bench/bench_audit.py", *(argv if argv is not None else sys.argv[1:])]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seed": args.seed,
        "collection": {
            "images": report["counts"]["images"],
            "captions": report["counts"]["captions"],
            "planted_duplicates": len(truth["duplicates"]),
            "moved_captions": len(truth["moved"]),
        },
        "audit": {
            "seconds": round(seconds, 2),
            "near_duplicate_angle": cfg.near_duplicate_angle,
            "caption_z": cfg.caption_z,
            "outlier_z": cfg.outlier_z,
            "k": cfg.k,
            "outlier_images": report["counts"]["outlier_images"],
        },
        "duplicates": pr(flagged_pairs, planted_pairs),
        "captions": pr(flagged_captions, {(m["caption"], m["to"]) for m in truth["moved"]}),
        "angles": angle_sweep(version, truth),
        "caption_sweep": caption_sweep(version, truth, cfg.k),
        "unplanted_groups": [g for g in groups if not any(frozenset(p) <= set(g) for p in map(tuple, planted_pairs))],
        "geometry": version.manifest.raw.get("geometry"),
    }
    version.close()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "audit.json").write_text(json.dumps(res, indent=2) + "\n")
    (args.out / "audit.md").write_text(markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
