"""What a build has of its vectors and what it must encode: items unchanged since the base
version (`--incremental`: same id, same content hash) are read back from its index, items in the
finished shards of a killed or earlier build (its work directory, by model fingerprint) are
resumed, and the rest is encoded, in this process or on a Ray cluster (`ray_encode`), into new
shards. Equal contents are encoded once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from index_builder import faiss_index
from index_builder.encode import EncodeStats, ShardStore, encode_images, encode_texts
from index_builder.indexes import Vectors, need_of
from index_builder.sources import Collection
from retrieval.errors import FingerprintMismatchError, IndexFormatError
from retrieval.sphere import is_unit_norm
from retrieval.store.layout import META, read_current
from retrieval.store.reader import IndexVersion
from retrieval.store.schema import read_hashes
from retrieval.store.vectors import reconstruct

log = logging.getLogger(__name__)


def base_version(root: Path, incremental: bool, fingerprint: str) -> IndexVersion | None:
    """The version an --incremental build starts from (the current one), or None to build everything."""
    if not incremental:
        return None
    if read_current(root) is None:
        log.warning("--incremental: nothing is published under %s yet; building everything", root)
        return None
    try:
        base = IndexVersion.open(root)
    except IndexFormatError as e:
        log.warning("--incremental: %s; building everything", e)
        return None
    if base.fingerprint != fingerprint:
        raise FingerprintMismatchError(
            f"--incremental: the current version {base.name} was built with model '{base.model}' "
            f"(fingerprint {base.fingerprint}), not this one ({fingerprint}); run a full build instead"
        )
    return base


def _reusable(base: IndexVersion | None, modality: str, table: str) -> dict[int, str]:
    """{id: sha256} of the base version whose vectors can be read back exactly."""
    if base is None or base.count(modality) == 0:
        return {}
    hashes = read_hashes(base.path / META, table)
    probe = np.asarray(list(hashes)[:64], np.int64)
    faiss_index.allow_reconstruct(base.indexes[modality])
    try:
        ok = is_unit_norm(reconstruct(base.indexes[modality], probe)[:, :-1])
    except RuntimeError:
        ok = False
    if not ok:
        log.warning("the %s index of %s cannot give back exact vectors; re-encoding all of it", modality, base.name)
        return {}
    return hashes


@dataclass
class Encoded:
    """One modality after the encode stage."""

    items: list  # what the version indexes (images sorted by key)
    vectors: Vectors
    stats: EncodeStats
    counts: dict[str, int]


def images(cfg, coll: Collection, model, preprocess, base, store: ShardStore, workers, ray):
    """(images, [(key, why) of those that failed]): unchanged ones reused from the base version,
    finished shards resumed, the rest encoded."""
    encode = ray.images if ray else encode_images
    known = _reusable(base, "image", "images")
    reuse = [it for it in coll.images if known.get(it.id) == it.sha256]
    fresh = [it for it in coll.images if known.get(it.id) != it.sha256]
    done, failed = store.scan()
    resumed = sum(1 for it in fresh if it.sha256 in done or it.sha256 in failed)
    todo = list(
        {it.sha256: (it.sha256, it.path) for it in fresh if it.sha256 not in done and it.sha256 not in failed}.values()
    )
    log.info(
        "images: %d reused from %s, %d already encoded in %s, %d to encode",
        len(reuse),
        base.name if base else "-",
        resumed,
        store.dir.parent.name,
        len(todo),
    )
    stats = encode(
        model,
        preprocess,
        store,
        todo,
        batch_size=cfg.batch_size,
        workers=workers,
        shard_size=cfg.shard_size,
        progress=cfg.progress,
    )
    done, failed = store.scan()
    bad = [it for it in fresh if it.sha256 in failed]
    kept = sorted(reuse + [it for it in fresh if it.sha256 in done], key=lambda it: it.key)
    counts = {
        "images_resumed": resumed,
        "images_reused": len(reuse),
        "images_encoded": stats.items,
        "images_skipped": len(bad),
        "images_indexed": len(kept),
    }
    base_index = base.indexes["image"] if base else None
    vectors = Vectors([it.id for it in reuse], need_of(it for it in fresh if it.sha256 in done), store, base_index)
    return Encoded(kept, vectors, stats, counts), [(it.key, failed[it.sha256]) for it in bad]


def captions(cfg, coll: Collection, model, tokenizer, base, store: ShardStore, indexed: dict, ray) -> Encoded:
    """The captions of indexed images (`indexed`: by key) and those of no image: unchanged ones
    reused from the base version, finished shards resumed, the rest encoded (each text once)."""
    encode = ray.texts if ray else encode_texts
    texts = [t for t in coll.texts if t.image_key is None or t.image_key in indexed]
    known = _reusable(base, "text", "texts")
    reuse = [t for t in texts if known.get(t.id) == t.sha256]
    fresh = [t for t in texts if known.get(t.id) != t.sha256]
    done, _ = store.scan()
    resumed = sum(1 for t in fresh if t.sha256 in done)
    todo = list({t.sha256: (t.sha256, t.caption) for t in fresh if t.sha256 not in done}.values())
    log.info("captions: %d reused, %d already encoded, %d distinct to encode", len(reuse), resumed, len(todo))
    stats = encode(
        model,
        tokenizer,
        store,
        todo,
        batch_size=cfg.text_batch_size,
        shard_size=cfg.shard_size,
        progress=cfg.progress,
    )
    counts = {
        "texts_dropped_with_bad_image": len(coll.texts) - len(texts),
        "texts_resumed": resumed,
        "texts_reused": len(reuse),
        "texts_encoded": stats.items,
        "texts_indexed": len(texts),
    }
    base_index = base.indexes["text"] if base else None
    return Encoded(texts, Vectors([t.id for t in reuse], need_of(fresh), store, base_index), stats, counts)
