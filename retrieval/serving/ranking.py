"""From a resolved query (`retrieval.serving.queries.Point`) to its ranked hits: the top k, or the
spherical cap; its excluded items left out; MMR and dedup re-ranking over a bounded pool.

Caps and the bias: a cross-modal search ranks by cos(q, g) + b_g, but a cap is a set on the sphere,
{g : cos(q, g) >= cos(theta)}, which the bias must not widen or narrow. So the cap is one FAISS range
search with [q, 0] (the plain cosine, threshold cos(theta)); the items inside are then ranked as the
search would rank them (cos + b_g for a cross-modal query, the cosine otherwise), and the first k
(or the re-ranking pool) kept. Diversity and dedup pick from a pool of the `pool` best candidates
(relevance as ranked), by MMR with each item's stored unit vector.
"""

from __future__ import annotations

import numpy as np

from retrieval.embedding.calibration import Calibration
from retrieval.hits import Hit, Modality, hits_from_rows
from retrieval.serving.queries import Options, Point
from retrieval.sphere.compose import in_cap, mmr
from retrieval.store.reader import IndexVersion


def candidates(
    index: IndexVersion,
    target: Modality,
    point: Point,
    want: int,
    cross_modal: bool,
    max_angle_deg: float | None,
    allowed: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Up to `want` (cosines, ids) best first by the search's ranking, excluded ids left out, and
    only `allowed` ids when given (a filter's matches: searched inside FAISS, or, for a cap, the
    cap's exact set intersected with them)."""
    exclude = np.fromiter(point.exclude.get(target, ()), np.int64)
    if allowed is not None:
        allowed = allowed[~np.isin(allowed, exclude)]
        if len(allowed) == 0:
            return np.zeros(0, np.float32), np.zeros(0, np.int64)
    if max_angle_deg is not None:
        floor = float(np.cos(np.radians(max_angle_deg)))
        cos, ids = index.within(target, point.vector, floor - 1e-6)
        keep = in_cap(cos, max_angle_deg) & ~np.isin(ids, exclude)
        if allowed is not None:
            keep &= np.isin(ids, allowed)
        cos, ids = cos[keep], ids[keep].astype(np.int64)
        rank = cos + index.bias(target, ids) if cross_modal and len(ids) else cos
        order = np.lexsort((ids, -rank))[:want]  # best first, ties by id
        return cos[order], ids[order]
    if allowed is not None:
        scores, ids = index.search(target, point.vector[None, :], want, cross_modal=cross_modal, allowed=allowed)
        return scores[0][ids[0] >= 0], ids[0][ids[0] >= 0]
    scores, ids = index.search(target, point.vector[None, :], want + len(exclude), cross_modal=cross_modal)
    keep = (ids[0] >= 0) & ~np.isin(ids[0], exclude)
    return scores[0][keep][:want], ids[0][keep][:want]


def lookup(
    index: IndexVersion,
    target: Modality,
    point: Point,
    k: int,
    min_score: float | None,
    cross_modal: bool,
    options: Options,
    pool: int,
    allowed: np.ndarray | None = None,
    calibration: Calibration | None = None,
) -> list[Hit]:
    """The hits of one resolved query (see the module's docstring); `allowed`: see `candidates`.
    With a `calibration`, each hit carries its match probability, scored over the ranked candidates
    before any re-ranking (the calibrator's margin features need the next results: at least its
    top_k), and hits under `options.min_probability` are dropped."""
    want = max(pool, k) if options.reranks else k
    cos, ids = candidates(
        index,
        target,
        point,
        max(want, calibration.top_k) if calibration else want,
        cross_modal,
        options.max_angle_deg,
        allowed,
    )
    probs = None
    if calibration is not None and len(ids):
        bias = index.bias(target, ids)
        probs = calibration.match_probability(point.vector[None, :], cos[None, :], bias[None, :])[0]
    picks = np.arange(min(k, len(ids)))
    if options.reranks and len(ids):
        cos, ids = cos[:want], ids[:want]
        rows = index.rows(target, ids)
        relevance = cos + rows[:, index.dim] if cross_modal else cos
        picks = mmr(relevance, rows[:, : index.dim], k, options.diversity or 0.0, options.dedup_angle_deg)
    cos, ids = cos[picks], ids[picks]
    hits = hits_from_rows(
        target, cos, ids, index.metadata(target, ids), min_score, None if probs is None else probs[picks]
    )
    floor = options.min_probability
    return (
        hits if floor is None else [h for h in hits if h.match_probability is not None and h.match_probability >= floor]
    )
