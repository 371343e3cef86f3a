"""Fitting a model's query bank for the inverted softmax (`retrieval.embedding.querybank`): banks of
random projected training queries and the beta with the best dev recall."""

from __future__ import annotations

import logging

import numpy as np

from retrieval.embedding.querybank import QueryBank, corrected_recall

log = logging.getLogger(__name__)
BETAS = (2.5, 5.0, 10.0, 20.0, 30.0, 50.0)  # beta 0 (no correction) is always a candidate too


def fit_querybank(
    text_queries: np.ndarray,
    image_queries: np.ndarray,
    dev_images: np.ndarray,
    dev_texts: np.ndarray,
    dev_caption_image: np.ndarray,
    size: int,
    seed: int = 0,
    betas: tuple[float, ...] = BETAS,
) -> tuple[QueryBank, dict]:
    """Banks of `size` random training queries per modality (unit rows) and the beta with the best
    dev R@1 mean (0, no correction, when none beats it). Returns the bank and the dev scores."""
    rng = np.random.default_rng(seed)
    text, image = (
        q[np.sort(rng.choice(len(q), min(size, len(q)), replace=False))] for q in (text_queries, image_queries)
    )
    scores = {}
    for beta in (0.0, *betas):
        r = corrected_recall(dev_images, dev_texts, dev_caption_image, QueryBank(text, image, beta))
        scores[beta] = (r["t2i_R@1"] + r["i2t_R@1"]) / 2
    best = max(scores, key=lambda b: (scores[b], -b))
    log.info(
        "query bank: %d captions, %d images; beta %g (dev R@1 mean %.2f, %.2f without)",
        len(text),
        len(image),
        best,
        scores[best],
        scores[0.0],
    )
    return QueryBank(text, image, best), {
        "beta": best,
        "text_bank": len(text),
        "image_bank": len(image),
        "dev_R@1_mean_by_beta": {str(b): round(s, 2) for b, s in scores.items()},
    }
