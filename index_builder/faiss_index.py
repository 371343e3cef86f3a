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
from collections.abc import Callable, Iterable, Iterator

import faiss
import numpy as np
from faiss.contrib.exhaustive_search import knn_ground_truth

from retrieval.errors import DatasetError, RetrievalError
from retrieval.sphere import is_unit_norm

log = logging.getLogger(__name__)

Blocks = Callable[[], Iterator[tuple[np.ndarray, np.ndarray]]]  # a fresh pass of (ids (n,), vectors (n, D'))

EXACT_MAX = 100_000  # up to this many vectors, exact search is fast enough (a few ms a query)
ON_DISK_MIN = 2_000_000  # beyond, the automatic IVF index is built and served on disk (`ivf_ondisk`)
# Beyond EXACT_MAX the automatic choice is IVF, nlist about 4 sqrt(n), probing 1/128 of the lists.
# Measured at 1M (bench/results/scale.md), for text -> image queries across the modality gap:
# IVF4096 nprobe 32 gives recall@10 0.983 at 64x the QPS of exact search (nprobe 48: 0.990 at
# 41-51x); HNSW32 needs efSearch 512 for 0.987 at 52x (its old default, 128: 0.931), builds 3.3x
# slower into 25% more bytes, and cannot be memory-mapped.
IVF_PROBE_FRACTION = 1 / 128
IVF_MIN_PROBE = 16
HNSW_EF_SEARCH = 128  # for an HNSW index asked for with --index-factory
HNSW_EF_CONSTRUCTION = 80
MAX_TRAIN = 100_000
TRAIN_PER_LIST = 64  # an IVF quantizer's training rows per list, beyond MAX_TRAIN (faiss asks for 39 or more)


def faiss_error(e: Exception) -> str:
    """FAISS's message without its C++ location prefix."""
    lines = str(e).strip().splitlines() or ["unknown error"]
    return re.sub(r"^Error in .*? at \S+:\d+: ", "", lines[0]).strip()


def choose_factory(n: int, ivf: bool = False) -> str:
    """Flat (exact) for small collections, IVF beyond (or whenever `ivf`)."""
    if n <= EXACT_MAX and not ivf:
        return "Flat"
    nlist = 1 << int(round(np.log2(4 * np.sqrt(max(n, 1)))))
    return f"IVF{nlist},Flat"


def default_nprobe(nlist: int) -> int:
    return max(1, min(nlist, max(IVF_MIN_PROBE, round(nlist * IVF_PROBE_FRACTION))))


def train_rows(factory: str, dim: int) -> int:
    """How many rows to train an index of `factory` on: MAX_TRAIN, or more for an IVF of many lists."""
    ivf = faiss.try_extract_index_ivf(make_index(dim, factory, id_map=False))
    return max(MAX_TRAIN, TRAIN_PER_LIST * ivf.nlist) if ivf is not None else MAX_TRAIN


def make_index(dim: int, factory: str, id_map: bool = True) -> faiss.Index:
    """The empty index, wrapped in IDMap2 unless `id_map` is False (IVF indexes that keep the ids in
    their own inverted lists: `index_builder.ivf_ondisk`)."""
    inner = factory[len("IDMap2,") :] if factory.startswith("IDMap2,") else factory
    try:
        index = faiss.index_factory(dim, f"IDMap2,{inner}" if id_map else inner, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise DatasetError(
            f"invalid --index-factory '{factory}' for {dim}-dimensional vectors (the embedding plus "
            f"its inverted-softmax bias): {faiss_error(e)}; for PQ, rotate to a dimension it divides "
            f"first, e.g. 'OPQ32_{dim - 1},IVF1024,PQ32'"
        ) from e
    sub = faiss.downcast_index(index.index) if id_map else index
    if isinstance(sub, faiss.IndexHNSW):
        sub.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        sub.hnsw.efSearch = HNSW_EF_SEARCH
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.nprobe = default_nprobe(ivf.nlist)
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
        train(index, sample(blocks, n, train_rows(factory, dim)), factory)
    added = 0
    for ids, vecs in blocks():
        index.add_with_ids(checked_rows(vecs), np.ascontiguousarray(ids, dtype=np.int64))
        added += len(ids)
    check_count(added, n)
    return index


def train(index: faiss.Index, rows: np.ndarray, factory: str) -> None:
    if len(rows) == 0:
        raise DatasetError(f"index factory '{factory}' needs training vectors, and there are none")
    log.info("training %s on %d vectors", factory, len(rows))
    try:
        index.train(rows)
    except RuntimeError as e:
        raise DatasetError(f"cannot train '{factory}' on {len(rows)} vectors: {faiss_error(e)}") from e


def checked_rows(rows: np.ndarray) -> np.ndarray:
    """Rows [g, b_g] as float32, refused unless every g is unit norm."""
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    if not is_unit_norm(rows[:, :-1]):
        raise RetrievalError("refusing to index embeddings that are not unit norm")
    return rows


def check_count(added: int, n: int) -> None:
    if added != n:
        raise RetrievalError(f"expected {n} vectors for the index, found {added} (work directory out of sync?)")


def recall_at_10(index: faiss.Index, blocks: Blocks, queries: dict[str, np.ndarray], k: int = 10) -> dict[str, dict]:
    """For each named set of query rows (e.g. cross-modal [q, 1] and same-modal [q, 0]): mean
    |approximate top-k ∩ exact top-k| / k. Exact search streams the blocks once for all the sets
    through `faiss.contrib.exhaustive_search.knn_ground_truth`."""
    n = int(index.ntotal)
    names = [name for name, q in queries.items() if len(q)]
    empty = {"recall_at_10": None, "queries": 0}
    if n == 0 or not names:
        return {name: dict(empty) for name in queries}
    k = min(k, n)
    rows = np.ascontiguousarray(np.concatenate([queries[name] for name in names]), dtype=np.float32)
    ids: list[np.ndarray] = []

    def vectors() -> Iterable[np.ndarray]:
        for block_ids, vecs in blocks():
            ids.append(np.asarray(block_ids, np.int64))
            yield np.ascontiguousarray(vecs, dtype=np.float32)

    start = time.perf_counter()
    _, positions = knn_ground_truth(rows, vectors(), k, metric_type=faiss.METRIC_INNER_PRODUCT)
    exact = np.concatenate(ids)[positions]
    _, found = index.search(rows, k)
    hits = np.asarray([len(set(a.tolist()) & set(b.tolist())) for a, b in zip(found, exact)])
    out, at = {name: dict(empty) for name in queries}, 0
    for name in names:
        count = len(queries[name])
        out[name] = {"recall_at_10": float(np.mean(hits[at : at + count]) / k), "queries": count, "k": k}
        at += count
        log.info("recall@%d against exact search, %s queries: %.4f over %d", k, name, out[name]["recall_at_10"], count)
    log.info("recall check took %.1fs", time.perf_counter() - start)
    return out


def allow_reconstruct(index: faiss.Index) -> None:
    """Let a bare IVF index (built on disk, its ids in its lists) give back vectors by id, through a
    hash-table direct map (RAM per item: for the builder's incremental reuse, not for serving).
    IDMap2-wrapped indexes already can (`retrieval.store.reader` makes their direct map)."""
    ivf = faiss.try_extract_index_ivf(index)
    if not isinstance(index, faiss.IndexIDMap2) and ivf is not None and ivf.direct_map.type == faiss.DirectMap.NoMap:
        ivf.set_direct_map_type(faiss.DirectMap.Hashtable)


def describe(index: faiss.Index) -> str:
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap2) else index
    return f"{type(index).__name__}({type(inner).__name__})"
