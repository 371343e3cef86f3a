"""The asyncio client (grpc.aio): the methods of `RetrievalClient`, as coroutines. Every call carries a
deadline (`timeout` seconds, per client or per call);
errors arrive as `grpc.aio.AioRpcError` with the server's status code and message."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from retrieval.client.base import Call, ClientBase, SearchAnswer, TermValue, WalkStep, search_request
from retrieval.hits import Hit, ItemRef
from retrieval.pb import retrieval_pb2 as pb
from retrieval.pb import retrieval_pb2_grpc as pb_grpc


class AsyncRetrievalClient(ClientBase):
    """grpc.aio client: one channel, many concurrent calls on one event loop."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.channel = (
            grpc.aio.secure_channel(self.address, self.credentials, self.options)
            if self.credentials
            else grpc.aio.insecure_channel(self.address, self.options)
        )
        self.stub = pb_grpc.RetrievalServiceStub(self.channel)

    async def _send(self, call: Call, timeout: float | None) -> Any:
        stub_method = getattr(self.stub, call.method)
        reply = await stub_method(call.request, timeout=self._deadline(timeout), metadata=self.metadata)
        return call.parse(reply)

    async def search(self, request: pb.SearchRequest, timeout: float | None = None) -> list[Hit]:
        return await self._send(self._search_call(request), timeout)

    async def search_text(
        self,
        text: str,
        k: int = 10,
        target: str | None = None,
        min_score: float | None = None,
        timeout: float | None = None,
        **options: Any,
    ) -> list[Hit]:
        """`options`: the keywords of `search_request` that shape results (max_angle_deg, diversity,
        dedup_angle_deg, filters, min_probability, page_size, page_token)."""
        return await self.search(search_request(text=text, target=target, k=k, min_score=min_score, **options), timeout)

    async def search_image(
        self,
        image: bytes | str | Path,
        k: int = 10,
        target: str | None = None,
        min_score: float | None = None,
        timeout: float | None = None,
        **options: Any,
    ) -> list[Hit]:
        """`options`: as for `search_text`."""
        return await self.search(
            search_request(image=image, target=target, k=k, min_score=min_score, **options), timeout
        )

    async def search_embedding(
        self,
        embedding,
        target: str,
        k: int = 10,
        min_score: float | None = None,
        timeout: float | None = None,
        modality: str | None = None,
        **options: Any,
    ) -> list[Hit]:
        """`modality`: what the embedding encodes ("text" or "image"), to rank as that query would;
        `options`: as for `search_text`."""
        request = search_request(
            embedding=embedding, target=target, k=k, min_score=min_score, embedding_modality=modality, **options
        )
        return await self.search(request, timeout)

    async def search_composed(
        self,
        terms: Sequence[TermValue],
        target: str | None = None,
        k: int = 10,
        combine: str = "geodesic",
        min_score: float | None = None,
        timeout: float | None = None,
        **options: Any,
    ) -> list[Hit]:
        """A composed query: terms are values (weight 1) or (value, weight); a str is a text, bytes or a
        Path an image, an array an embedding, an ItemRef a stored item; weights < 0 push the query away.
        `options`: as for `search_text`."""
        request = search_request(terms=terms, combine=combine, target=target, k=k, min_score=min_score, **options)
        return await self.search(request, timeout)

    async def more_like_this(
        self,
        item_id: int,
        gallery: str,
        k: int = 10,
        target: str | None = None,
        min_score: float | None = None,
        timeout: float | None = None,
        **options: Any,
    ) -> list[Hit]:
        """The nearest items to a stored one (of `gallery`; by default in that gallery), without it.
        `options`: as for `search_text`."""
        request = search_request(item=ItemRef(item_id, gallery), target=target, k=k, min_score=min_score, **options)
        return await self.search(request, timeout)

    async def search_page(self, request: pb.SearchRequest, timeout: float | None = None) -> tuple[list[Hit], str]:
        """One page of a paged search (request.page_size set): its hits and the next page's token, "" after
        the last; set request.page_token to it for the next page."""
        return await self._send(self._search_page_call(request), timeout)

    async def search_with_info(self, request: pb.SearchRequest, timeout: float | None = None) -> SearchAnswer:
        """`search` with the whole reply: the results, the index version, no_confident_match."""
        return await self._send(self._search_answer_call(request), timeout)

    async def batch_search(self, requests: Sequence[pb.SearchRequest], timeout: float | None = None) -> list[list[Hit]]:
        return await self._send(self._batch_search_call(requests), timeout)

    async def walk(
        self,
        start: TermValue,
        end: TermValue,
        steps: int,
        k: int = 5,
        target: str | None = None,
        timeout: float | None = None,
    ) -> AsyncIterator[WalkStep]:
        """The steps of a path from `start` to `end` on the sphere, as the server streams them."""
        call = self._walk_call(start, end, steps, k, target)
        stream = self.stub.Walk(call.request, timeout=self._deadline(timeout), metadata=self.metadata)
        async for reply in stream:
            yield call.parse(reply)

    async def embed_text(self, text: str, timeout: float | None = None) -> np.ndarray:
        return await self._send(self._embed_call(text=text), timeout)

    async def embed_image(self, image: bytes | str | Path, timeout: float | None = None) -> np.ndarray:
        return await self._send(self._embed_call(image=image), timeout)

    async def index_info(self, timeout: float | None = None) -> pb.IndexInfo:
        return await self._send(self._index_info_call(), timeout)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncRetrievalClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
