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
    (IVF and HNSW reject the generic type), carrying its nprobe / efSearch."""
    sel = faiss.IDSelectorBatch(np.ascontiguousarray(allowed, np.int64))
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        return faiss.SearchParametersIVF(sel=sel, nprobe=ivf.nprobe)
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap2) else index
    if isinstance(inner, faiss.IndexHNSW):
        return faiss.SearchParametersHNSW(sel=sel, efSearch=inner.hnsw.efSearch)
    return faiss.SearchParameters(sel=sel)
