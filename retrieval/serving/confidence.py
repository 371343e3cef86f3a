"""Match probabilities in a search (issue 15): a text <-> image search of a calibrated model scores
its candidates with the model's calibrator (`retrieval.embedding.calibration`; the scoring itself
is in `retrieval.serving.ranking.lookup`) and, when the request sets `min_probability`, drops the
results below it. The rules of the request live here."""

from __future__ import annotations

from retrieval.embedding.calibration import Calibration
from retrieval.errors import InvalidInputError
from retrieval.hits import Hit


def check_min_probability(min_probability: float | None) -> float | None:
    if min_probability is not None and not (0.0 <= min_probability <= 1.0):  # NaN fails both
        raise InvalidInputError(f"min_probability is a probability and must lie in [0, 1], got {min_probability}")
    return min_probability


def applicable(calibration: Calibration | None, min_probability: float | None) -> Calibration | None:
    """The calibrator a search uses; a `min_probability` without one is a client error (it would
    silently keep every result)."""
    if min_probability is not None and calibration is None:
        raise InvalidInputError(
            "min_probability applies to text -> image and image -> text searches of a calibrated "
            "model (IndexInfo.calibrated); this search has no match probabilities"
        )
    return calibration


def no_confident_match(hits: list[Hit], min_probability: float | None) -> bool:
    """min_probability was set and none of the top k reached it (the ones below are dropped, so
    no result is left)."""
    return min_probability is not None and not hits
