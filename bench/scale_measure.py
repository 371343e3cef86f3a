"""Measurements for bench/bench_scale.py: exact ground truth, recall@10, one-query-at-a-time QPS
and the resident memory of a process that serves an index (measured in a fresh subprocess).

The RSS probe runs as `python bench/scale_measure.py INDEX STORAGE QUERIES.npy [SETTING]`: it
imports faiss, reads /proc/self/status (VmRSS, RssAnon, RssFile), opens the index as the server does
(`retrieval.store.reader.read_index_file`), reads it again, searches every query one at a time,
reads it a third time and prints the three readings as JSON.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import faiss
import numpy as np
from faiss.contrib.exhaustive_search import knn_ground_truth

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

K = 10


def ground_truth(rows: np.ndarray, blocks, k: int = K) -> tuple[np.ndarray, np.ndarray]:
    """Exact (scores, ids) of the top-k for each query row, streaming the gallery's blocks."""
    ids: list[np.ndarray] = []

    def vectors():
        for block_ids, vecs in blocks:
            ids.append(block_ids)
            yield vecs

    scores, pos = knn_ground_truth(np.ascontiguousarray(rows), vectors(), k, metric_type=faiss.METRIC_INNER_PRODUCT)
    return scores, np.concatenate(ids)[pos]


def recall(found: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(a.tolist()) & set(b.tolist())) for a, b in zip(found, exact)]) / exact.shape[1])


def apply_setting(index: faiss.Index, setting: dict) -> None:
    """Set efSearch / nprobe / k_factor on whatever wraps them (IDMap2, refine, pre-transform)."""
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap2) else index
    if "k_factor" in setting:
        faiss.downcast_index(inner).k_factor = setting["k_factor"]
    if "efSearch" in setting:
        faiss.downcast_index(inner).hnsw.efSearch = setting["efSearch"]
    if "nprobe" in setting:
        faiss.extract_index_ivf(index).nprobe = setting["nprobe"]


def qps(index: faiss.Index, rows: np.ndarray, k: int = K, repeats: int = 1) -> float:
    """Queries per second, one query per call on one thread (best of `repeats` passes)."""
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        best = 0.0
        for _ in range(repeats):
            start = time.perf_counter()
            for i in range(len(rows)):
                index.search(rows[i : i + 1], k)
            best = max(best, len(rows) / (time.perf_counter() - start))
        return best
    finally:
        faiss.omp_set_num_threads(threads)


def status() -> dict[str, int]:
    """VmRSS, RssAnon and RssFile of this process in bytes."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) * 1024
    return out


def serving_rss(index_path: Path, storage: str, queries: Path, setting: dict) -> dict:
    """Run this file as a subprocess: RSS before opening, after opening, after the queries."""
    import subprocess

    proc = subprocess.run(
        [sys.executable, __file__, str(index_path), storage, str(queries), json.dumps(setting)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _probe(argv: list[str]) -> None:
    from retrieval.store.reader import read_index_file

    index_path, storage, queries = Path(argv[0]), argv[1], np.load(argv[2])
    faiss.omp_set_num_threads(1)
    before = status()
    index = read_index_file(index_path, storage)
    apply_setting(index, json.loads(argv[3]) if len(argv) > 3 else {})
    opened = status()
    start = time.perf_counter()
    for i in range(len(queries)):
        index.search(queries[i : i + 1], K)
    seconds = time.perf_counter() - start
    print(
        json.dumps(
            {
                "before_open": before,
                "after_open": opened,
                "after_queries": status(),
                "queries": len(queries),
                "query_seconds": round(seconds, 3),
            }
        )
    )


if __name__ == "__main__":
    _probe(sys.argv[1:])
