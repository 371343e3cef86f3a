"""Geometry of the unit hypersphere: normalization, angles and the embedding diagnostics.

numpy in, numpy out (float32 where vectors are returned). Torch code normalizes with
`torch.nn.functional.normalize`; these functions serve indexes, servers and evaluation.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from retrieval.errors import InvalidInputError


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows of `x` (N, D) scaled to unit norm, safely for any finite values: each row is divided
    by its largest magnitude first and normalized in float64, so huge rows (1e30 everywhere, whose
    float32 norm overflows to inf) and tiny ones (whose squares underflow) keep their direction.
    A zero or non-finite row is an error, never NaN or a zero vector."""
    x = np.asarray(x, dtype=np.float64)
    assert x.ndim == 2, f"expected (N, D) vectors, got shape {x.shape}"
    bad = np.flatnonzero(~np.all(np.isfinite(x), axis=1))
    if bad.size:
        raise InvalidInputError(f"cannot normalize vector(s) with non-finite values at row(s) {bad[:5].tolist()}")
    scale = np.max(np.abs(x), axis=1, keepdims=True)
    bad = np.flatnonzero(scale[:, 0] == 0)
    if bad.size:
        raise InvalidInputError(f"cannot normalize zero-norm vector(s) at row(s) {bad[:5].tolist()}")
    x = x / scale
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def is_unit_norm(x: np.ndarray, atol: float = 1e-4) -> bool:
    """True when every row of `x` has norm 1 within `atol`."""
    return bool(np.all(np.abs(np.linalg.norm(np.asarray(x, np.float64), axis=1) - 1.0) <= atol))


def angle_deg(cosine: np.ndarray | float) -> np.ndarray:
    """Geodesic distance in degrees for cosines of unit vectors: arccos(clip(cos, -1, 1))."""
    return np.degrees(np.arccos(np.clip(cosine, -1.0, 1.0)))


def alignment(x: np.ndarray, y: np.ndarray) -> float:
    """Wang & Isola (2020): E ||x_i - y_i||^2 over positive pairs (rows paired). Lower is better."""
    assert x.shape == y.shape, f"positive pairs need equal shapes, got {x.shape} vs {y.shape}"
    return float(np.mean(np.sum((x - y) ** 2, axis=1)))


def uniformity(x: np.ndarray, t: float = 2.0, max_points: int = 4000) -> float:
    """Wang & Isola (2020): log E exp(-t ||x_i - x_j||^2) over distinct pairs. Lower is better."""
    x = np.asarray(x[:max_points], dtype=np.float32)
    n = len(x)
    sq = np.clip(2.0 - 2.0 * (x @ x.T).astype(np.float64), 0.0, None)  # ||a-b||^2 = 2 - 2 a.b on the sphere
    kernel = np.exp(-t * sq)
    # the mean over i != j of a symmetric matrix, without materializing the pairs' indices
    return float(np.log((kernel.sum() - np.trace(kernel)) / (n * (n - 1))))


def modality_gap(image_vectors: np.ndarray, text_vectors: np.ndarray) -> float:
    """Liang et al. (2022): || mean(image vectors) - mean(text vectors) ||."""
    return float(np.linalg.norm(image_vectors.mean(axis=0) - text_vectors.mean(axis=0)))


def skewness(x: np.ndarray) -> float:
    """Third standardized moment E[(x - mean)^3] / std^3 (0 for a constant sample)."""
    x = np.asarray(x, dtype=np.float64)
    std = x.std()
    return 0.0 if std == 0 else float(np.mean((x - x.mean()) ** 3) / std**3)


def k_occurrence(
    queries: np.ndarray, gallery_blocks: Iterable[np.ndarray], k: int = 10, chunk: int = 1024
) -> np.ndarray:
    """N_k of every gallery item: how many of the unit `queries` (Q, D) have it among their k nearest
    by cosine. The gallery streams as blocks of unit rows (n, D), so only the queries' running top k
    and one (chunk, n) score tile are in memory; counts come back in the gallery's stream order."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    best_s = np.full((len(queries), k), -np.inf, np.float32)
    best_i = np.full((len(queries), k), -1, np.int64)
    total = 0
    for block in gallery_blocks:
        block = np.ascontiguousarray(block, dtype=np.float32)
        for start in range(0, len(queries), chunk):
            rows = slice(start, start + chunk)
            s = np.hstack([best_s[rows], queries[rows] @ block.T])
            i = np.hstack([best_i[rows], np.broadcast_to(np.arange(total, total + len(block)), (len(s), len(block)))])
            keep = np.argpartition(-s, k - 1, axis=1)[:, :k] if s.shape[1] > k else np.argsort(-s, axis=1)
            best_s[rows], best_i[rows] = np.take_along_axis(s, keep, 1), np.take_along_axis(i, keep, 1)
        total += len(block)
    found = best_i[best_i >= 0]
    return np.bincount(found, minlength=total)


def hubness(queries: np.ndarray, gallery_blocks: Iterable[np.ndarray], k: int = 10) -> float:
    """Radovanovic et al. (2010): the skew of the k-occurrence distribution of the gallery under
    these queries. Near 0: every item is found about equally often; large and positive: a few hubs
    are among the nearest neighbours of many queries while many items are nobody's."""
    return skewness(k_occurrence(queries, gallery_blocks, k))


def slerp(a: np.ndarray, b: np.ndarray, t: float) -> np.ndarray:
    """Spherical interpolation between unit vectors a and b; lerp + normalize when nearly equal."""
    a, b = l2_normalize(a[None])[0], l2_normalize(b[None])[0]
    w = float(np.arccos(np.clip(a @ b, -1.0, 1.0)))
    if w < 1e-4:
        return l2_normalize(((1 - t) * a + t * b)[None])[0]
    return ((np.sin((1 - t) * w) * a + np.sin(t * w) * b) / np.sin(w)).astype(np.float32)


def diagnostics(image_vecs: np.ndarray, text_vecs: np.ndarray, caption_image: np.ndarray) -> dict[str, float]:
    """Diagnostics of the embedding: how close positives are, how spread each modality is."""
    paired = image_vecs[caption_image]  # (C, D)
    pos_cos = np.sum(paired * text_vecs, axis=1)
    return {
        "alignment": alignment(paired, text_vecs),
        "uniformity_image": uniformity(image_vecs),
        "uniformity_text": uniformity(text_vecs),
        "modality_gap": modality_gap(image_vecs, text_vecs),
        "positive_cosine_mean": float(pos_cos.mean()),
        "positive_angle_deg_mean": float(angle_deg(pos_cos).mean()),
    }
