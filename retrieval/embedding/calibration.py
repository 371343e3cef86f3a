"""Calibrated match probabilities for text <-> image searches: the probability that a result is a
true match of its query (issue 15), from what a search has anyway.

For a query q and its top-K candidates, ranked by s_r = cos(q, g_r) + b_g_r (the inverted softmax's
ranking, `retrieval.embedding.querybank`), candidate r gets the features

    cosine         cos(q, g_r)
    bias           b_g_r, the item's hubness bias (the index's coordinate D+1)
    margin         s_r minus the best score of the other candidates (s_1 - s_2 for the first)
    query_to_mean  cos(q, m), m the calibration gallery's mean direction (how typical the query is)
    log_rank       log(r), r = 1..K

and p = sigmoid(w . (x - mean) / scale + c): scikit-learn's StandardScaler then
LogisticRegression, fitted on held-out pairs (`retrieval.training.calibration`). Only the numbers
ship, inside the model (a float64 buffer per direction, so the fingerprint covers them), and
this module evaluates them with numpy and scipy: no fitted object is ever pickled or loaded.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import expit

FEATURES = ("cosine", "bias", "margin", "query_to_mean", "log_rank")
DIRECTIONS = ("t2i", "i2t")  # text query -> image gallery, image query -> caption gallery
TOP_K = 10  # candidates per query the features see (and the fit used)
_HEAD = 2  # packed layout: [top_k, intercept, mean (F), scale (F), coef (F), center (D)]


def direction_of(source: str, target: str) -> str:
    """'t2i' or 'i2t' for a cross-modal (query modality, gallery modality)."""
    return f"{source[0]}2{target[0]}"


@dataclass(frozen=True)
class Calibration:
    """One direction's calibrator: the scaler's mean and scale, the logistic coefficients and
    intercept, the candidates per query it was fitted on and the gallery's mean direction."""

    mean: np.ndarray  # (F,)
    scale: np.ndarray  # (F,)
    coef: np.ndarray  # (F,)
    intercept: float
    top_k: int
    center: np.ndarray  # (D,) unit mean direction of the calibration gallery

    def pack(self) -> np.ndarray:
        """One float64 vector (the model buffer's layout)."""
        return np.concatenate(
            [[float(self.top_k), self.intercept], self.mean, self.scale, self.coef, self.center]
        ).astype(np.float64)

    @classmethod
    def unpack(cls, packed: np.ndarray) -> Calibration:
        v = np.asarray(packed, np.float64).reshape(-1)
        f = len(FEATURES)
        if len(v) <= _HEAD + 3 * f:
            raise ValueError(f"a packed calibration has more than {_HEAD + 3 * f} numbers, got {len(v)}")
        mean, scale, coef = (v[_HEAD + i * f : _HEAD + (i + 1) * f] for i in range(3))
        return cls(mean, scale, coef, float(v[1]), int(v[0]), v[_HEAD + 3 * f :])

    def features(self, queries: np.ndarray, cosines: np.ndarray, biases: np.ndarray) -> np.ndarray:
        """(B, D) unit queries and their (B, n) candidates' cosines and biases, ranked by cosine + bias
        (n <= top_k) -> (B, n, F) features."""
        cos, bias = np.asarray(cosines, np.float64), np.asarray(biases, np.float64)
        score = cos + bias
        n = score.shape[1]
        other = np.repeat(score[:, :1], n, axis=1)  # the first, for every later candidate
        other[:, 0] = score[:, 1] if n > 1 else score[:, 0]  # the second, for the first
        to_mean = np.asarray(queries, np.float64) @ self.center  # (B,)
        log_rank = np.log(np.arange(1, n + 1, dtype=np.float64))
        return np.stack(
            [cos, bias, score - other, np.repeat(to_mean[:, None], n, axis=1), np.broadcast_to(log_rank, score.shape)],
            axis=-1,
        )

    def probability(self, features: np.ndarray) -> np.ndarray:
        """(..., F) features -> (...) probabilities: what the fitted pipeline's predict_proba[:, 1] gives."""
        return expit(((np.asarray(features, np.float64) - self.mean) / self.scale) @ self.coef + self.intercept)

    def match_probability(self, queries: np.ndarray, cosines: np.ndarray, biases: np.ndarray) -> np.ndarray:
        """(B, D) queries and their (B, n) ranked candidates -> (B, n) match probabilities."""
        return self.probability(self.features(queries, cosines, biases))


def calibrations_of(model) -> dict[str, Calibration]:
    """The calibrators a model carries, by direction (none for models without: open_clip models,
    heads from before calibration existed)."""
    packed = model.calibration() if hasattr(model, "calibration") else {}
    return {direction: Calibration.unpack(v.detach().cpu().numpy()) for direction, v in packed.items()}
