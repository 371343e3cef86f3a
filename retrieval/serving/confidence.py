"""Match probabilities in a search (issue 15): a text <-> image search of a calibrated model scores
its candidates with the model's calibrator (`retrieval.embedding.calibration`) and, when the request
sets `min_probability`, drops the results below it. A search's results are its top k by the
index's ranking; the calibrator sees at least its top_k of them (the margin to the next results
needs them), so asking for fewer results costs no accuracy."""
from __future__ import annotations

import numpy as np

from retrieval.embedding.calibration import Calibration
from retrieval.errors import InvalidInputError
from retrieval.hits import Hit, Modality, hits_from_rows
from retrieval.store.reader import IndexVersion


def check_min_probability(min_probability: float | None) -> float | None:
    if min_probability is not None and not (0.0 <= min_probability <= 1.0):  # NaN fails both
        raise InvalidInputError(f"min_probability is a probability and must lie in [0, 1], got {min_probability}")
    return min_probability


def applicable(calibration: Calibration | None, min_probability: float | None) -> Calibration | None:
    """The calibrator a search uses; a `min_probability` without one is a client error (it would
    silently keep every result)."""
    if min_probability is not None and calibration is None:
        raise InvalidInputError("min_probability applies to text -> image and image -> text searches of a calibrated "
                                "model (IndexInfo.calibrated); this search has no match probabilities")
    return calibration


def calibrated_hits(index: IndexVersion, target: Modality, vector: np.ndarray, k: int, min_score: float | None,
                    calibration: Calibration, min_probability: float | None) -> list[Hit]:
    """The top-k of a cross-modal search with their match probabilities, less those under
    `min_probability` (and `min_score`)."""
    cos, bias, ids = index.search_with_bias(target, vector[None, :], max(k, calibration.top_k))
    n = int((ids[0] >= 0).sum())  # padding (fewer items than asked) comes last
    probs = calibration.match_probability(vector[None, :], cos[:, :n], bias[:, :n])[0][:k]
    hits = hits_from_rows(target, cos[0, :k], ids[0, :k], index.metadata(target, ids[0, :k]), min_score, probs)
    return [h for h in hits if min_probability is None or h.match_probability >= min_probability]


def no_confident_match(hits: list[Hit], min_probability: float | None) -> bool:
    """min_probability was set and none of the top k reached it (the ones below are dropped, so
    no result is left)."""
    return min_probability is not None and not hits


