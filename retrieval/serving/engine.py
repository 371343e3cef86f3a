"""The search engine behind the server: the model and the live index version, with queries
encoded through micro-batchers and hot swaps to newly published versions. No gRPC in here.

A request takes one snapshot (`Live`: an index version and the encoder that matches it) and
uses it from encoding to metadata, so a swap in the middle never mixes versions; the old
version stays alive until its last request lets go of it.

Every request's cost is bounded before its work starts: its size against `Limits`, the largest
reply it could produce against the reply size the server may send, and each image's pixels (see
`retrieval.encoding.images.load_image`). A request may carry an `alive` callable (its caller still waits):
once it says no, the request's work stops before the next decode, encode or search.
"""
from __future__ import annotations

import asyncio
import logging
import weakref
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from retrieval.embedding.calibration import Calibration, direction_of
from retrieval.embedding.checkpoint import load_checkpoint
from retrieval.embedding.factory import list_models
from retrieval.errors import (BatchItemError, FingerprintMismatchError, IndexUnavailableError, InvalidInputError,
                              RetrievalError)
from retrieval.hits import Hit, Modality, hits_from_rows, reply_bytes, result_bytes
from retrieval.serving.batcher import Alive, ensure_alive
from retrieval.serving.confidence import applicable, calibrated_hits
from retrieval.serving.config import Limits
from retrieval.serving.encoder import Encoder, cached_model
from retrieval.serving.validation import Query, QueryInput, Validator, query_modality
from retrieval.store.layout import CHECKPOINT_SUFFIX, list_versions, read_current, version_signature
from retrieval.store.reader import IndexVersion

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Live:
    index: IndexVersion
    encoder: Encoder


class Engine:
    """Model + live index under `root`. `load()` once, then `poll_once()` periodically to hot-swap."""

    def __init__(self, root: str | Path, limits: Limits = Limits(), executor: Executor | None = None,
                 model: str | None = None, model_loader: Callable[[str], tuple] = cached_model, verify: bool = True,
                 on_batch: Callable[[str, int], None] | None = None,
                 on_swap: Callable[[IndexVersion], None] | None = None,
                 on_reject: Callable[[str, str], None] | None = None):
        self.root, self.limits, self.executor = Path(root), limits, executor
        self.checks = Validator(limits)
        self.model_override, self.model_loader, self.verify = model, model_loader, verify
        self.on_batch, self.on_swap, self.on_reject = on_batch, on_swap, on_reject
        self._result_bytes: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # version -> bound per modality
        self._live: Live | None = None
        self._encoders: dict[str, Encoder] = {}
        # the last version that failed to load, the signature of its files then, and why: retried
        # (and logged) only once its files change
        self._rejected: tuple[str, tuple, str] | None = None

    # -- loading and swapping -------------------------------------------------------------------
    def _encoder(self, name: str) -> Encoder:
        if name not in self._encoders:
            log.info("loading model %s", name)
            self._encoders = {name: Encoder(name, self.model_loader(name), self.limits, self.executor, self.on_batch)}
        return self._encoders[name]

    def _open(self, version: str | None = None) -> Live:
        """The version and its encoder. The model is the server's --model, else the one the
        manifest names (a registered model or a checkpoint inside the version: `model_source`),
        unless the live encoder already has the fingerprint the version was built with."""
        index = IndexVersion.open(self.root, version, verify=self.verify)
        try:
            live = self._live
            if self.model_override:
                encoder = self._encoder(self.model_override)
            elif live is not None and live.encoder.fingerprint == index.fingerprint:
                # the live weights are the ones this version was built with: nothing to build, but
                # a checkpoint file the version names must still be one (read as data, never run)
                source = index.model_source(list_models())
                if source.endswith(CHECKPOINT_SUFFIX):
                    load_checkpoint(source)
                encoder = live.encoder
            else:
                encoder = self._encoder(index.model_source(list_models()))
            if encoder.fingerprint != index.fingerprint:
                raise FingerprintMismatchError(
                    f"index {index.name} was built with model '{index.model}' (fingerprint {index.fingerprint}), but "
                    f"the model loaded here, '{encoder.name}', has fingerprint {encoder.fingerprint}: its weights "
                    f"differ, so its queries would not match the stored vectors. Rebuild the index with this model, "
                    f"or serve the model the index names")
            if encoder.dim != index.dim:
                raise FingerprintMismatchError(f"index {index.name} has dimension {index.dim}, model '{encoder.name}' "
                                               f"{encoder.dim}")
        except BaseException:
            index.close()
            raise
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
        if name is None or (self._live is not None and self._live.index.name == name):
            return False
        signature = await loop.run_in_executor(self.executor, version_signature, self.root, name)
        if self._rejected is not None and self._rejected[:2] == (name, signature):
            return False  # rejected as it is now: retried once its files change
        try:
            live = await loop.run_in_executor(self.executor, self._open, name)
        except Exception as e:  # noqa: BLE001 - keep serving the previous version
            reason = self._reason(e)
            self._rejected = (name, signature, reason)
            log.error("not swapping to index version %s: %s (retried when its files change)", name, e,
                      exc_info=not isinstance(e, RetrievalError))
            if self.on_reject:
                self.on_reject(name, reason)
            return False
        self._rejected = None
        self._swap(live)
        return True

    def _reason(self, error: Exception) -> str:
        """Why a version was rejected, as clients may read it: paths relative to the index root."""
        if not isinstance(error, RetrievalError):
            return f"unexpected {type(error).__name__} while loading it (see the server log)"
        message = str(error)
        for root in {str(self.root.resolve()), str(self.root)}:
            message = message.replace(root.rstrip("/") + "/", "")
        return message

    @property
    def ready(self) -> bool:
        return self._live is not None

    def live(self) -> Live:
        live = self._live
        if live is None:  # clients learn nothing of the host: the index root is in the server's log
            raise IndexUnavailableError("no index version is published yet; the server serves the first one an "
                                        "`index-builder build` publishes under its index root")
        return live

    async def reply_bytes(self, index: IndexVersion, asks: list[tuple[Modality, int]]) -> int:
        """Most bytes the reply to searches (target, k) of `index` can take: each answered with at
        most min(k, gallery size) results, none larger than the version's longest stored strings
        make one (measured once per version, off the event loop)."""
        per_result = self._result_bytes.get(index)
        if per_result is None:
            per_result = await asyncio.get_running_loop().run_in_executor(
                self.executor, lambda: {t: result_bytes(index.longest_strings(t)) for t in ("image", "text")})
            self._result_bytes[index] = per_result
        return reply_bytes([(min(k, index.count(t)), per_result[t]) for t, k in asks], index.name)

    async def check_reply(self, index: IndexVersion, asks: list[tuple[Modality, int]]) -> None:
        """Refuses searches whose reply could exceed the largest message the server may send,
        before any work (rather than failing the reply after all of it)."""
        limit = self.limits.max_reply_bytes
        if limit is not None and (size := await self.reply_bytes(index, asks)) > limit:
            raise InvalidInputError(f"the reply could take up to {size:,} bytes, over the server's limit of {limit:,} "
                                    f"bytes per message: ask for fewer results (k) or send fewer queries per call")

    # -- the operations -----------------------------------------------------------------------------
    async def embed(self, query: str | bytes, live: Live | None = None, alive: Alive | None = None) -> np.ndarray:
        live = live or self.live()
        if isinstance(query, str):
            return await live.encoder.embed_text(self.checks.check_text(query), alive)
        if not query:
            raise InvalidInputError("image bytes are empty")
        return await live.encoder.embed_image(bytes(query), alive)

    async def search(self, query: QueryInput, target: Modality | None = None, k: int = 10,
                     min_score: float | None = None, source: Modality | None = None,
                     min_probability: float | None = None, alive: Alive | None = None) -> tuple[list[Hit], str]:
        """Top-k hits of `target` for one query and the index version that answered. `source` is
        what a raw embedding encodes, if known (texts and image bytes are known). Text <-> image
        hits of a calibrated model carry match probabilities; `min_probability` drops those below
        it (`retrieval.serving.confidence`). `alive`: see the module's docstring."""
        target = self.checks.validate(query, target, k, min_score, source, min_probability)
        live = self.live()
        await self.check_reply(live.index, [(target, k)])
        return await self._search(live, query, target, k, min_score, source, min_probability, alive=alive)

    async def search_many(self, queries: list[Query], alive: Alive | None = None) -> list[tuple[list[Hit], str]]:
        """Several searches against one index version. All are validated, and the reply's size
        bounded, before any runs; a failing search fails the call with BatchItemError naming its
        position, and stops the others."""
        targets = []
        for i, query in enumerate(queries):
            try:
                targets.append(self.checks.validate(*query))
            except InvalidInputError as e:
                raise BatchItemError(i, e) from e
        live = self.live()
        await self.check_reply(live.index, [(t, q[2]) for t, q in zip(targets, queries)])

        async def one(i: int, target: Modality, query: Query):
            try:
                return await self._search(live, query[0], target, *query[2:], alive=alive)
            except Exception as e:  # noqa: BLE001 - named by its position, mapped to a status by the caller
                raise BatchItemError(i, e) from e

        tasks = [asyncio.ensure_future(one(i, t, q)) for i, (t, q) in enumerate(zip(targets, queries))]
        try:
            return await asyncio.gather(*tasks)
        finally:
            for task in tasks:  # after a failure or a cancellation, the others' answers are not wanted
                task.cancel()

    async def _search(self, live: Live, query: QueryInput, target: Modality, k: int, min_score: float | None,
                      source: Modality | None, min_probability: float | None = None, *,
                      alive: Alive | None) -> tuple[list[Hit], str]:
        if isinstance(query, np.ndarray):
            vector = self.checks.check_embedding(query, live.index.dim)
        else:
            vector = await self.embed(query, live, alive)
        ensure_alive(alive)
        # text -> image and image -> text rank with the inverted softmax's bias; same-modal searches
        # and embeddings of unknown modality by the plain cosine
        source = query_modality(query, source)
        cross_modal = source is not None and source != target
        calibration = applicable(live.encoder.calibrations.get(direction_of(source, target)) if cross_modal else None,
                                 min_probability)
        hits = await asyncio.get_running_loop().run_in_executor(
            self.executor, self._lookup, live.index, target, vector, k, min_score, cross_modal, calibration,
            min_probability)
        return hits, live.index.name

    @staticmethod
    def _lookup(index: IndexVersion, target: Modality, vector: np.ndarray, k: int, min_score: float | None,
                cross_modal: bool, calibration: Calibration | None = None,
                min_probability: float | None = None) -> list[Hit]:
        if calibration is not None:
            return calibrated_hits(index, target, vector, k, min_score, calibration, min_probability)
        scores, ids = index.search(target, vector[None, :], k, cross_modal=cross_modal)  # cosines, ranked
        return hits_from_rows(target, scores[0], ids[0], index.metadata(target, ids[0]), min_score)

    def info(self) -> dict:
        live = self.live()
        idx = live.index
        return {"version": idx.name, "model": idx.model, "model_fingerprint": idx.fingerprint, "dim": idx.dim,
                "image_count": idx.count("image"), "text_count": idx.count("text"),
                "available_versions": list_versions(self.root), "calibrated": bool(live.encoder.calibrations),
                "rejected_version": self._rejected[0] if self._rejected else "",
                "rejected_reason": self._rejected[2] if self._rejected else ""}

