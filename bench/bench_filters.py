"""Filtered search: exactness and latency at 1%, 10% and 100% selectivity, side by side in one run.

    python bench/bench_filters.py                  # Flickr8k test build + a 100k synthetic HNSW gallery
    python bench/bench_filters.py --synthetic 0    # the Flickr8k build only

`flickr8k`: a real index of the Flickr8k test split (1,000 images, Flat) built by `index-builder build
--dataset --split test --attributes FILE` (cached under bench/.cache/), whose attributes file gives
image i the number `bucket` = i % 100; a filter `bucket <= s - 1` keeps s% of the images. Queries are
test captions (their stored vectors, ranked cross-modally like text -> image searches).
`synthetic`: N clustered unit vectors in an HNSW32,Flat index (efSearch 64) with the same bucket
attribute in a meta.sqlite written by `retrieval.store.schema`.
Each selectivity times, per query, the SQL that resolves the filter to ids (uncached; the server
keeps the ids of its 16 latest filters per version, so pages and repeated filters skip it) and the
search within them (`retrieval.store.vectors.search_within`), and reports the medians next to the
unfiltered search; recall@10 is against an exact numpy ranking over
the matching items (1.0 means the same ten ids). On the HNSW gallery it also reports the IDSelector
search alone (`exact_below=0`), which is what the exact fallback under 5% selectivity is for.
Results: bench/results/filters.json and filters.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sqlite3
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import faiss  # noqa: E402
import numpy as np  # noqa: E402

from retrieval.store import attributes  # noqa: E402
from retrieval.store.attributes import Condition  # noqa: E402
from retrieval.store.reader import IndexVersion  # noqa: E402
from retrieval.store.schema import write_metadata  # noqa: E402
from retrieval.store.vectors import EXACT_BELOW, query_rows, search_within, with_bias  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "datasets" / "flickr8k"
CACHE = REPO / "bench" / ".cache"
SELECTIVITY = (1, 10, 100)  # percent
K = 10


def bucket_filter(percent: int) -> tuple[Condition, ...]:
    return (Condition("bucket", "range", (("number", 0.0), ("number", float(percent - 1)))),)


def exact_top(vectors: np.ndarray, ids: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    order = np.argsort(-(vectors @ rows.T).T, axis=1, kind="stable")[:, :k]
    return ids[order]


def measure(queries: np.ndarray, lookup: Callable[[np.ndarray], np.ndarray], truth: np.ndarray | None) -> dict:
    """Median ms per query of `lookup(row) -> ids`, and recall@10 against `truth` (per query rows of ids)."""
    times, recalls = [], []
    for i, row in enumerate(queries):
        start = time.perf_counter()
        found = lookup(row[None])
        times.append(time.perf_counter() - start)
        if truth is not None:
            want = set(truth[i].tolist())
            recalls.append(len(want & set(found[found >= 0].tolist())) / max(1, len(want)))
    out = {"median_ms": round(1000 * statistics.median(times), 3)}
    if truth is not None:
        out["recall_at_10"] = round(float(np.mean(recalls)), 4)
        out["min_recall_at_10"] = round(float(np.min(recalls)), 4)
    return out


def flickr8k_index(data: Path, model: str) -> Path:
    root = CACHE / f"filters-flickr8k-test-{model}"
    if (root / "CURRENT").is_file():
        return root
    from index_builder.cli import main

    names = sorted((data / "splits" / "test.txt").read_text().split())
    CACHE.mkdir(parents=True, exist_ok=True)
    attrs = CACHE / "filters-flickr8k-test-attributes.jsonl"
    attrs.write_text("".join(json.dumps({"image": n, "bucket": i % 100}) + "\n" for i, n in enumerate(names)))
    assert (
        main(
            [
                "-q",
                "build",
                "--out",
                str(root),
                "--dataset",
                str(data),
                "--split",
                "test",
                "--model",
                model,
                "--attributes",
                str(attrs),
                "--no-progress",
            ]
        )
        == 0
    )
    return root


def run_version(version: IndexVersion, queries: np.ndarray, label: str, variants: dict[str, float]) -> dict:
    """Per selectivity: the filtered lookup (SQL + search) under each exact_below variant, with recall."""
    index = version.indexes["image"]
    all_ids = version.matching("image", bucket_filter(100))
    vectors = index.reconstruct_batch(all_ids)
    rows = query_rows(queries, cross_modal=True)
    out = {
        "gallery": label,
        "items": int(index.ntotal),
        "queries": len(queries),
        "k": K,
        "unfiltered": measure(rows, lambda r: index.search(r, K)[1][0], exact_top(vectors, all_ids, rows, K)),
    }
    for percent in SELECTIVITY:
        cond = bucket_filter(percent)
        allowed = version.matching("image", cond)
        mask = np.isin(all_ids, allowed)
        truth = exact_top(vectors[mask], all_ids[mask], rows, K)
        entry = {
            "matching": len(allowed),
            "sql_median_ms": measure(rows[:50], lambda r, cond=cond: version._matching("image", cond), None)[
                "median_ms"
            ],
        }
        for name, below in variants.items():
            entry[name] = measure(
                rows,
                lambda r, below=below, allowed=allowed: search_within(index, r, K, allowed, exact_below=below)[1][0],
                truth,
            )
        out[f"{percent}%"] = entry
    return out


class SyntheticVersion:
    """What `run_version` needs of an index version: an HNSW index and the SQL of its attributes."""

    def __init__(self, n: int, dim: int, folder: Path, seed: int = 0):
        rng = np.random.default_rng(seed)
        centers = rng.standard_normal((max(1, n // 100), dim)).astype(np.float32)
        vecs = centers[rng.integers(0, len(centers), n)] + 0.6 * rng.standard_normal((n, dim)).astype(np.float32)
        vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
        self.ids = rng.choice(1 << 62, size=n, replace=False).astype(np.int64)  # like content-hash ids
        index = faiss.IndexIDMap2(faiss.index_factory(dim + 1, "HNSW32,Flat", faiss.METRIC_INNER_PRODUCT))
        index.add_with_ids(with_bias(vecs, np.zeros(n, np.float32)), self.ids)
        faiss.downcast_index(index.index).hnsw.efSearch = 64
        self.indexes = {"image": index}
        db_path = folder / f"synthetic-{n}.sqlite"
        db_path.unlink(missing_ok=True)
        write_metadata(
            db_path, [], [], (("image", i, "bucket", None, float(pos % 100)) for pos, i in enumerate(self.ids.tolist()))
        )
        self._db = sqlite3.connect(db_path, check_same_thread=False)
        self.queries = centers[rng.integers(0, len(centers), 200)] + 0.6 * rng.standard_normal((200, dim))
        self.queries = (self.queries / np.linalg.norm(self.queries, axis=1, keepdims=True)).astype(np.float32)

    def _matching(self, modality: str, conditions: tuple[Condition, ...]) -> np.ndarray:
        return attributes.matching_ids(self._db, modality, conditions, {"bucket": "number"})

    matching = _matching


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="caption-dataset folder (default: %(default)s)")
    p.add_argument("--model", default="lite0-minilm")
    p.add_argument("--queries", type=int, default=500, help="Flickr8k test captions used as queries")
    p.add_argument("--synthetic", type=int, default=100_000, help="synthetic HNSW gallery size (0: skip)")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    faiss.omp_set_num_threads(1)  # per-query latency on one thread, as the server's executor runs searches
    results = {
        "command": "python bench/bench_filters.py " + shlex.join(sys.argv[1:] if argv is None else argv),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "exact_below": EXACT_BELOW,
    }
    version = IndexVersion.open(flickr8k_index(args.data, args.model))
    texts = version.indexes["text"]
    text_ids = np.asarray([r[0] for r in version._db.execute("SELECT id FROM texts ORDER BY id")], np.int64)
    queries = texts.reconstruct_batch(text_ids[:: max(1, len(text_ids) // args.queries)][: args.queries])[:, :-1]
    results["flickr8k"] = run_version(
        version,
        queries,
        f"Flickr8k test, {version.name}, {version.manifest.raw['index_factory']['image']}",
        {"filtered": EXACT_BELOW},
    )
    if args.synthetic:
        CACHE.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        synth = SyntheticVersion(args.synthetic, version.dim, CACHE)
        built = time.perf_counter() - start
        results["synthetic"] = run_version(
            synth,
            synth.queries,
            "synthetic clustered, HNSW32,Flat efSearch 64",
            {"filtered": EXACT_BELOW, "selector_only": 0.0},
        )
        results["synthetic"]["build_s"] = round(built, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "filters.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "filters.md").write_text(report(results))
    print(report(results))
    return 0


def report(r: dict) -> str:
    lines = [
        "# Filtered search: exactness and latency by selectivity",
        "",
        f"`{r['command']}` on {r['cpus']} CPUs ({r['date']}); one FAISS thread; k = {K}; median ms per query "
        f"of the SQL that resolves the filter to ids (uncached) and of the search within them. "
        f"Recall@10 is against an exact ranking over the matching items (1.0: the same ten ids).",
        "",
    ]
    for key in ("flickr8k", "synthetic"):
        if key not in r:
            continue
        g = r[key]
        variants = [v for v in ("filtered", "selector_only") if v in g["1%"]]
        lines += [
            f"## {g['gallery']}: {g['items']:,} items, {g['queries']} queries",
            "",
            "| selectivity | matching | SQL ms | "
            + " | ".join(f"{v} search ms | {v} recall@10 (min)" for v in variants)
            + " | unfiltered ms |",
            "|---" * (3 + 2 * len(variants) + 1) + "|",
        ]
        for p in SELECTIVITY:
            e = g[f"{p}%"]
            cells = [
                f"{e[v]['median_ms']:.3f} | {e[v]['recall_at_10']:.4f} ({e[v]['min_recall_at_10']:.2f})"
                for v in variants
            ]
            lines.append(
                f"| {p}% | {e['matching']:,} | {e['sql_median_ms']:.3f} | "
                + " | ".join(cells)
                + f" | {g['unfiltered']['median_ms']:.3f} |"
            )
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
