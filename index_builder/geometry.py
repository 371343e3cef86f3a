"""The sphere's geometry of a version, measured by the builder from the vectors it indexes and written
into the manifest's `geometry` object (served by GetIndexInfo and as Prometheus gauges):

- alignment: mean squared distance between each caption and its image (Wang & Isola, 2020; lower: closer);
- uniformity per modality: log E exp(-2 |x - y|^2) over pairs of items (lower: more spread);
- modality gap: the distance between the two modalities' mean vectors (Liang et al., 2022);
- hubness per modality: the skew of the 10-occurrence distribution of the images under caption
  queries and of the captions under image queries, by cosine (Radovanovic et al., 2010).

Everything streams the builder's blocks; only samples are held. Queries (and the caption-image pairs
of the alignment) are an even sample of at most `max_queries` items per modality, uniformity at most
4,000 items: the manifest says how many were used, and `sampled` when not all were.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

from retrieval.sphere import alignment, hubness, uniformity

Blocks = Callable[[], Iterator[tuple[np.ndarray, np.ndarray]]]  # a fresh pass of (ids (n,), unit vectors (n, D))

K = 10
MAX_QUERIES = 5000


def _sample(blocks: Blocks, n: int, want: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, vectors) of about `want` items spread evenly over the stream (deterministic)."""
    step = max(1, -(-n // max(1, want)))
    ids, vecs, seen = [], [], 0
    for block_ids, block in blocks():
        rows = np.arange((-seen) % step, len(block), step)
        ids.append(np.asarray(block_ids)[rows])
        vecs.append(block[rows])
        seen += len(block)
    return np.concatenate(ids), np.concatenate(vecs).astype(np.float32)


def _mean_and_rows(blocks: Blocks, wanted: set[int]) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """The mean vector of the stream and the vectors of the `wanted` ids."""
    total, n, rows = 0.0, 0, {}
    for ids, block in blocks():
        total = total + block.astype(np.float64).sum(0)
        n += len(block)
        for r in np.flatnonzero(np.isin(ids, list(wanted))) if wanted else []:
            rows[int(ids[r])] = block[r]
    return total / max(n, 1), rows


def version_geometry(
    images: Blocks,
    n_images: int,
    texts: Blocks,
    n_texts: int,
    caption_image: dict[int, int],
    max_queries: int = MAX_QUERIES,
    k: int = K,
) -> dict:
    """The manifest's `geometry` object; a metric that needs a modality (or caption-image pairs) the
    version lacks is null."""
    out: dict = dict.fromkeys(
        (
            "alignment",
            "uniformity_image",
            "uniformity_text",
            "modality_gap",
            "hubness_image",
            "hubness_text",
            "positive_angle_deg_mean",
        )
    )
    img_ids, img_q = _sample(images, n_images, max_queries) if n_images else (np.zeros(0, np.int64), None)
    txt_ids, txt_q = _sample(texts, n_texts, max_queries) if n_texts else (np.zeros(0, np.int64), None)
    if img_q is not None and len(img_q) > 1:
        out["uniformity_image"] = uniformity(img_q)
    if txt_q is not None and len(txt_q) > 1:
        out["uniformity_text"] = uniformity(txt_q)
    pairs = [(r, caption_image[int(t)]) for r, t in enumerate(txt_ids) if int(t) in caption_image]
    out.update(
        k=k,
        queries={"text": int(len(txt_ids)), "image": int(len(img_ids))},
        pairs=len(pairs),
        sampled=bool(len(img_ids) < n_images or len(txt_ids) < n_texts),
    )
    if not (n_images and n_texts):
        return out
    img_mean, paired = _mean_and_rows(images, {i for _, i in pairs})
    txt_mean, _ = _mean_and_rows(texts, set())
    out["modality_gap"] = float(np.linalg.norm(img_mean - txt_mean))
    if pairs:
        caps = txt_q[[r for r, _ in pairs]]
        imgs = np.stack([paired[i] for _, i in pairs]).astype(np.float32)
        out["alignment"] = alignment(imgs, caps)
        out["positive_angle_deg_mean"] = float(np.degrees(np.arccos(np.clip((imgs * caps).sum(1), -1, 1))).mean())
    if n_images > k:
        out["hubness_image"] = hubness(txt_q, (v for _, v in images()), k)
    if n_texts > k:
        out["hubness_text"] = hubness(img_q, (v for _, v in texts()), k)
    return out
