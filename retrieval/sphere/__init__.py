"""The geometry of the unit hypersphere and the ranking math on it, numpy in and out: safe
normalization, angles, geodesics (slerp, Karcher means), the embedding's diagnostics (alignment,
uniformity, modality gap, hubness) and the recall protocol over score matrices (`retrieval.sphere.recall`).
Everything above it (the model, the index, the server) speaks in these terms; it imports nothing
of the project but its errors."""

from retrieval.sphere.compose import karcher_mean
from retrieval.sphere.geometry import (
    alignment,
    angle_deg,
    diagnostics,
    hubness,
    is_unit_norm,
    k_occurrence,
    l2_normalize,
    modality_gap,
    skewness,
    slerp,
    uniformity,
)

__all__ = [
    "alignment",
    "angle_deg",
    "diagnostics",
    "hubness",
    "is_unit_norm",
    "k_occurrence",
    "karcher_mean",
    "l2_normalize",
    "modality_gap",
    "skewness",
    "slerp",
    "uniformity",
]
