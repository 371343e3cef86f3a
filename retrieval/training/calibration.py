"""Fitting the match-probability calibrators (`retrieval.embedding.calibration`) on held-out pairs:
each query of a split (its captions for text -> image, its images for image -> text) against the
split's gallery, ranked as the service ranks (cosine + the inverted softmax's bias), its top-K
candidates labelled 1 when they are a true match (the caption's own image; one of the image's
captions). scikit-learn's StandardScaler + LogisticRegression (lbfgs: deterministic) fit them; only
their numbers are kept."""

from __future__ import annotations

import logging

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from retrieval.embedding.calibration import DIRECTIONS, FEATURES, TOP_K, Calibration
from retrieval.embedding.querybank import QueryBank, querybank_of
from retrieval.sphere import l2_normalize

log = logging.getLogger(__name__)


def ranked_candidates(
    queries: np.ndarray, gallery: np.ndarray, bias: np.ndarray, top_k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-k gallery rows per query by cosine + bias, as the index ranks: (cosines, biases, ids), (B, k)."""
    cos = queries @ gallery.T
    score = cos + bias[None, :]
    k = min(top_k, gallery.shape[0])
    ids = np.argsort(-score, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(cos, ids, 1), bias[ids], ids


def direction_data(
    direction: str,
    image_vecs: np.ndarray,
    text_vecs: np.ndarray,
    caption_image: np.ndarray,
    bank: QueryBank,
    top_k: int = TOP_K,
):
    """(queries, candidates' cosines, biases, labels, gallery mean direction) of one direction."""
    if direction == "t2i":
        queries, gallery, modality = text_vecs, image_vecs, "image"
    else:
        queries, gallery, modality = image_vecs, text_vecs, "text"
    cos, bias, ids = ranked_candidates(queries, gallery, bank.bias(gallery, modality), top_k)
    if direction == "t2i":
        labels = ids == caption_image[:, None]  # the caption's own image
    else:
        labels = caption_image[ids] == np.arange(len(ids))[:, None]  # one of the image's captions
    center = l2_normalize(gallery.astype(np.float64).mean(0, keepdims=True))[0]
    return queries, cos, bias, labels, center


def fit_pipeline(features: np.ndarray, labels: np.ndarray) -> Pipeline:
    """The fitted scikit-learn calibrator (rows of FEATURES -> P(true match))."""
    return make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=1000)).fit(features, labels)


def to_calibration(pipe: Pipeline, top_k: int, center: np.ndarray) -> Calibration:
    scaler, lr = pipe[0], pipe[-1]
    return Calibration(
        scaler.mean_.astype(np.float64),
        scaler.scale_.astype(np.float64),
        lr.coef_[0].astype(np.float64),
        float(lr.intercept_[0]),
        top_k,
        center,
    )


def fit_calibrations(
    image_vecs: np.ndarray, text_vecs: np.ndarray, caption_image: np.ndarray, bank: QueryBank, top_k: int = TOP_K
) -> tuple[dict[str, Calibration], dict]:
    """A calibrator per direction from one held-out split's vectors; and what the fit saw."""
    out, report = {}, {"top_k": top_k, "features": list(FEATURES)}
    for direction in DIRECTIONS:
        queries, cos, bias, labels, center = direction_data(
            direction, image_vecs, text_vecs, caption_image, bank, top_k
        )
        unfitted = Calibration(
            np.zeros(len(FEATURES)), np.ones(len(FEATURES)), np.zeros(len(FEATURES)), 0.0, top_k, center
        )
        x = unfitted.features(queries, cos, bias).reshape(-1, len(FEATURES))
        y = labels.reshape(-1).astype(np.int64)
        out[direction] = to_calibration(fit_pipeline(x, y), top_k, center)
        report[direction] = {
            "queries": len(queries),
            "pairs": len(y),
            "positives": int(y.sum()),
            "coef": dict(zip(FEATURES, np.round(out[direction].coef, 4).tolist())),
        }
        log.info(
            "calibration %s: %d queries, %d candidate pairs, %d true matches",
            direction,
            len(queries),
            len(y),
            int(y.sum()),
        )
    return out, report


def calibrate_model(
    model, image_vecs: np.ndarray, text_vecs: np.ndarray, caption_image: np.ndarray, top_k: int = TOP_K
) -> dict:
    """Fit on a held-out split's vectors (encoded by `model`, with its query bank) and store the
    calibrators in the model; returns the fit's report."""
    calibrations, report = fit_calibrations(image_vecs, text_vecs, caption_image, querybank_of(model), top_k)
    model.set_calibration({d: torch.from_numpy(c.pack()) for d, c in calibrations.items()})
    return report
