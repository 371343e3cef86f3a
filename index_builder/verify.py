"""Is a published index consistent with its model? Encode a caption-dataset split with the model
(the query vectors a server would make), search the version's indexes restricted to that split's
ids as the server does (cross-modal, so with the inverted softmax's biases), and score recall@K
with the protocol `retrieval eval` applies to the model's own vectors (`querybank.model_recall`:
cosine plus the model's correction). For an exact (Flat)
index both must agree, whether the index holds the split or the whole dataset.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from index_builder.sources import from_dataset
from retrieval.embedding.querybank import model_recall
from retrieval.encoding.bulk import encode_image_files, encode_texts
from retrieval.errors import FingerprintMismatchError
from retrieval.store.reader import IndexVersion

KS = (1, 5, 10)


def index_recall(
    root: str | Path, data: str | Path, split: str, loaded, *, workers: int | None = None, progress: bool = False
) -> dict:
    """{"index": recall through the index, "model": recall_at_k on the model's vectors, "max_abs_diff": ...}."""
    model, preprocess, tokenizer = loaded
    version = IndexVersion.open(root)
    try:
        if version.fingerprint != model.fingerprint():
            raise FingerprintMismatchError(
                f"{version.name} was built with fingerprint {version.fingerprint}, this model is {model.fingerprint()}"
            )
        coll = from_dataset(Path(data), split, progress=progress)
        image_vecs, bad = encode_image_files(
            model, [it.path for it in coll.images], preprocess, workers=workers, progress=progress
        )
        keep = [i for i in range(len(coll.images)) if i not in bad]
        images = [coll.images[i] for i in keep]
        image_vecs = image_vecs[keep]
        row_of = {it.key: r for r, it in enumerate(images)}
        texts = [t for t in coll.texts if t.image_key in row_of]
        text_vecs = encode_texts(model, tokenizer, [t.caption for t in texts], progress=progress)
        owner = np.array([row_of[t.image_key] for t in texts], np.int64)
        expected = model_recall(model, image_vecs, text_vecs, owner)

        image_ids = np.array([it.id for it in images], np.int64)
        text_ids = np.array([t.id for t in texts], np.int64)
        k = max(KS)
        _, found_images = version.search("image", text_vecs, k, cross_modal=True, allowed=image_ids)  # (C, k) image ids
        t2i_rank = np.argmax(
            np.concatenate([found_images == image_ids[owner][:, None], np.ones((len(texts), 1), bool)], axis=1), axis=1
        )
        _, found_texts = version.search("text", image_vecs, k, cross_modal=True, allowed=text_ids)  # (N, k) caption ids
        text_owner = {int(i): image_ids[o] for i, o in zip(text_ids, owner)}
        hit = np.array([[text_owner.get(int(t), -1) == image_ids[r] for t in row] for r, row in enumerate(found_texts)])
        i2t_rank = np.argmax(np.concatenate([hit, np.ones((len(images), 1), bool)], axis=1), axis=1)
        got = {}
        for kk in KS:
            got[f"t2i_R@{kk}"] = float(100 * np.mean(t2i_rank < kk))
        for kk in KS:
            got[f"i2t_R@{kk}"] = float(100 * np.mean(i2t_rank < kk))
        got["mean_R"] = float(np.mean([got[f"t2i_R@{kk}"] for kk in KS] + [got[f"i2t_R@{kk}"] for kk in KS]))
        return {
            "version": version.name,
            "split": split,
            "images": len(images),
            "captions": len(texts),
            "index_factory": version.manifest.raw.get("index_factory"),
            "index": got,
            "model": expected,
            "max_abs_diff": max(abs(got[key] - expected[key]) for key in expected),
        }
    finally:
        version.close()
