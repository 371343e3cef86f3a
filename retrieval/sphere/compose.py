"""Queries composed on the unit sphere: weighted means, negative terms, paths, caps and diversity.

numpy in, numpy out (unit float32 vectors). The formulas, for unit vectors p, x and weights w:

* Log and Exp maps at p: Log_p(x) = theta / sin(theta) * (x - cos(theta) p), theta = arccos(p.x), a
  tangent vector of length theta; Exp_p(v) = cos|v| p + sin|v| v/|v|.
* GEODESIC combination. The positive terms' weighted Karcher (Frechet) mean: the point m minimizing
  sum_i w_i arccos(m.x_i)^2, found by the fixed point m <- Exp_m(sum_i w_i Log_m(x_i) / sum_i w_i)
  from the normalized weighted sum (`karcher_mean`). Then each negative term n (weight -w, w > 0), in
  the order given, moves the point straight away from n along their great circle by exactly
  w * NEGATIVE_STEP_DEG degrees: p <- Exp_p(-w s Log_p(n)/|Log_p(n)|), s = NEGATIVE_STEP_DEG in
  radians, so arccos(p.n) grows by w*s (`push_away`). The antipode -n is as far from n as the sphere
  goes: the step stops there (it never passes it to come back closer). A negative term equal to the
  point (within 1e-6 rad) gives no direction to move away in: an error.
* LINEAR combination (what most engines do): normalize(sum_i w_i x_i), negatives included; a zero
  sum is an error.
* Paths: slerp(a, b, t) = (sin((1-t) W) a + sin(t W) b) / sin W, W = arccos(a.b): the angle from a
  is t W, so equal steps of t are equal angles (`walk_points`). Antipodal ends have no unique great
  circle: an error.
* Caps: the items x with x.q >= cos(theta) (angle at most theta).
* Diversity: maximal marginal relevance (Carbonell and Goldstein, 1998), with lambda = `diversity`:
  repeatedly pick the candidate maximizing (1 - lambda) rel_i - lambda max_{j picked} x_i.x_j
  (lambda 0: relevance order); dedup drops a candidate within an angle of one picked before it.
"""

from __future__ import annotations

import numpy as np

from retrieval.errors import InvalidInputError
from retrieval.sphere.geometry import l2_normalize

NEGATIVE_STEP_DEG = 15.0  # degrees a negative term of weight -1 moves the point away from it
_EPS = 1e-6


def log_map(p: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Log_p(x) for unit p (D,) and unit rows x (N, D): tangent vectors at p of length arccos(p.x)."""
    p, x = np.asarray(p, np.float64), np.atleast_2d(np.asarray(x, np.float64))
    cos = np.clip(x @ p, -1.0, 1.0)
    theta = np.arccos(cos)[:, None]
    scale = np.where(theta > 1e-9, theta / np.maximum(np.sin(theta), 1e-12), 1.0)
    return scale * (x - cos[:, None] * p)


def exp_map(p: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Exp_p(v): the point reached from unit p along tangent v after an arc of length |v|."""
    p, v = np.asarray(p, np.float64), np.asarray(v, np.float64)
    n = float(np.linalg.norm(v))
    if n < 1e-12:
        return p / np.linalg.norm(p)
    q = np.cos(n) * p + np.sin(n) * v / n
    return q / np.linalg.norm(q)


def karcher_mean(x: np.ndarray, weights: np.ndarray | None = None, iters: int = 50, tol: float = 1e-10) -> np.ndarray:
    """Weighted Karcher mean of rows of x (normalized first) with positive weights."""
    x = l2_normalize(x).astype(np.float64)
    w = np.ones(len(x)) if weights is None else np.asarray(weights, np.float64)
    if np.any(w <= 0) or not np.all(np.isfinite(w)):
        raise InvalidInputError("Karcher mean weights must be positive and finite")
    w = w / w.sum()
    s = (w[:, None] * x).sum(0)
    if np.linalg.norm(s) < 1e-9:
        raise InvalidInputError("the terms cancel out (their weighted sum is zero): they have no mean on the sphere")
    mu = s / np.linalg.norm(s)
    for _ in range(iters):
        step = (w[:, None] * log_map(mu, x)).sum(0)
        mu = exp_map(mu, step)
        if np.linalg.norm(step) < tol:
            break
    return mu.astype(np.float32)


def push_away(p: np.ndarray, n: np.ndarray, angle_rad: float) -> np.ndarray:
    """p moved `angle_rad` further from n along their great circle, stopping at n's antipode."""
    p, n = np.asarray(p, np.float64), np.asarray(n, np.float64)
    v = log_map(p, n)[0]
    dist = float(np.linalg.norm(v))
    if dist < _EPS:
        raise InvalidInputError("a negative term coincides with the query point: there is no direction away from it")
    move = min(angle_rad, np.pi - dist)
    if move <= 0:
        return p.astype(np.float32)
    return exp_map(p, -move * v / dist).astype(np.float32)


def check_weights(weights: np.ndarray) -> np.ndarray:
    w = np.asarray(weights, np.float64).reshape(-1)
    if not np.all(np.isfinite(w)):
        raise InvalidInputError("term weights must be finite")
    if np.any(w == 0):
        raise InvalidInputError(
            f"terms[{int(np.flatnonzero(w == 0)[0])}] has weight 0: leave it out, or give it a "
            f"positive (toward) or negative (away) weight"
        )
    if not np.any(w > 0):
        raise InvalidInputError(
            "a query of negative terms only has no point to move away from: give at least one term a positive weight"
        )
    return w


def compose_geodesic(x: np.ndarray, weights: np.ndarray, step_deg: float = NEGATIVE_STEP_DEG) -> np.ndarray:
    """Karcher mean of the positive terms, then each negative term's push away, in order."""
    x, w = l2_normalize(x), check_weights(weights)
    p = karcher_mean(x[w > 0], w[w > 0])
    for xi, wi in zip(x[w < 0], w[w < 0]):
        p = push_away(p, xi, -wi * np.radians(step_deg))
    return p


def compose_linear(x: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """normalize(sum_i w_i x_i) over unit terms."""
    x, w = l2_normalize(x).astype(np.float64), check_weights(weights)
    s = (w[:, None] * x).sum(0)
    if np.linalg.norm(s) < 1e-9:
        raise InvalidInputError("the weighted terms sum to zero (zero total weight): no direction on the sphere")
    return (s / np.linalg.norm(s)).astype(np.float32)


def walk_points(a: np.ndarray, b: np.ndarray, steps: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`steps` points from a to b along the great circle: (points (steps, D), t (steps,), angle from
    a in degrees (steps,)). Equal steps of t are equal angles."""
    a, b = l2_normalize(np.stack([a, b])).astype(np.float64)
    total = float(np.arccos(np.clip(a @ b, -1.0, 1.0)))
    if np.pi - total < _EPS:
        raise InvalidInputError("the walk's ends are antipodal: no unique great circle joins them")
    t = np.linspace(0.0, 1.0, steps)
    if total < 1e-9:
        return np.repeat(a[None], steps, 0).astype(np.float32), t, np.zeros(steps)
    pts = (np.sin((1 - t)[:, None] * total) * a + np.sin(t[:, None] * total) * b) / np.sin(total)
    return l2_normalize(pts), t, np.degrees(t * total)


def in_cap(cosines: np.ndarray, max_angle_deg: float) -> np.ndarray:
    """Mask of cosines within the cap of `max_angle_deg` around the query."""
    return np.asarray(cosines) >= np.cos(np.radians(max_angle_deg)) - 1e-7


def mmr(
    relevance: np.ndarray, vectors: np.ndarray, k: int, diversity: float = 0.0, dedup_angle_deg: float | None = None
) -> np.ndarray:
    """Positions (into the candidates) of up to k picks by maximal marginal relevance with lambda =
    `diversity`, skipping any candidate within `dedup_angle_deg` of an earlier pick."""
    rel = np.asarray(relevance, np.float64)
    x = np.asarray(vectors, np.float64)
    sims = x @ x.T
    near = -np.inf if dedup_angle_deg is None else np.cos(np.radians(dedup_angle_deg))
    picked: list[int] = []
    free = np.ones(len(rel), bool)
    max_sim = np.full(len(rel), -1.0)
    while len(picked) < k and free.any():
        score = (1 - diversity) * rel - diversity * (max_sim if picked else 0.0)
        score[~free] = -np.inf
        i = int(np.argmax(score))
        free[i] = False
        if picked and max_sim[i] >= near - 1e-7 and dedup_angle_deg is not None:
            continue  # a near-duplicate of a better pick
        picked.append(i)
        max_sim = np.maximum(max_sim, sims[i])
    return np.asarray(picked, np.int64)
