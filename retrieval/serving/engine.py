"""The search engine behind the server: searches, embeddings and walks over the live index
version, queries encoded through micro-batchers. No gRPC in here.

A request takes one snapshot (`Live`: an index version and the encoder that matches it; see
`retrieval.serving.versions`, which loads versions and hot-swaps them) and uses it from encoding to
metadata, so a swap in the middle never mixes versions.

Every request's cost is bounded before its work starts: its size against `Limits`, the largest
reply it could produce against the reply size the server may send, and each image's pixels (see
`retrieval.encoding.images.load_image`). A request may carry an `alive` callable (its caller still waits):
once it says no, the request's work stops before the next decode, encode or search.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor
from pathlib import Path

import numpy as np

from retrieval.embedding.calibration import direction_of
from retrieval.errors import BatchItemError, InvalidInputError
from retrieval.hits import Hit, Modality, reply_bytes, result_bytes
from retrieval.serving.batcher import Alive, ensure_alive
from retrieval.serving.confidence import applicable
from retrieval.serving.config import Limits
from retrieval.serving.encoder import cached_model
from retrieval.serving.pages import PageRequest, next_token, page_window
from retrieval.serving.queries import NO_OPTIONS, Options, Point, resolve
from retrieval.serving.ranking import lookup
from retrieval.serving.validation import Query, QueryInput, Validator
from retrieval.serving.versions import Live, Versions
from retrieval.sphere.compose import walk_points
from retrieval.store.attributes import Condition
from retrieval.store.layout import list_versions
from retrieval.store.reader import IndexVersion


class Engine:
    """Searches over the live index version (`retrieval.serving.versions`) under `root`. `load()`
    once, then `poll_once()` periodically to hot-swap."""

    def __init__(
        self,
        root: str | Path,
        limits: Limits | None = None,
        executor: Executor | None = None,
        model: str | None = None,
        model_loader: Callable[[str], tuple] = cached_model,
        verify: bool = True,
        on_batch: Callable[[str, int], None] | None = None,
        on_swap: Callable[[IndexVersion], None] | None = None,
        on_reject: Callable[[str, str], None] | None = None,
    ):
        limits = limits or Limits()
        self.root, self.limits, self.executor = Path(root), limits, executor
        self.checks = Validator(limits)
        self.versions = Versions(self.root, limits, executor, model, model_loader, verify, on_batch, on_swap, on_reject)
        self._result_bytes: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # version -> bound per modality

    def load(self) -> bool:
        return self.versions.load()

    async def poll_once(self) -> bool:
        return await self.versions.poll_once()

    @property
    def ready(self) -> bool:
        return self.versions.ready

    def live(self) -> Live:
        return self.versions.live()

    async def reply_bytes(self, index: IndexVersion, asks: list[tuple[Modality, int]]) -> int:
        """Most bytes the reply to searches (target, k) of `index` can take: each answered with at
        most min(k, gallery size) results, none larger than the version's longest stored strings
        make one (measured once per version, off the event loop)."""
        per_result = self._result_bytes.get(index)
        if per_result is None:
            per_result = await asyncio.get_running_loop().run_in_executor(
                self.executor, lambda: {t: result_bytes(index.longest_strings(t)) for t in ("image", "text")}
            )
            self._result_bytes[index] = per_result
        return reply_bytes([(min(k, index.count(t)), per_result[t]) for t, k in asks], index.name)

    async def check_reply(self, index: IndexVersion, asks: list[tuple[Modality, int]]) -> None:
        """Refuses searches whose reply could exceed the largest message the server may send,
        before any work (rather than failing the reply after all of it)."""
        limit = self.limits.max_reply_bytes
        if limit is not None and (size := await self.reply_bytes(index, asks)) > limit:
            raise InvalidInputError(
                f"the reply could take up to {size:,} bytes, over the server's limit of {limit:,} "
                f"bytes per message: ask for fewer results (k) or send fewer queries per call"
            )

    # -- the operations -----------------------------------------------------------------------------
    async def embed(self, query: str | bytes, live: Live | None = None, alive: Alive | None = None) -> np.ndarray:
        live = live or self.live()
        if isinstance(query, str):
            return await live.encoder.embed_text(self.checks.check_text(query), alive)
        if not query:
            raise InvalidInputError("image bytes are empty")
        return await live.encoder.embed_image(bytes(query), alive)

    async def search(
        self,
        query: QueryInput,
        target: Modality | None = None,
        k: int = 10,
        min_score: float | None = None,
        source: Modality | None = None,
        alive: Alive | None = None,
        options: Options = NO_OPTIONS,
        conditions: tuple[Condition, ...] = (),
    ) -> tuple[list[Hit], str]:
        """Top-k hits of `target` for one query and the index version that answered. `source` is
        what a raw embedding encodes, if known (texts and image bytes are known). `options`: a cap,
        diversity, dedup (`retrieval.serving.queries`). `conditions`: only items they all hold for
        are searched (`_allowed`). `alive`: see the module's docstring."""
        target = self.checks.validate(query, target, k, min_score, source, options)
        live = self.live()
        allowed = await self._allowed(live, target, conditions)
        await self.check_reply(live.index, [(target, k)])
        return await self._search(live, query, target, k, min_score, source, options, alive, allowed)

    async def search_page(
        self,
        query: QueryInput,
        target: Modality | None,
        k: int,
        min_score: float | None,
        source: Modality | None,
        page: PageRequest,
        alive: Alive | None = None,
        conditions: tuple[Condition, ...] = (),
        options: Options = NO_OPTIONS,
    ) -> tuple[list[Hit], str, str]:
        """One page of a search's ranking, its version and the next page's token ("" after the last):
        `retrieval.serving.pages`. The ranking is k deep when k is set (0: the server's max_k), and
        never deeper than the items that can match."""
        if not 0 < page.size <= self.limits.max_k:
            raise InvalidInputError(f"page_size must be between 1 and {self.limits.max_k}, got {page.size}")
        depth = self.checks.check_k(k) if k else self.limits.max_k
        target = self.checks.validate(query, target, depth, min_score, source, options)
        live = self.live()
        allowed = await self._allowed(live, target, conditions)
        depth = min(depth, live.index.count(target) if allowed is None else len(allowed))
        offset, fetch = page_window(page, live.index.name, max(depth, 1))
        await self.check_reply(live.index, [(target, page.size)])
        hits, version = await self._search(live, query, target, fetch, min_score, source, options, alive, allowed)
        hits = hits[offset:]
        return hits, version, next_token(page, version, len(hits), offset, fetch, depth)

    async def _allowed(self, live: Live, target: Modality, conditions: tuple[Condition, ...]) -> np.ndarray | None:
        """The ids a filtered search may return (checked against the version's fields before any
        encoding), or None without filters."""
        if not conditions:
            return None
        return await asyncio.get_running_loop().run_in_executor(self.executor, live.index.matching, target, conditions)

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
                return await self._search(live, query[0], target, *query[2:6], alive)
            except Exception as e:  # noqa: BLE001 - named by its position, mapped to a status by the caller
                raise BatchItemError(i, e) from e

        tasks = [asyncio.ensure_future(one(i, t, q)) for i, (t, q) in enumerate(zip(targets, queries))]
        try:
            return await asyncio.gather(*tasks)
        finally:
            for task in tasks:  # after a failure or a cancellation, the others' answers are not wanted
                task.cancel()

    async def _resolve(self, live: Live, query: QueryInput, source: Modality | None, alive: Alive | None) -> Point:
        """The query's point on the sphere, its modality and the items it excludes."""
        point = await resolve(
            query,
            source,
            live.index,
            lambda q: self.embed(q, live, alive),
            lambda v: self.checks.check_embedding(v, live.index.dim),
        )
        ensure_alive(alive)
        return point

    async def _rank(
        self,
        live: Live,
        point: Point,
        target: Modality,
        k: int,
        min_score: float | None,
        options: Options,
        allowed: np.ndarray | None = None,
    ) -> list[Hit]:
        # text -> image and image -> text rank with the inverted softmax's bias; same-modal searches
        # and queries of unknown modality by the plain cosine
        cross_modal = point.modality is not None and point.modality != target
        calibration = live.encoder.calibrations.get(direction_of(point.modality, target)) if cross_modal else None
        calibration = applicable(calibration, options.min_probability)  # match probabilities of this search
        return await asyncio.get_running_loop().run_in_executor(
            self.executor,
            lookup,
            live.index,
            target,
            point,
            k,
            min_score,
            cross_modal,
            options,
            self.limits.rerank_pool,
            allowed,
            calibration,
        )

    async def _search(
        self,
        live: Live,
        query: QueryInput,
        target: Modality,
        k: int,
        min_score: float | None,
        source: Modality | None,
        options: Options,
        alive: Alive | None,
        allowed: np.ndarray | None = None,
    ) -> tuple[list[Hit], str]:
        point = await self._resolve(live, query, source, alive)
        return await self._rank(live, point, target, k, min_score, options, allowed), live.index.name

    async def walk(
        self,
        start: tuple[QueryInput, Modality | None],
        end: tuple[QueryInput, Modality | None],
        target: Modality | None,
        steps: int,
        k: int,
        alive: Alive | None = None,
    ) -> AsyncIterator[tuple[int, float, float, list[Hit], str]]:
        """A path from `start` to `end` (each a query and its declared modality) along their great
        circle in `steps` points (slerp, equal angles): (step, t, angle from start in degrees, the
        step's top k without the items an earlier step sent, version) for each. The ends' own stored
        items are excluded. Cross-modal ranking applies when both ends are of the other modality
        than `target`. All is checked, and the reply bounded, before any work."""
        if not 2 <= steps <= self.limits.max_walk_steps:
            raise InvalidInputError(f"steps must be between 2 and {self.limits.max_walk_steps}, got {steps}")
        self.checks.check_k(k)
        if steps * k > self.limits.max_k:
            raise InvalidInputError(
                f"a walk of {steps} steps of k={k} could stream {steps * k} results, over the "
                f"limit of {self.limits.max_k} (the server's max k)"
            )
        targets = {self.checks.check_query(q, target, s) for q, s in (start, end)}
        if target is None and len(targets) > 1:
            raise InvalidInputError("the walk's ends default to different galleries: name the target")
        target = target or targets.pop()
        live = self.live()
        await self.check_reply(live.index, [(target, k)])
        a = await self._resolve(live, *start, alive)
        b = await self._resolve(live, *end, alive)
        points, ts, angles = walk_points(a.vector, b.vector, steps)
        modality = a.modality if a.modality == b.modality else None
        seen: set[int] = {i for p in (a, b) for i in p.exclude.get(target, ())}
        for step, (vector, t, angle) in enumerate(zip(points, ts, angles)):
            ensure_alive(alive)
            point = Point(vector, modality, {target: set(seen)})
            hits = await self._rank(live, point, target, k, None, NO_OPTIONS)
            seen.update(h.id for h in hits)
            yield step, float(t), float(angle), hits, live.index.name

    def info(self) -> dict:
        live, rejected = self.live(), self.versions.rejected
        idx = live.index
        return {
            "version": idx.name,
            "model": idx.model,
            "model_fingerprint": idx.fingerprint,
            "dim": idx.dim,
            "image_count": idx.count("image"),
            "text_count": idx.count("text"),
            "available_versions": list_versions(self.root),
            "filter_fields": sorted(idx.filter_fields),
            "calibrated": bool(live.encoder.calibrations),
            "rejected_version": rejected[0] if rejected else "",
            "rejected_reason": rejected[1] if rejected else "",
            "geometry": idx.manifest.geometry,
        }  # None for versions built before geometry was measured
