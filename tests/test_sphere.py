import numpy as np
import pytest

from retrieval import sphere
from retrieval.errors import InvalidInputError
from retrieval.sphere.recall import recall_at_k, recall_from_scores


def unit(rows):
    return sphere.l2_normalize(np.asarray(rows, np.float32))


def test_normalize_gives_unit_rows_and_rejects_zero():
    x = unit(np.random.default_rng(0).normal(size=(10, 7)))
    assert sphere.is_unit_norm(x, atol=1e-6)
    with pytest.raises(InvalidInputError, match="zero-norm"):
        sphere.l2_normalize(np.zeros((2, 3)))


def test_angles_and_slerp():
    a, b = unit([[1, 0, 0]])[0], unit([[0, 1, 0]])[0]
    assert sphere.angle_deg(a @ b) == pytest.approx(90.0)
    mid = sphere.slerp(a, b, 0.5)
    np.testing.assert_allclose(mid, unit([[1, 1, 0]])[0], atol=1e-6)
    np.testing.assert_allclose(sphere.slerp(a, b, 0.0), a, atol=1e-6)
    np.testing.assert_allclose(sphere.slerp(a, a, 0.3), a, atol=1e-6)  # tiny angle falls back to lerp


def test_karcher_mean_of_symmetric_points_is_their_axis():
    pts = unit([[1, 1, 0], [1, -1, 0], [1, 0, 1], [1, 0, -1]])
    np.testing.assert_allclose(sphere.karcher_mean(pts), [1, 0, 0], atol=1e-5)


def test_uniformity_alignment_gap_on_known_configurations():
    x = unit(np.eye(4))
    assert sphere.alignment(x, x) == 0.0
    # every distinct pair of orthonormal vectors is at squared distance 2
    assert sphere.uniformity(x) == pytest.approx(-4.0)
    assert sphere.modality_gap(x, -x) == pytest.approx(2 * np.linalg.norm(x.mean(0)))


def test_recall_at_k_exact_on_a_constructed_case():
    images = unit(np.eye(3))
    # captions 0,1 belong to image 0; caption 2 to image 1 (but points at image 2); caption 3 to image 2
    texts = unit([[1, 0.1, 0], [0.2, 1, 0], [0, 0.1, 1], [0, 0, 1]])
    owner = np.array([0, 0, 1, 2])
    r = recall_at_k(images, texts, owner, ks=(1, 2))
    assert r["t2i_R@1"] == pytest.approx(50.0)  # captions 0 and 3 find their image first
    assert r["t2i_R@2"] == pytest.approx(100.0)
    assert r["i2t_R@1"] == pytest.approx(200 / 3)  # image 1's best caption (1) is not its own
    g = sphere.diagnostics(images, texts, owner)
    assert 0 <= g["alignment"] <= 4 and g["positive_angle_deg_mean"] > 0


def test_recall_from_scores_ranks_each_direction_by_its_own_matrix():
    owner = np.array([0, 0, 1])
    t2i = np.array([[0.9, 0.1], [0.2, 0.8], [0.3, 0.7]])  # (C, N): caption 1 prefers image 1
    i2t = np.array([[0.1, 0.9, 0.0], [0.0, 0.1, 0.6]])  # (N, C): each image prefers its own
    r = recall_from_scores(t2i, i2t, owner, ks=(1,))
    assert r["t2i_R@1"] == pytest.approx(200 / 3)
    assert r["i2t_R@1"] == pytest.approx(100.0)  # t2i.T would give 50: image 1 -> caption 1
    assert recall_from_scores(t2i, t2i.T, owner, ks=(1,))["i2t_R@1"] == pytest.approx(50.0)
