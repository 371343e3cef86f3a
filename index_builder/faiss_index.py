"""FAISS indexes over unit vectors: the factory string chosen by collection size, building from a
stream of (ids, vectors) blocks, and recall@10 measured against exact search.

Every index is `IDMap2,<factory>` with METRIC_INNER_PRODUCT over rows [g, b_g]: a unit embedding
plus its inverted-softmax bias (see `retrieval.store.reader`), so ids are the builder's stable int64 ids
and vectors can be reconstructed by id (incremental builds).
"""
from __future__ import annotations

import logging
import re
import time
from typing import Callable, Iterable, Iterator

import faiss
import numpy as np
from faiss.contrib.exhaustive_search import knn_ground_truth

from retrieval.errors import DatasetError, RetrievalError
from retrieval.sphere import is_unit_norm

log = logging.getLogger(__name__)

Blocks = Callable[[], Iterator[tuple[np.ndarray, np.ndarray]]]  # a fresh pass of (ids (n,), vectors (n, D'))

EXACT_MAX = 100_000      # up to this many vectors, exact search is fast enough (a few ms a query)
HNSW_MAX = 2_000_000     # beyond, IVF: HNSW's graph gets slow to build and heavy in memory
HNSW_EF_SEARCH = 128
HNSW_EF_CONSTRUCTION = 80
MAX_TRAIN = 100_000


def faiss_error(e: Exception) -> str:
    """FAISS's message without its C++ location prefix."""
    lines = str(e).strip().splitlines() or ["unknown error"]
    return re.sub(r"^Error in .*? at \S+:\d+: ", "", lines[0]).strip()


def choose_factory(n: int) -> str:
    """Flat (exact) for small collections, HNSW for medium, IVF for large."""
    if n <= EXACT_MAX:
        return "Flat"
    if n <= HNSW_MAX:
        return "HNSW32,Flat"
    nlist = 1 << int(round(np.log2(4 * np.sqrt(n))))
    return f"IVF{nlist},Flat"


def make_index(dim: int, factory: str) -> faiss.Index:
    inner = factory[len("IDMap2,"):] if factory.startswith("IDMap2,") else factory
    try:
        index = faiss.index_factory(dim, f"IDMap2,{inner}", faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise DatasetError(f"invalid --index-factory '{factory}' for {dim}-dimensional vectors (the embedding plus "
                           f"its inverted-softmax bias): {faiss_error(e)}; for PQ, rotate to a dimension it divides "
                           f"first, e.g. 'OPQ32_{dim - 1},IVF1024,PQ32'") from e
    sub = faiss.downcast_index(index.index)
    if isinstance(sub, faiss.IndexHNSW):
        sub.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        sub.hnsw.efSearch = HNSW_EF_SEARCH
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.nprobe = max(1, min(ivf.nlist, ivf.nlist // 16 or 1, 64))
    return index


def sample(blocks: Blocks, n: int, want: int) -> np.ndarray:
    """About `want` rows spread evenly over the stream (deterministic)."""
    step = max(1, n // max(1, want))
    picked, seen = [], 0
    for _, vecs in blocks():
        rows = np.arange((-seen) % step, len(vecs), step)
        picked.append(vecs[rows])
        seen += len(vecs)
    out = np.concatenate(picked) if picked else np.zeros((0, 0), np.float32)
    return np.ascontiguousarray(out[:want], dtype=np.float32)


def build_index(blocks: Blocks, n: int, dim: int, factory: str) -> faiss.Index:
    """Train if needed (on an even sample), then add every block of rows [g, b_g] (dim = D+1);
    each g must be unit norm."""
    index = make_index(dim, factory)
    if not index.is_trained:
        train = sample(blocks, n, MAX_TRAIN)
        if len(train) == 0:
            raise DatasetError(f"index factory '{factory}' needs training vectors, and there are none")
        log.info("training %s on %d vectors", factory, len(train))
        try:
            index.train(train)
        except RuntimeError as e:
            raise DatasetError(f"cannot train '{factory}' on {len(train)} vectors: {faiss_error(e)}") from e
    added = 0
    for ids, vecs in blocks():
        vecs = np.ascontiguousarray(vecs, dtype=np.float32)
        if not is_unit_norm(vecs[:, :-1]):
            raise RetrievalError("refusing to index embeddings that are not unit norm")
        index.add_with_ids(vecs, np.ascontiguousarray(ids, dtype=np.int64))
        added += len(ids)
    if added != n:
        raise RetrievalError(f"expected {n} vectors for the index, found {added} (work directory out of sync?)")
    return index


def recall_at_10(index: faiss.Index, blocks: Blocks, queries: np.ndarray, k: int = 10) -> dict:
    """Mean |approximate top-k ∩ exact top-k| / k over the queries; exact search streams the
    blocks through `faiss.contrib.exhaustive_search.knn_ground_truth`."""
    n = int(index.ntotal)
    if n == 0 or len(queries) == 0:
        return {"recall_at_10": None, "queries": 0}
    k = min(k, n)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    ids: list[np.ndarray] = []

    def vectors() -> Iterable[np.ndarray]:
        for block_ids, vecs in blocks():
            ids.append(np.asarray(block_ids, np.int64))
            yield np.ascontiguousarray(vecs, dtype=np.float32)

    start = time.perf_counter()
    _, positions = knn_ground_truth(queries, vectors(), k, metric_type=faiss.METRIC_INNER_PRODUCT)
    exact = np.concatenate(ids)[positions]
    _, found = index.search(queries, k)
    hits = [len(set(a.tolist()) & set(b.tolist())) for a, b in zip(found, exact)]
    recall = float(np.mean(hits) / k)
    log.info("recall@%d against exact search: %.4f over %d queries (%.1fs)", k, recall, len(queries),
             time.perf_counter() - start)
    return {"recall_at_10": recall, "queries": int(len(queries)), "k": k}


def describe(index: faiss.Index) -> str:
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap2) else index
    return f"{type(index).__name__}({type(inner).__name__})"
