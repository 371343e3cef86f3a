"""The 1K-test retrieval protocol and the geometry of the sphere.

Text-to-image R@K: a caption is found when its own image is among the top K images.
Image-to-text R@K: an image is found when any of its captions is among the top K captions.
Geometry: alignment and uniformity (Wang & Isola, 2020), modality gap (Liang et al., 2022).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from retrieval import sphere


def recall_at_k(image_vecs: np.ndarray, text_vecs: np.ndarray, caption_image: np.ndarray,
                ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """image_vecs (N, D), text_vecs (C, D) unit rows; caption_image (C,) owner image index.
    Returns percentages t2i_R@K, i2t_R@K and their mean `mean_R`. A tie counts for the query."""
    sims = text_vecs @ image_vecs.T                                      # (C, N)
    return recall_from_scores(sims, sims.T, caption_image, ks)


def recall_from_scores(t2i: np.ndarray, i2t: np.ndarray, caption_image: np.ndarray,
                       ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """The same protocol over any scores: t2i (C, N) ranks images for each caption, i2t (N, C)
    ranks captions for each image (equal to t2i.T for plain cosine; query-time corrections make
    the two directions differ)."""
    caption_image = np.asarray(caption_image)
    rows = np.arange(len(caption_image))
    own = t2i[rows, caption_image]                                       # (C,)
    t2i_rank = (t2i > own[:, None]).sum(axis=1)                          # (C,) images ranked above
    # for each caption, its rank among all captions for its own image
    own_i2t = i2t[caption_image, rows]                                   # (C,)
    cap_rank = (i2t[caption_image] > own_i2t[:, None]).sum(axis=1)       # (C,)
    i2t_rank = np.full(i2t.shape[0], np.iinfo(np.int64).max)
    np.minimum.at(i2t_rank, caption_image, cap_rank)
    out: dict[str, float] = {}
    for k in ks:
        out[f"t2i_R@{k}"] = float(100 * np.mean(t2i_rank < k))
    for k in ks:
        out[f"i2t_R@{k}"] = float(100 * np.mean(i2t_rank < k))
    out["mean_R"] = float(np.mean([out[f"t2i_R@{k}"] for k in ks] + [out[f"i2t_R@{k}"] for k in ks]))
    return out


def geometry(image_vecs: np.ndarray, text_vecs: np.ndarray, caption_image: np.ndarray) -> dict[str, float]:
    """Diagnostics of the embedding: how close positives are, how spread each modality is."""
    paired = image_vecs[caption_image]                                   # (C, D)
    pos_cos = np.sum(paired * text_vecs, axis=1)
    return {
        "alignment": sphere.alignment(paired, text_vecs),
        "uniformity_image": sphere.uniformity(image_vecs),
        "uniformity_text": sphere.uniformity(text_vecs),
        "modality_gap": sphere.modality_gap(image_vecs, text_vecs),
        "positive_cosine_mean": float(pos_cos.mean()),
        "positive_angle_deg_mean": float(sphere.angle_deg(pos_cos).mean()),
    }


def evaluate_model(model, preprocess, tokenizer, data: str, split: str = "test", *, workers: int | None = None,
                   progress: bool = True) -> dict:
    """Encode a split with the model's public encoders and score it as the service ranks (with the
    model's inverted softmax, if it has one), and with the plain cosine for comparison."""
    from retrieval.encoding.datasets import load_caption_dataset
    from retrieval.encoding.bulk import encode_image_files, encode_texts
    from retrieval.embedding.querybank import model_recall, querybank_of

    ds = load_caption_dataset(data, split)
    image_vecs, bad = encode_image_files(model, ds.image_paths(), preprocess, workers=workers,
                                         desc=f"{split} images", progress=progress)
    if bad:
        keep = np.array([i not in bad for i in range(len(ds.images))])
        image_vecs = image_vecs[keep]
        ds = ds.drop_images(bad)
    text_vecs = encode_texts(model, tokenizer, ds.captions, desc=f"{split} captions", progress=progress)
    assert sphere.is_unit_norm(image_vecs) and sphere.is_unit_norm(text_vecs), "encoders must return unit vectors"
    return {
        "model": getattr(model, "name", "?"), "fingerprint": model.fingerprint(),
        "data": str(data), "split": split, "images": len(ds.images), "captions": len(ds.captions),
        "skipped": [{"item": i, "reason": r} for i, r in ds.skipped],
        "recall": model_recall(model, image_vecs, text_vecs, ds.caption_image),
        "recall_plain_cosine": recall_at_k(image_vecs, text_vecs, ds.caption_image),
        "querybank": querybank_of(model).info(),
        "geometry": geometry(image_vecs, text_vecs, ds.caption_image),
    }


def _correction_note(result: dict) -> str:
    qb, plain = result["querybank"], result["recall_plain_cosine"]
    if qb["method"] == "none":
        return ""
    return (f" (with the {qb['method']}, beta {qb['beta']:g}, banks of {qb['text_bank']} captions / "
            f"{qb['image_bank']} images; plain cosine: R@1 {plain['t2i_R@1']:.1f} / {plain['i2t_R@1']:.1f})")


def format_report(result: dict) -> str:
    r, g = result["recall"], result["geometry"]
    lines = [f"{result['model']} on {result['data']} [{result['split']}]: {result['images']} images, "
             f"{result['captions']} captions, {len(result['skipped'])} skipped",
             "              R@1    R@5   R@10",
             f"text->image {r['t2i_R@1']:6.1f} {r['t2i_R@5']:6.1f} {r['t2i_R@10']:6.1f}",
             f"image->text {r['i2t_R@1']:6.1f} {r['i2t_R@5']:6.1f} {r['i2t_R@10']:6.1f}",
             f"mean recall {r['mean_R']:.2f}" + _correction_note(result),
             f"alignment {g['alignment']:.3f}  uniformity image {g['uniformity_image']:.3f} text {g['uniformity_text']:.3f}"
             f"  modality gap {g['modality_gap']:.3f}  positive pair angle {g['positive_angle_deg_mean']:.1f} deg"]
    lines += [f"skipped {s['item']}: {s['reason']}" for s in result["skipped"][:20]]
    return "\n".join(lines)
