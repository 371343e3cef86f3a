"""One build: collect the inputs, encode what is not encoded yet (resumable shards), assemble the
image and text indexes, write the metadata and the manifest, publish atomically.

    cfg = BuildConfig(out="indexes", dataset="../shared/datasets/flickr8k")
    manifest = build(cfg)                      # loads cfg.model
    manifest = build(cfg, loaded=(model, preprocess, tokenizer))   # a model already in memory
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from index_builder import faiss_index, incremental, ivf_ondisk
from index_builder.attributes import assemble
from index_builder.encode import ShardStore
from index_builder.geometry import version_geometry
from index_builder.indexes import plan, write_indexes
from index_builder.publish import TMP_PREFIX, WORK_PREFIX, RootLock, new_temp_dir, next_version, publish
from index_builder.sources import Collection, collect
from retrieval.embedding.factory import DEFAULT_MODEL
from retrieval.embedding.querybank import querybank_of
from retrieval.encoding.bulk import IMAGE_BATCH, default_workers
from retrieval.errors import DatasetError
from retrieval.store.layout import (
    FORMAT,
    MANIFEST,
    META,
    MODEL_FILE,
    sha256_file,
)
from retrieval.store.schema import same_metadata, write_metadata

log = logging.getLogger(__name__)


@dataclass
class BuildConfig:
    out: str
    images: str | None = None
    captions: str | None = None
    attributes: str | None = None
    dataset: str | None = None
    split: str | None = None
    uri_prefix: str = ""
    model: str = DEFAULT_MODEL
    index_factory: str | None = None
    on_disk: bool = False
    incremental: bool = False
    keep: int = 3
    shard_size: int = 4096
    batch_size: int = IMAGE_BATCH
    text_batch_size: int = 256
    workers: int | None = None
    recall_queries: int = 500
    progress: bool = True
    ray: str | None = None

    def validate(self) -> None:
        for name in ("keep", "shard_size", "batch_size", "text_batch_size", "recall_queries"):
            if getattr(self, name) < 1:
                raise DatasetError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.workers is not None and self.workers < 0:
            raise DatasetError(f"--workers must be 0 or more, got {self.workers}")
        if self.ray is not None:
            import index_builder.ray_encode  # noqa: F401  (without Ray installed: one clear error, before any work)


def _skipped_rows(pairs) -> list[dict]:
    return [{"item": item, "reason": reason} for item, reason in pairs]


def build(cfg: BuildConfig, loaded=None) -> dict:
    """Build and publish a new version under cfg.out; returns its manifest."""
    started = time.perf_counter()
    cfg.validate()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    root = Path(cfg.out)
    coll = collect(cfg.images, cfg.captions, cfg.dataset, cfg.split, cfg.progress, cfg.uri_prefix)
    workers = default_workers() if cfg.workers is None else cfg.workers
    with RootLock(root):
        for stale in root.glob(f"{TMP_PREFIX}*"):  # a killed build's unfinished version: garbage
            shutil.rmtree(stale, ignore_errors=True)
        if loaded is None:
            from retrieval.embedding.factory import create_model

            loaded = create_model(cfg.model)
        model, preprocess, tokenizer = loaded
        fingerprint, dim = model.fingerprint(), int(model.embed_dim)
        if cfg.index_factory:
            faiss_index.make_index(dim + 1, cfg.index_factory)  # a bad factory string fails now, not after encoding
            if cfg.on_disk:
                ivf_ondisk.check_factory(cfg.index_factory, dim + 1)
        base = incremental.base_version(root, cfg.incremental, fingerprint)
        ray = None
        try:
            if cfg.ray is not None:
                from index_builder.ray_encode import RayEncoder

                ray = RayEncoder(cfg.ray, _model_spec(cfg.model), fingerprint, progress=cfg.progress)
            return _build_locked(cfg, root, coll, loaded, fingerprint, dim, base, workers, started, ray)
        finally:
            if ray is not None:
                ray.close()
            if base is not None:
                base.close()


def _build_locked(cfg, root, coll: Collection, loaded, fingerprint, dim, base, workers, started, ray=None) -> dict:
    """`ray`: a `ray_encode.RayEncoder` that encodes on a Ray cluster instead of in this process."""
    model, preprocess, tokenizer = loaded
    work = root / f"{WORK_PREFIX}{fingerprint}"
    images, bad = incremental.images(cfg, coll, model, preprocess, base, ShardStore(work / "images", dim), workers, ray)
    by_key = {it.key: it for it in images.items}
    texts = incremental.captions(cfg, coll, model, tokenizer, base, ShardStore(work / "texts", dim), by_key, ray)
    counts = {"images_found": len(coll.images), "texts_found": len(coll.texts), **images.counts, **texts.counts}
    # an image that is skipped takes its captions with it
    dropped = Counter(t.image_key for t in coll.texts if t.image_key is not None and t.image_key not in by_key)
    skipped = [
        (item, f"{why}; its {dropped[item]} caption(s) are skipped too" if item in dropped else why)
        for item, why in [*coll.skipped, *bad]
    ]
    if not images.items and not texts.items:
        raise DatasetError(
            f"nothing could be indexed: all {len(coll.images)} image(s) failed to decode and there are "
            f"no captions; first problem: {skipped[0][1] if skipped else '?'}"
        )

    def text_rows():
        for t in texts.items:
            image = by_key[t.image_key] if t.image_key else None
            yield t, (image.id if image else None), (image.uri if image else t.image_ref)

    attrs, attr_skipped = assemble(images.items, texts.items, coll.text_attrs, cfg.attributes)
    skipped += attr_skipped
    sizes = {"image": len(images.items), "text": len(texts.items)}
    on_disk_of, factory_of = plan(sizes, cfg.on_disk, cfg.index_factory, dim)
    if (
        base is not None
        and base.manifest.raw.get("index_factory") == factory_of
        and same_metadata(base.path / META, images.items, text_rows(), attrs.rows())
    ):
        shutil.rmtree(work, ignore_errors=True)
        log.info(
            "the index is up to date: %s already holds these %d image(s) and %d caption(s); nothing published",
            base.name,
            len(images.items),
            len(texts.items),
        )
        return {**base.manifest.raw, "up_to_date": True}

    name = next_version(root)
    tmp = new_temp_dir(root)
    bank = querybank_of(model)
    vectors = {"image": images.vectors, "text": texts.vectors}
    written = write_indexes(vectors, on_disk_of, factory_of, bank, dim, tmp, work, cfg.recall_queries)
    write_metadata(tmp / META, images.items, text_rows(), attrs.rows())
    geometry = version_geometry(
        vectors["image"].blocks,
        vectors["image"].count,
        vectors["text"].blocks,
        vectors["text"].count,
        {t.id: image_id for t, image_id, _ in text_rows() if image_id is not None},
    )
    model_files = _copy_model_file(cfg.model, tmp)
    counts["skipped"] = len(skipped)
    manifest = {
        "format": FORMAT,
        "version": name,
        "model": model_files[0] if model_files else cfg.model,
        "fingerprint": fingerprint,
        "dim": dim,
        "metric": "inner_product",
        "querybank": bank.info(),
        "num_images": len(images.items),
        "num_texts": len(texts.items),
        "filter_fields": attrs.fields,
        "index_factory": written.factories,
        "index_type": written.types,
        "storage": written.storage,
        "recall_at_10": {m: r["recall_at_10"] for m, r in written.recalls.items()},
        "recall": written.recalls,
        "geometry": geometry,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "build_seconds": None,
        "sources": coll.sources,
        "incremental": {"base": base.name} if base else None,
        "report": {
            "counts": counts,
            "skipped": _skipped_rows(skipped),
            "encode": {
                "images_per_second": round(images.stats.per_second, 2),
                "captions_per_second": round(texts.stats.per_second, 2),
                "workers": workers,
                "streams": images.stats.streams,
                "shards_written": len(images.stats.shards) + len(texts.stats.shards),
            },
            "config": asdict(cfg),
        },
        "files": {f: sha256_file(tmp / f) for f in sorted([*written.files, META, *model_files])},
    }
    manifest["build_seconds"] = round(time.perf_counter() - started, 2)
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    publish(root, tmp, name, cfg.keep)
    shutil.rmtree(work, ignore_errors=True)  # its vectors are in the version now
    return manifest


def _copy_model_file(name: str, version_dir: Path) -> list[str]:
    """A checkpoint-file model is copied into the version, which the manifest then names it by (a
    server reads no model file from outside the version); a registered name needs no file."""
    if name.startswith("open_clip:") or not Path(name).is_file():
        return []
    shutil.copyfile(name, version_dir / MODEL_FILE)
    return [MODEL_FILE]


def _model_spec(name: str) -> str:
    """What create_model needs on another machine or process to give the same model back: a
    checkpoint as an absolute path (on a shared filesystem, for a cluster), any other name as is."""
    path = Path(name)
    return str(path.resolve()) if not name.startswith("open_clip:") and path.is_file() else name
