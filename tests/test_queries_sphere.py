"""The geometry of composed queries (retrieval.sphere.compose): exact properties."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval.errors import InvalidInputError
from retrieval.sphere import compose as C


def unit(*v) -> np.ndarray:
    v = np.asarray(v, np.float64)
    return (v / np.linalg.norm(v)).astype(np.float32)


def angle(a, b) -> float:
    return float(np.degrees(np.arccos(np.clip(np.dot(np.asarray(a, np.float64), b), -1, 1))))


def test_karcher_mean_of_symmetric_points_is_their_axis():
    pts = np.stack([unit(1, 1, 0), unit(1, -1, 0), unit(1, 0, 1), unit(1, 0, -1)])
    np.testing.assert_allclose(C.karcher_mean(pts), [1, 0, 0], atol=1e-6)


def test_weighted_karcher_mean_of_two_points_divides_the_arc_by_the_weights():
    a, b = unit(1, 0, 0), unit(0, 1, 0)  # 90 degrees apart: weights 1 and 2 put the mean 60 from a
    m = C.karcher_mean(np.stack([a, b]), np.array([1.0, 2.0]))
    assert angle(m, a) == pytest.approx(60.0, abs=1e-4) and angle(m, b) == pytest.approx(30.0, abs=1e-4)


def test_karcher_mean_differs_from_the_linear_mean_for_unequal_spreads():
    pts = np.stack([unit(1, 0, 0), unit(0, 1, 0), unit(0, 0.9, 0.1)])
    g, lin = C.karcher_mean(pts), C.compose_linear(pts, np.ones(3))

    def residual(m):  # the Karcher mean's first-order condition
        return C.log_map(m, pts).sum(0)

    assert np.linalg.norm(residual(g)) < 1e-6 < np.linalg.norm(residual(lin))


@pytest.mark.parametrize("w", [0.5, 1.0, 2.0, 3.7])
def test_a_negative_term_moves_the_point_exactly_its_weight_times_the_step(w):
    p, n = unit(1, 0.2, 0.1), unit(0.3, 1, 0)
    before = angle(p, n)
    out = C.compose_geodesic(np.stack([p, n]), np.array([1.0, -w]))
    assert angle(out, n) - before == pytest.approx(w * C.NEGATIVE_STEP_DEG, abs=1e-4)
    assert angle(out, p) == pytest.approx(w * C.NEGATIVE_STEP_DEG, abs=1e-4)  # along the great circle
    assert np.cross(np.cross(p, n), out) @ np.cross(p, n) == pytest.approx(0, abs=1e-6)  # coplanar with p and n


def test_a_negative_term_stops_at_the_antipode():
    p, n = unit(1, 0, 0), unit(-1, 0.05, 0)
    out = C.compose_geodesic(np.stack([p, n]), np.array([1.0, -10.0]))
    assert angle(out, n) == pytest.approx(180.0, abs=1e-2)  # float32 arccos near -1


def test_linear_is_the_normalized_weighted_sum():
    x = np.stack([unit(1, 0, 0), unit(0, 1, 0), unit(0, 0, 1)])
    np.testing.assert_allclose(C.compose_linear(x, np.array([2.0, 1.0, -1.0])), unit(2, 1, -1), atol=1e-6)


@pytest.mark.parametrize(
    "weights, message", [([1.0, 0.0], "weight 0"), ([-1.0, -2.0], "negative terms only"), ([1.0, np.inf], "finite")]
)
def test_bad_weights(weights, message):
    x = np.stack([unit(1, 0, 0), unit(0, 1, 0)])
    for combine in (C.compose_geodesic, C.compose_linear):
        with pytest.raises(InvalidInputError, match=message):
            combine(x, np.array(weights))


def test_cancelling_terms_and_a_negative_on_the_point_are_errors():
    a = unit(1, 0, 0)
    with pytest.raises(InvalidInputError, match="zero total weight"):
        C.compose_linear(np.stack([a, a]), np.array([1.0, -1.0]))
    with pytest.raises(InvalidInputError, match="coincides"):
        C.compose_geodesic(np.stack([a, a]), np.array([1.0, -1.0]))
    with pytest.raises(InvalidInputError, match="cancel"):
        C.karcher_mean(np.stack([a, -a]))


def test_walk_steps_are_equal_angles():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2, 64))
    pts, t, ang = C.walk_points(a, b, 9)
    consecutive = [angle(pts[i], pts[i + 1]) for i in range(8)]
    assert max(consecutive) - min(consecutive) < 1e-4
    assert angle(pts[0], a / np.linalg.norm(a)) < 1e-3 and angle(pts[-1], b / np.linalg.norm(b)) < 1e-3
    np.testing.assert_allclose(ang, t * ang[-1])
    with pytest.raises(InvalidInputError, match="antipodal"):
        C.walk_points(a, -a, 3)


def test_cap_and_mmr():
    assert C.in_cap(np.cos(np.radians([10.0, 30.0, 30.5])), 30.0).tolist() == [True, True, False]
    x = np.stack([unit(1, 0, 0), unit(1, 0.01, 0), unit(0, 1, 0)])
    rel = np.array([0.9, 0.89, 0.5])
    assert C.mmr(rel, x, 3).tolist() == [0, 1, 2]  # no diversity: relevance order
    assert C.mmr(rel, x, 2, diversity=0.5).tolist() == [0, 2]  # the near-copy loses to the distinct item
    assert C.mmr(rel, x, 3, dedup_angle_deg=1.0).tolist() == [0, 2]  # dropped as within 1 degree of a better one
