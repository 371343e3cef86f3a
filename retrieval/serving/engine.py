"""The search engine behind the server: the model and the live index version, with queries
encoded through micro-batchers and hot swaps to newly published versions. No gRPC in here.

A request takes one snapshot (`Live`: an index version and the encoder that matches it) and
uses it from encoding to metadata, so a swap in the middle never mixes versions; the old
version stays alive until its last request lets go of it.
"""
from __future__ import annotations

import asyncio
import functools
import logging
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Union

import numpy as np
import torch

from retrieval.serving.batcher import MicroBatcher
from retrieval.errors import (FingerprintMismatchError, IndexUnavailableError, InvalidInputError, RetrievalError)
from retrieval.encoding.bulk import input_size
from retrieval.hits import Hit
from retrieval.encoding.images import load_image, split_transform
from retrieval.store.reader import IndexVersion, list_versions, read_current
from retrieval.sphere import angle_deg

log = logging.getLogger("retrieval.serving.engine")
Modality = Literal["image", "text"]
QueryInput = Union[str, bytes, np.ndarray]  # text, image file bytes, or a raw embedding


@dataclass(frozen=True)
class Limits:
    max_k: int = 1000
    max_text_chars: int = 2000
    max_batch: int = 32          # text encoder micro-batch size (1 = unbatched)
    max_image_batch: int = 4     # image encoder's (on CPU, large image batches are slower per image)
    text_concurrency: int = 1    # text-encoder batches that may run at once
    image_concurrency: int = 2   # image-encoder batches that may run at once
    max_wait_s: float = 0.002    # how long the oldest queued item may wait for others


@functools.lru_cache(maxsize=2)
def cached_model(name: str, device: str = "cpu"):
    """(model, preprocess, tokenizer) for a model name or checkpoint on a torch device, loaded
    once per process."""
    from retrieval.embedding.factory import create_model

    return create_model(name, device=device)


class Encoder:
    """One model with its preprocessing and one micro-batcher per modality."""

    def __init__(self, name: str, bundle: tuple, limits: Limits, executor: Executor | None,
                 on_batch: Callable[[str, int], None] | None = None):
        self.name = name
        self.model, self.preprocess, self.tokenizer = bundle
        # as bulk encoding does: per-image steps in the request's thread, scaling and normalization
        # per batch on the model's device (uint8 pixels are a quarter of the bytes to move there)
        self.prepare_pixels, self.finish_batch = split_transform(self.preprocess)
        self.fingerprint = self.model.fingerprint()
        self.dim = int(self.model.embed_dim)
        self.device = next(self.model.parameters()).device  # inputs go there, vectors come back to the CPU
        self.image_size = input_size(self.model, self.preprocess)
        self.executor = executor
        hook = (lambda kind: (lambda n: on_batch(kind, n))) if on_batch else (lambda kind: None)
        self.text_batcher = MicroBatcher(self._encode_texts, limits.max_batch, limits.max_wait_s, executor, hook("text"),
                                         concurrency=limits.text_concurrency)
        self.image_batcher = MicroBatcher(self._encode_images, limits.max_image_batch, limits.max_wait_s, executor,
                                          hook("image"), concurrency=limits.image_concurrency)

    def _encode_texts(self, texts: list[str]) -> list[np.ndarray]:
        return list(self.model.encode_text(self.tokenizer(texts).to(self.device)).cpu().numpy())

    def _encode_images(self, pixels: list[torch.Tensor]) -> list[np.ndarray]:
        return list(self.model.encode_image(self.finish_batch(torch.stack(pixels).to(self.device))).cpu().numpy())

    def _prepare_image(self, data: bytes) -> torch.Tensor:
        # InvalidInputError when the bytes do not decode; decoded as the index builder does
        return self.prepare_pixels(load_image(data, min_side=self.image_size))

    async def embed_text(self, text: str) -> np.ndarray:
        return await self.text_batcher.submit(text)

    async def embed_image(self, data: bytes) -> np.ndarray:
        pixels = await asyncio.get_running_loop().run_in_executor(self.executor, self._prepare_image, data)
        return await self.image_batcher.submit(pixels)


@dataclass(frozen=True)
class Live:
    index: IndexVersion
    encoder: Encoder


class Engine:
    """Model + live index under `root`. `load()` once, then `poll_once()` periodically to hot-swap."""

    def __init__(self, root: str | Path, limits: Limits = Limits(), executor: Executor | None = None,
                 model: str | None = None, model_loader: Callable[[str], tuple] = cached_model, verify: bool = True,
                 on_batch: Callable[[str, int], None] | None = None, on_swap: Callable[[IndexVersion], None] | None = None):
        self.root, self.limits, self.executor = Path(root), limits, executor
        self.model_override, self.model_loader, self.verify = model, model_loader, verify
        self.on_batch, self.on_swap = on_batch, on_swap
        self._live: Live | None = None
        self._encoders: dict[str, Encoder] = {}
        self._rejected: set[str] = set()  # versions that failed to load: not retried every poll

    # -- loading and swapping -------------------------------------------------------------------
    def _encoder(self, name: str) -> Encoder:
        if name not in self._encoders:
            log.info("loading model %s", name)
            self._encoders = {name: Encoder(name, self.model_loader(name), self.limits, self.executor, self.on_batch)}
        return self._encoders[name]

    def _open(self, version: str | None = None) -> Live:
        index = IndexVersion.open(self.root, version, verify=self.verify)
        encoder = self._encoder(self.model_override or index.model)
        if encoder.fingerprint != index.fingerprint:
            raise FingerprintMismatchError(
                f"index {index.path} was built with model '{index.model}' (fingerprint {index.fingerprint}), but the "
                f"model loaded here, '{encoder.name}', has fingerprint {encoder.fingerprint}: its weights differ, so "
                f"its queries would not match the stored vectors. Rebuild the index with this model, or serve the "
                f"model the index names")
        if encoder.dim != index.dim:
            raise FingerprintMismatchError(f"index {index.path} has dimension {index.dim}, model '{encoder.name}' {encoder.dim}")
        return Live(index, encoder)

    def _swap(self, live: Live) -> None:
        old, self._live = self._live, live
        log.info("serving index version %s (%d images, %d texts, model %s)", live.index.name,
                 live.index.count("image"), live.index.count("text"), live.encoder.name)
        if self.on_swap:
            self.on_swap(live.index)
        del old  # in-flight requests keep their own reference until they finish

    def load(self) -> bool:
        """Load the CURRENT version (and its model) if one is published. Raises on a fingerprint
        mismatch or a corrupt version: the server must not start serving wrong answers."""
        if self.model_override:
            self._encoder(self.model_override)
        if read_current(self.root) is None:
            log.warning("no index version published under %s yet; waiting for one", self.root)
            return False
        self._swap(self._open())
        return True

    async def poll_once(self) -> bool:
        """Swap to the version CURRENT names if it changed; True when a swap happened."""
        loop = asyncio.get_running_loop()
        try:
            name = await loop.run_in_executor(self.executor, read_current, self.root)
        except RetrievalError as e:
            log.error("cannot read %s/CURRENT: %s", self.root, e)
            return False
        if name is None or name in self._rejected or (self._live is not None and self._live.index.name == name):
            return False
        try:
            live = await loop.run_in_executor(self.executor, self._open, name)
        except Exception as e:  # noqa: BLE001 - keep serving the previous version
            self._rejected.add(name)
            log.error("not swapping to index version %s: %s", name, e,
                      exc_info=not isinstance(e, RetrievalError))
            return False
        self._swap(live)
        return True

    @property
    def ready(self) -> bool:
        return self._live is not None

    def live(self) -> Live:
        live = self._live
        if live is None:
            raise IndexUnavailableError(f"no index version is published under '{self.root}' yet; "
                                        f"build one with `index-builder build --out {self.root} ...`")
        return live

    # -- validation ---------------------------------------------------------------------------------
    def check_text(self, text: str) -> str:
        if not text or not text.strip():
            raise InvalidInputError("text is empty")
        if len(text) > self.limits.max_text_chars:
            raise InvalidInputError(f"text has {len(text)} characters, over the limit of {self.limits.max_text_chars}")
        return text

    def check_k(self, k: int) -> int:
        if k <= 0 or k > self.limits.max_k:
            raise InvalidInputError(f"k must be between 1 and {self.limits.max_k}, got {k}")
        return k

    @staticmethod
    def check_embedding(values: np.ndarray, dim: int) -> np.ndarray:
        v = np.asarray(values, dtype=np.float32).reshape(-1)
        if v.shape[0] != dim:
            raise InvalidInputError(f"embedding has dimension {v.shape[0]}, the index expects {dim}")
        if not np.all(np.isfinite(v)):
            raise InvalidInputError("embedding has non-finite values")
        norm = float(np.linalg.norm(v))
        if norm < 1e-12:
            raise InvalidInputError("embedding has zero norm; it has no direction on the sphere")
        return v / norm

    @staticmethod
    def check_min_score(min_score: float | None) -> float | None:
        if min_score is not None and not (-1.0 <= min_score <= 1.0):
            raise InvalidInputError(f"min_score is a cosine and must lie in [-1, 1], got {min_score}")
        return min_score

    def validate(self, query: QueryInput, target: Modality | None, k: int, min_score: float | None,
                 source: Modality | None = None) -> Modality:
        """Checks what can be checked before any work; returns the gallery to search."""
        self.check_k(k)
        self.check_min_score(min_score)
        if target not in (None, "image", "text"):
            raise InvalidInputError(f"unknown target modality {target!r}")
        if source not in (None, "image", "text"):
            raise InvalidInputError(f"unknown embedding modality {source!r}")
        if isinstance(query, str):
            self.check_text(query)
            return target or "image"
        if isinstance(query, (bytes, bytearray)):
            if not query:
                raise InvalidInputError("image bytes are empty")
            return target or "text"
        if isinstance(query, np.ndarray):
            if target is None:
                raise InvalidInputError("a search by embedding must name its target modality (image or text)")
            return target
        raise InvalidInputError("query is empty: give a text, image bytes or an embedding")

    # -- the operations -----------------------------------------------------------------------------
    async def embed(self, query: str | bytes, live: Live | None = None) -> np.ndarray:
        live = live or self.live()
        if isinstance(query, str):
            return await live.encoder.embed_text(self.check_text(query))
        if not query:
            raise InvalidInputError("image bytes are empty")
        return await live.encoder.embed_image(bytes(query))

    async def search(self, query: QueryInput, target: Modality | None = None, k: int = 10,
                     min_score: float | None = None, source: Modality | None = None) -> tuple[list[Hit], str]:
        """Top-k hits of `target` for one query and the index version that answered. `source` is
        what a raw embedding encodes, if known (texts and image bytes are known)."""
        target = self.validate(query, target, k, min_score, source)
        live = self.live()
        if isinstance(query, np.ndarray):
            vector = self.check_embedding(query, live.index.dim)
        else:
            vector = await self.embed(query, live)
        # text -> image and image -> text rank with the inverted softmax's bias; same-modal searches
        # and embeddings of unknown modality by the plain cosine
        source = "text" if isinstance(query, str) else "image" if isinstance(query, (bytes, bytearray)) else source
        cross_modal = source is not None and source != target
        hits = await asyncio.get_running_loop().run_in_executor(
            self.executor, self._lookup, live.index, target, vector, k, min_score, cross_modal)
        return hits, live.index.name

    async def search_many(self, queries: list[tuple[QueryInput, Modality | None, int, float | None, Modality | None]]):
        """Several searches; all are validated before any runs (the first bad one is named)."""
        for i, query in enumerate(queries):
            try:
                self.validate(*query)
            except InvalidInputError as e:
                raise InvalidInputError(f"requests[{i}]: {e}") from None
        return await asyncio.gather(*(self.search(*q) for q in queries))

    @staticmethod
    def _lookup(index: IndexVersion, target: Modality, vector: np.ndarray, k: int, min_score: float | None,
                cross_modal: bool) -> list[Hit]:
        scores, ids = index.search(target, vector[None, :], k, cross_modal=cross_modal)  # cosines, ranked
        rows = index.metadata(target, ids[0])
        hits = []
        for score, id_, row in zip(scores[0].tolist(), ids[0].tolist(), rows):
            if id_ < 0 or row is None or (min_score is not None and score < min_score):
                continue
            extra = ({"uri": row.get("uri") or ""} if target == "image" else
                     {"caption": row.get("caption") or "", "image_id": int(row.get("image_id") or -1),
                      "image_uri": row.get("image_uri") or ""})
            hits.append(Hit(int(id_), float(score), float(angle_deg(score)), target, **extra))
        return hits

    def info(self) -> dict:
        live = self.live()
        idx = live.index
        return {"version": idx.name, "model": idx.model, "model_fingerprint": idx.fingerprint, "dim": idx.dim,
                "image_count": idx.count("image"), "text_count": idx.count("text"),
                "available_versions": list_versions(self.root)}

