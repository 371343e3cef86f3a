"""`retrieval eval`'s workflow: encode a caption-dataset split with a model, score it with the recall
protocol (`retrieval.sphere.recall`) as the service ranks and by the plain cosine, and describe the
sphere's geometry (`retrieval.sphere.diagnostics`)."""

from __future__ import annotations

import numpy as np

from retrieval import sphere
from retrieval.sphere.recall import recall_at_k


def evaluate_model(
    model, preprocess, tokenizer, data: str, split: str = "test", *, workers: int | None = None, progress: bool = True
) -> dict:
    """Encode a split with the model's public encoders and score it as the service ranks (with the
    model's inverted softmax, if it has one), and with the plain cosine for comparison."""
    from retrieval.embedding.querybank import model_recall, querybank_of
    from retrieval.encoding.bulk import encode_image_files, encode_texts
    from retrieval.encoding.datasets import load_caption_dataset

    ds = load_caption_dataset(data, split)
    image_vecs, bad = encode_image_files(
        model, ds.image_paths(), preprocess, workers=workers, desc=f"{split} images", progress=progress
    )
    if bad:
        keep = np.array([i not in bad for i in range(len(ds.images))])
        image_vecs = image_vecs[keep]
        ds = ds.drop_images(bad)
    text_vecs = encode_texts(model, tokenizer, ds.captions, desc=f"{split} captions", progress=progress)
    assert sphere.is_unit_norm(image_vecs) and sphere.is_unit_norm(text_vecs), "encoders must return unit vectors"
    return {
        "model": getattr(model, "name", "?"),
        "fingerprint": model.fingerprint(),
        "data": str(data),
        "split": split,
        "images": len(ds.images),
        "captions": len(ds.captions),
        "skipped": [{"item": i, "reason": r} for i, r in ds.skipped],
        "recall": model_recall(model, image_vecs, text_vecs, ds.caption_image),
        "recall_plain_cosine": recall_at_k(image_vecs, text_vecs, ds.caption_image),
        "querybank": querybank_of(model).info(),
        "geometry": sphere.diagnostics(image_vecs, text_vecs, ds.caption_image),
    }


def _correction_note(result: dict) -> str:
    qb, plain = result["querybank"], result["recall_plain_cosine"]
    if qb["method"] == "none":
        return ""
    return (
        f" (with the {qb['method']}, beta {qb['beta']:g}, banks of {qb['text_bank']} captions / "
        f"{qb['image_bank']} images; plain cosine: R@1 {plain['t2i_R@1']:.1f} / {plain['i2t_R@1']:.1f})"
    )


def format_report(result: dict) -> str:
    r, g = result["recall"], result["geometry"]
    lines = [
        f"{result['model']} on {result['data']} [{result['split']}]: {result['images']} images, "
        f"{result['captions']} captions, {len(result['skipped'])} skipped",
        "              R@1    R@5   R@10",
        f"text->image {r['t2i_R@1']:6.1f} {r['t2i_R@5']:6.1f} {r['t2i_R@10']:6.1f}",
        f"image->text {r['i2t_R@1']:6.1f} {r['i2t_R@5']:6.1f} {r['i2t_R@10']:6.1f}",
        f"mean recall {r['mean_R']:.2f}" + _correction_note(result),
        f"alignment {g['alignment']:.3f}  uniformity image {g['uniformity_image']:.3f} text {g['uniformity_text']:.3f}"
        f"  modality gap {g['modality_gap']:.3f}  positive pair angle {g['positive_angle_deg_mean']:.1f} deg",
    ]
    lines += [f"skipped {s['item']}: {s['reason']}" for s in result["skipped"][:20]]
    return "\n".join(lines)
