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

import faiss
import numpy as np

from index_builder import faiss_index, ivf_ondisk
from index_builder.attributes import assemble
from index_builder.encode import ShardStore, encode_images, encode_texts
from index_builder.geometry import version_geometry
from index_builder.publish import TMP_PREFIX, WORK_PREFIX, RootLock, new_temp_dir, next_version, publish
from index_builder.sources import Collection, collect, stable_id
from retrieval.embedding.factory import DEFAULT_MODEL
from retrieval.embedding.querybank import QueryBank, querybank_of
from retrieval.encoding.bulk import IMAGE_BATCH, default_workers
from retrieval.errors import DatasetError, FingerprintMismatchError, IndexFormatError
from retrieval.sphere import is_unit_norm
from retrieval.store.layout import (
    FORMAT,
    INDEX_FILES,
    MANIFEST,
    META,
    MODEL_FILE,
    STORAGE_MEMORY,
    STORAGE_MMAP,
    read_current,
    sha256_file,
)
from retrieval.store.reader import IndexVersion
from retrieval.store.schema import read_hashes, same_metadata, write_metadata
from retrieval.store.vectors import query_rows, reconstruct, with_bias

log = logging.getLogger(__name__)

BLOCK = 8192


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


@dataclass
class _Modality:
    """What one modality's index is made of: ids reused from the base version, ids whose vector
    is in the shard store under their content hash."""

    reuse: list[int]
    need: dict[str, list[int]]  # sha256 -> ids
    store: ShardStore
    base_index: faiss.Index | None

    @property
    def count(self) -> int:
        return len(self.reuse) + sum(len(v) for v in self.need.values())

    def blocks(self):
        """(ids, unit embeddings (n, D)) of every item, reused ones first."""
        for start in range(0, len(self.reuse), BLOCK):
            ids = np.asarray(self.reuse[start : start + BLOCK], np.int64)
            yield ids, reconstruct(self.base_index, ids)[:, :-1]  # the embedding without its bias
        emitted: set[str] = set()
        for shas, vecs in self.store.iter_vectors():
            rows, ids = [], []
            for r, sha in enumerate(shas.tolist()):
                if sha in self.need and sha not in emitted:
                    emitted.add(sha)
                    rows += [r] * len(self.need[sha])
                    ids += self.need[sha]
            if rows:
                yield np.asarray(ids, np.int64), vecs[rows]


def _base_version(root: Path, cfg: BuildConfig, fingerprint: str) -> IndexVersion | None:
    if not cfg.incremental:
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
        base = _base_version(root, cfg, fingerprint)
        ray = None
        try:
            if cfg.ray is not None:
                from index_builder.ray_encode import RayEncoder

                ray = RayEncoder(cfg.ray, _model_spec(cfg.model), fingerprint, progress=cfg.progress)
            return _build_locked(
                cfg, root, coll, model, preprocess, tokenizer, fingerprint, dim, base, workers, started, ray
            )
        finally:
            if ray is not None:
                ray.close()
            if base is not None:
                base.close()


def _build_locked(
    cfg, root, coll: Collection, model, preprocess, tokenizer, fingerprint, dim, base, workers, started, ray=None
) -> dict:
    """`ray`: a `ray_encode.RayEncoder` that encodes on a Ray cluster instead of in this process."""
    encode_img, encode_txt = (ray.images, ray.texts) if ray else (encode_images, encode_texts)
    work = root / f"{WORK_PREFIX}{fingerprint}"
    img_store, txt_store = ShardStore(work / "images", dim), ShardStore(work / "texts", dim)
    counts: dict[str, int] = {"images_found": len(coll.images), "texts_found": len(coll.texts)}
    skipped = list(coll.skipped)

    # -- images: reuse unchanged ones, resume from shards, encode the rest ------------------------
    base_images = _reusable(base, "image", "images")
    reuse_img = [it for it in coll.images if base_images.get(it.id) == it.sha256]
    fresh_img = [it for it in coll.images if base_images.get(it.id) != it.sha256]
    done, failed = img_store.scan()
    counts["images_resumed"] = sum(1 for it in fresh_img if it.sha256 in done or it.sha256 in failed)
    todo = list(
        {
            it.sha256: (it.sha256, it.path) for it in fresh_img if it.sha256 not in done and it.sha256 not in failed
        }.values()
    )
    log.info(
        "images: %d reused from %s, %d already encoded in %s, %d to encode",
        len(reuse_img),
        base.name if base else "-",
        counts["images_resumed"],
        work.name,
        len(todo),
    )
    img_stats = encode_img(
        model,
        preprocess,
        img_store,
        todo,
        batch_size=cfg.batch_size,
        workers=workers,
        shard_size=cfg.shard_size,
        progress=cfg.progress,
    )
    done, failed = img_store.scan()
    bad_img = [it for it in fresh_img if it.sha256 in failed]
    skipped += [(it.key, failed[it.sha256]) for it in bad_img]
    kept_img = reuse_img + [it for it in fresh_img if it.sha256 in done]
    kept_img.sort(key=lambda it: it.key)
    by_key = {it.key: it for it in kept_img}
    counts.update(
        images_reused=len(reuse_img),
        images_encoded=img_stats.items,
        images_skipped=len(bad_img),
        images_indexed=len(kept_img),
    )

    # -- captions: drop those of images that were skipped (not read or not decoded) -----------------
    texts = [t for t in coll.texts if t.image_key is None or t.image_key in by_key]
    counts["texts_dropped_with_bad_image"] = len(coll.texts) - len(texts)
    dropped = Counter(t.image_key for t in coll.texts if t.image_key is not None and t.image_key not in by_key)
    skipped = [
        (item, f"{why}; its {dropped[item]} caption(s) are skipped too" if item in dropped else why)
        for item, why in skipped
    ]
    base_texts = _reusable(base, "text", "texts")
    reuse_txt = [t for t in texts if base_texts.get(t.id) == t.sha256]
    fresh_txt = [t for t in texts if base_texts.get(t.id) != t.sha256]
    done_t, _ = txt_store.scan()
    counts["texts_resumed"] = sum(1 for t in fresh_txt if t.sha256 in done_t)
    todo_t = list({t.sha256: (t.sha256, t.caption) for t in fresh_txt if t.sha256 not in done_t}.values())
    log.info(
        "captions: %d reused, %d already encoded, %d distinct to encode",
        len(reuse_txt),
        counts["texts_resumed"],
        len(todo_t),
    )
    txt_stats = encode_txt(
        model,
        tokenizer,
        txt_store,
        todo_t,
        batch_size=cfg.text_batch_size,
        shard_size=cfg.shard_size,
        progress=cfg.progress,
    )
    counts.update(texts_reused=len(reuse_txt), texts_encoded=txt_stats.items, texts_indexed=len(texts))
    if not kept_img and not texts:
        raise DatasetError(
            f"nothing could be indexed: all {len(coll.images)} image(s) failed to decode and there are "
            f"no captions; first problem: {skipped[0][1] if skipped else '?'}"
        )

    def text_rows():
        for t in texts:
            image = by_key[t.image_key] if t.image_key else None
            yield t, (image.id if image else None), (image.uri if image else t.image_ref)

    attrs, attr_skipped = assemble(kept_img, texts, coll.text_attrs, cfg.attributes)
    skipped += attr_skipped
    counts_of = {"image": len(kept_img), "text": len(texts)}
    on_disk_of = {
        m: n > 0 and ivf_ondisk.wanted(cfg.on_disk, n, cfg.index_factory, dim + 1) for m, n in counts_of.items()
    }
    factory_of = {
        m: "Flat" if n == 0 else (cfg.index_factory or faiss_index.choose_factory(n, ivf=on_disk_of[m]))
        for m, n in counts_of.items()
    }
    if (
        base is not None
        and base.manifest.raw.get("index_factory") == factory_of
        and same_metadata(base.path / META, kept_img, text_rows(), attrs.rows())
    ):
        shutil.rmtree(work, ignore_errors=True)
        log.info(
            "the index is up to date: %s already holds these %d image(s) and %d caption(s); nothing published",
            base.name,
            len(kept_img),
            len(texts),
        )
        return {**base.manifest.raw, "up_to_date": True}

    # -- indexes -----------------------------------------------------------------------------------
    mods = {
        "image": _Modality(
            [it.id for it in reuse_img],
            _need(it for it in fresh_img if it.sha256 in done),
            img_store,
            base.indexes["image"] if base else None,
        ),
        "text": _Modality(
            [t.id for t in reuse_txt], _need(fresh_txt), txt_store, base.indexes["text"] if base else None
        ),
    }
    name = next_version(root)
    tmp = new_temp_dir(root)
    factories, recalls, types, storage, index_files = {}, {}, {}, {}, []
    bank = querybank_of(model)
    for modality, mod in mods.items():
        other_name = "text" if modality == "image" else "image"
        other = mods[other_name]
        on_disk, factory = on_disk_of[modality], factory_of[modality]
        log.info("building the %s index (%s%s) over %d vectors", modality, factory, ", on disk" * on_disk, mod.count)
        stored = _with_bias(mod.blocks, bank, modality)
        if on_disk:
            built = ivf_ondisk.build(
                stored, mod.count, dim + 1, factory, tmp, Path(INDEX_FILES[modality]).stem, work / f"ivf-{modality}"
            )
            index, files = built.index, built.files
        else:
            index, files = faiss_index.build_index(stored, mod.count, dim + 1, factory), [INDEX_FILES[modality]]
            faiss.write_index(index, str(tmp / INDEX_FILES[modality]))
        recall = faiss_index.recall_at_10(
            index,
            stored,
            {  # what cross-modal queries get, and in-collection ones
                "cross_modal": _query_sample(other, cfg.recall_queries, True),
                "same_modal": _query_sample(mod, cfg.recall_queries, False),
            },
        )
        recall["cross_modal"]["query_source"] = other_name
        recall["same_modal"]["query_source"] = f"{modality} (in-collection sample)"
        headline = recall["cross_modal"] if other.count else recall["same_modal"]
        factories[modality], types[modality] = factory, faiss_index.describe(index)
        recalls[modality] = {**headline, **recall}
        storage[modality], index_files = STORAGE_MMAP if on_disk else STORAGE_MEMORY, index_files + files
        del index
    write_metadata(tmp / META, kept_img, text_rows(), attrs.rows())
    geometry = version_geometry(
        mods["image"].blocks,
        mods["image"].count,
        mods["text"].blocks,
        mods["text"].count,
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
        "num_images": len(kept_img),
        "num_texts": len(texts),
        "filter_fields": attrs.fields,
        "index_factory": factories,
        "index_type": types,
        "storage": storage,
        "recall_at_10": {m: r["recall_at_10"] for m, r in recalls.items()},
        "recall": recalls,
        "geometry": geometry,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "build_seconds": None,
        "sources": coll.sources,
        "incremental": {"base": base.name} if base else None,
        "report": {
            "counts": counts,
            "skipped": _skipped_rows(skipped),
            "encode": {
                "images_per_second": round(img_stats.per_second, 2),
                "captions_per_second": round(txt_stats.per_second, 2),
                "workers": workers,
                "streams": img_stats.streams,
                "shards_written": len(img_stats.shards) + len(txt_stats.shards),
            },
            "config": asdict(cfg),
        },
        "files": {f: sha256_file(tmp / f) for f in sorted([*index_files, META, *model_files])},
    }
    manifest["build_seconds"] = round(time.perf_counter() - started, 2)
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    publish(root, tmp, name, cfg.keep)
    shutil.rmtree(root / f"{WORK_PREFIX}{fingerprint}", ignore_errors=True)  # its vectors are in the version now
    return manifest


def _with_bias(blocks, bank: QueryBank, modality: str):
    """A fresh pass of (ids, rows [g, b_g]): each embedding with its inverted-softmax bias.
    Biases are computed on the first pass over a block and kept (4 bytes an item): the index's
    training sample, its adds and the recall check each pass over the blocks, in the same order."""
    biases: list[np.ndarray] = []  # one (n,) array per block, in block order

    def stored():
        for i, (ids, vecs) in enumerate(blocks()):
            if i == len(biases):
                biases.append(bank.bias(vecs, modality))
            assert len(biases[i]) == len(ids), "blocks must come in the same order on every pass"
            yield ids, with_bias(vecs, biases[i])

    return stored


def _copy_model_file(name: str, version_dir: Path) -> list[str]:
    """A checkpoint-file model is copied into the version, which the manifest then names it by (a
    server reads no model file from outside the version); a registered name needs no file."""
    if name.startswith("open_clip:") or not Path(name).is_file():
        return []
    shutil.copyfile(name, version_dir / MODEL_FILE)
    return [MODEL_FILE]


def _query_sample(mod: _Modality, want: int, cross_modal: bool) -> np.ndarray:
    """About `want` query rows spread over the modality's items ([q, 1] for cross-modal, else [q, 0])."""
    if not mod.count:
        return np.zeros((0, 0), np.float32)
    return query_rows(faiss_index.sample(mod.blocks, mod.count, want), cross_modal=cross_modal)


def _need(items) -> dict[str, list[int]]:
    need: dict[str, list[int]] = {}
    for it in items:
        need.setdefault(it.sha256, []).append(it.id)
    return need


def stable_image_id(key: str) -> int:
    """The id an image with this collection key gets (relative path under --images / dataset images/)."""
    return stable_id("image", key)


def _model_spec(name: str) -> str:
    """What create_model needs on another machine or process to give the same model back: a
    checkpoint as an absolute path (on a shared filesystem, for a cluster), any other name as is."""
    path = Path(name)
    return str(path.resolve()) if not name.startswith("open_clip:") and path.is_file() else name
