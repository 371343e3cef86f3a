"""The rows an index stores and the queries that search them: each gallery vector is a unit
embedding g (D) plus its inverted-softmax bias b_g as coordinate D+1 (`retrieval.embedding.querybank`;
0 for models without a query bank). A cross-modal query q searches with [q, 1], so the index ranks
by cos(q, g) + b_g; any other with [q, 0], the plain cosine."""

from __future__ import annotations

import faiss
import numpy as np


def with_bias(vectors: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """(N, D) unit gallery rows and (N,) biases -> (N, D+1) rows as the index stores them."""
    return np.ascontiguousarray(np.hstack([vectors, bias[:, None]]), dtype=np.float32)


def query_rows(queries: np.ndarray, cross_modal: bool) -> np.ndarray:
    """(B, D) unit queries -> (B, D+1): last coordinate 1 to add the gallery's bias, 0 not to."""
    return with_bias(queries, np.full(len(queries), 1.0 if cross_modal else 0.0, np.float32))


def reconstruct(index: faiss.Index, ids: np.ndarray) -> np.ndarray:
    """Vectors stored under `ids` (exact for Flat storage: Flat, HNSW*,Flat, IVF*,Flat; IVF
    indexes need their direct map, which `IndexVersion.open` makes)."""
    return index.reconstruct_batch(np.ascontiguousarray(ids, dtype=np.int64))


def restricted_to(index: faiss.Index, allowed: np.ndarray) -> faiss.SearchParameters:
    """Search parameters that keep only `allowed` ids, of the type the wrapped index expects
    (IVF and HNSW reject the generic type), carrying its nprobe, and its efSearch divided by the
    share of ids allowed (an HNSW walk passes over the others: its candidate list must hold as many
    allowed ones as an unfiltered walk would)."""
    sel = faiss.IDSelectorBatch(np.ascontiguousarray(allowed, np.int64))
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        return faiss.SearchParametersIVF(sel=sel, nprobe=ivf.nprobe)
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap2) else index
    if isinstance(inner, faiss.IndexHNSW):
        share = len(allowed) / max(1, index.ntotal)
        ef = int(min(index.ntotal, inner.hnsw.efSearch / max(share, 1e-9)))
        return faiss.SearchParametersHNSW(sel=sel, efSearch=max(ef, inner.hnsw.efSearch))
    return faiss.SearchParameters(sel=sel)


# Below this share of the gallery, a filtered search over an approximate index (HNSW, IVF) is an exact
# search over the matching items' vectors: a graph walk or a few probed lists find too few of them
# (bench/bench_filters.py measures both sides of it).
EXACT_BELOW = 0.05


def _is_flat(index: faiss.Index) -> bool:
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap2) else index
    return isinstance(inner, faiss.IndexFlat)


def reconstructs(index: faiss.Index) -> bool:
    """Can the index give stored vectors back by id? Not an IVF index without its direct map (one
    served memory-mapped from on-disk inverted lists, `retrieval.store.bias_table`)."""
    ivf = faiss.try_extract_index_ivf(index)
    return ivf is None or ivf.direct_map.type != faiss.DirectMap.NoMap


def exact_within(index: faiss.Index, rows: np.ndarray, k: int, allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product of (B, D+1) query rows over the stored vectors of `allowed` ids
    only: (scores (B, k), ids (B, k)), k at most len(allowed)."""
    allowed = np.ascontiguousarray(allowed, np.int64)
    k = min(k, len(allowed))
    scores = rows @ reconstruct(index, allowed).T  # (B, n)
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k] if k < len(allowed) else np.tile(np.arange(k), (len(rows), 1))
    top_scores = np.take_along_axis(scores, top, axis=1)
    order = np.argsort(-top_scores, axis=1, kind="stable")
    return (
        np.take_along_axis(top_scores, order, axis=1).astype(np.float32),
        allowed[np.take_along_axis(top, order, axis=1)],
    )


def search_within(
    index: faiss.Index, rows: np.ndarray, k: int, allowed: np.ndarray, exact_below: float = EXACT_BELOW
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k among `allowed` ids only, never by fetching more and dropping: FAISS searches with an
    IDSelector over them (exact for Flat indexes), except that an approximate index answers by exact
    search when the allowed ids are under `exact_below` of the gallery, or when its selective search
    found fewer than min(k, allowed) of them. So k results come back whenever k items match.
    IDSelectorBatch (a hash set) rather than a bitmap or range: ids are 63-bit content hashes."""
    k = min(k, len(allowed))
    if k == 0:
        return np.zeros((len(rows), 0), np.float32), np.zeros((len(rows), 0), np.int64)
    exact_fallback = not _is_flat(index) and reconstructs(index)  # memory-mapped IVF: the selector alone
    if exact_fallback and len(allowed) < exact_below * index.ntotal:
        return exact_within(index, rows, k, allowed)
    scores, ids = index.search(rows, k, params=restricted_to(index, allowed))
    if exact_fallback and (ids < 0).any():
        return exact_within(index, rows, k, allowed)
    return scores, ids
