"""The 1K-test retrieval protocol over score matrices, numpy in and out.

Text-to-image R@K: a caption is found when its own image is among the top K images.
Image-to-text R@K: an image is found when any of its captions is among the top K captions.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def recall_at_k(
    image_vecs: np.ndarray, text_vecs: np.ndarray, caption_image: np.ndarray, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """image_vecs (N, D), text_vecs (C, D) unit rows; caption_image (C,) owner image index.
    Returns percentages t2i_R@K, i2t_R@K and their mean `mean_R`. A tie counts for the query."""
    sims = text_vecs @ image_vecs.T  # (C, N)
    return recall_from_scores(sims, sims.T, caption_image, ks)


def recall_from_scores(
    t2i: np.ndarray, i2t: np.ndarray, caption_image: np.ndarray, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """The same protocol over any scores: t2i (C, N) ranks images for each caption, i2t (N, C)
    ranks captions for each image (equal to t2i.T for plain cosine; query-time corrections make
    the two directions differ)."""
    caption_image = np.asarray(caption_image)
    rows = np.arange(len(caption_image))
    own = t2i[rows, caption_image]  # (C,)
    t2i_rank = (t2i > own[:, None]).sum(axis=1)  # (C,) images ranked above
    # for each caption, its rank among all captions for its own image
    own_i2t = i2t[caption_image, rows]  # (C,)
    cap_rank = (i2t[caption_image] > own_i2t[:, None]).sum(axis=1)  # (C,)
    i2t_rank = np.full(i2t.shape[0], np.iinfo(np.int64).max)
    np.minimum.at(i2t_rank, caption_image, cap_rank)
    out: dict[str, float] = {}
    for k in ks:
        out[f"t2i_R@{k}"] = float(100 * np.mean(t2i_rank < k))
    for k in ks:
        out[f"i2t_R@{k}"] = float(100 * np.mean(i2t_rank < k))
    out["mean_R"] = float(np.mean([out[f"t2i_R@{k}"] for k in ks] + [out[f"i2t_R@{k}"] for k in ks]))
    return out
