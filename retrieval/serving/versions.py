"""The index version being served and the model that matches it, with hot swaps to newly
published versions.

`live()` is a snapshot (`Live`: an index version and the encoder that matches it) that a request
keeps from encoding to metadata, so a swap in the middle never mixes versions; the old version
stays alive until its last request lets go of it. The model is the server's --model, else the one
the version's manifest names; a version that fails to load (fingerprint, checksum, manifest) is
rejected, logged once and retried only when its files change, while the previous one goes on
serving.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path

from retrieval.embedding.checkpoint import load_checkpoint
from retrieval.embedding.factory import list_models
from retrieval.errors import FingerprintMismatchError, IndexUnavailableError, RetrievalError
from retrieval.serving.config import Limits
from retrieval.serving.encoder import Encoder, cached_model
from retrieval.store.layout import CHECKPOINT_SUFFIX, read_current, version_signature
from retrieval.store.reader import IndexVersion

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Live:
    index: IndexVersion
    encoder: Encoder


class Versions:
    """The live version under `root` and its encoder. `load()` once, then `poll_once()`
    periodically to hot-swap."""

    def __init__(
        self,
        root: Path,
        limits: Limits,
        executor: Executor | None = None,
        model: str | None = None,
        model_loader: Callable[[str], tuple] = cached_model,
        verify: bool = True,
        on_batch: Callable[[str, int], None] | None = None,
        on_swap: Callable[[IndexVersion], None] | None = None,
        on_reject: Callable[[str, str], None] | None = None,
    ):
        self.root, self.limits, self.executor = root, limits, executor
        self.model_override, self.model_loader, self.verify = model, model_loader, verify
        self.on_batch, self.on_swap, self.on_reject = on_batch, on_swap, on_reject
        self._live: Live | None = None
        self._encoders: dict[str, Encoder] = {}
        # the last version that failed to load, the signature of its files then, and why: retried
        # (and logged) only once its files change
        self._rejected: tuple[str, tuple, str] | None = None

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
                    f"or serve the model the index names"
                )
            if encoder.dim != index.dim:
                raise FingerprintMismatchError(
                    f"index {index.name} has dimension {index.dim}, model '{encoder.name}' {encoder.dim}"
                )
        except BaseException:
            index.close()
            raise
        return Live(index, encoder)

    def _swap(self, live: Live) -> None:
        old, self._live = self._live, live
        log.info(
            "serving index version %s (%d images, %d texts, model %s)",
            live.index.name,
            live.index.count("image"),
            live.index.count("text"),
            live.encoder.name,
        )
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
            log.error(
                "not swapping to index version %s: %s (retried when its files change)",
                name,
                e,
                exc_info=not isinstance(e, RetrievalError),
            )
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
            raise IndexUnavailableError(
                "no index version is published yet; the server serves the first one an "
                "`index-builder build` publishes under its index root"
            )
        return live

    @property
    def rejected(self) -> tuple[str, str] | None:
        """(version, why) of the last version that failed to load, while it is not retried."""
        return (self._rejected[0], self._rejected[2]) if self._rejected else None
