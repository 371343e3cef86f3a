"""The geometry of the unit hypersphere and the ranking math on it, numpy in and out: safe
normalization, angles, geodesics (slerp, Karcher means), the embedding's diagnostics (alignment,
uniformity, modality gap) and the recall protocol over score matrices (`retrieval.sphere.recall`).
Everything above it (the model, the index, the server) speaks in these terms; it imports nothing
of the project but its errors."""
from retrieval.sphere.geometry import (alignment, angle_deg, diagnostics, is_unit_norm, l2_normalize, modality_gap, slerp,
                                       uniformity)
from retrieval.sphere.compose import karcher_mean

spherical_mean = karcher_mean  # the weighted Karcher mean (`retrieval.sphere.compose`), by its older name

__all__ = ["alignment", "angle_deg", "diagnostics", "is_unit_norm", "l2_normalize", "modality_gap", "slerp",
           "karcher_mean", "spherical_mean", "uniformity"]
