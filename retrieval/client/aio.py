"""The asyncio client (grpc.aio): the methods of `RetrievalClient`, as coroutines. Every call carries a
deadline (`timeout` seconds, per client or per call);
errors arrive as `grpc.aio.AioRpcError` with the server's status code and message."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import grpc
import numpy as np

from retrieval.client.base import Call, ClientBase, SearchAnswer, search_request
from retrieval.hits import Hit
from retrieval.pb import retrieval_pb2 as pb
from retrieval.pb import retrieval_pb2_grpc as pb_grpc


class AsyncRetrievalClient(ClientBase):
    """grpc.aio client: one channel, many concurrent calls on one event loop."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.channel = (grpc.aio.secure_channel(self.address, self.credentials, self.options) if self.credentials else
                        grpc.aio.insecure_channel(self.address, self.options))
        self.stub = pb_grpc.RetrievalServiceStub(self.channel)

    async def _send(self, call: Call, timeout: float | None) -> Any:
        stub_method = getattr(self.stub, call.method)
        reply = await stub_method(call.request, timeout=self._deadline(timeout), metadata=self.metadata)
        return call.parse(reply)

    async def search(self, request: pb.SearchRequest, timeout: float | None = None) -> list[Hit]:
        return await self._send(self._search_call(request), timeout)

    async def search_text(self, text: str, k: int = 10, target: str | None = None, min_score: float | None = None,
                    timeout: float | None = None,
                    min_probability: float | None = None) -> list[Hit]:
        return await self.search(search_request(text=text, target=target, k=k, min_score=min_score,
                                          min_probability=min_probability), timeout)

    async def search_image(self, image: bytes | str | Path, k: int = 10, target: str | None = None,
                     min_score: float | None = None, timeout: float | None = None,
                    min_probability: float | None = None) -> list[Hit]:
        return await self.search(search_request(image=image, target=target, k=k, min_score=min_score,
                                          min_probability=min_probability), timeout)

    async def search_embedding(self, embedding, target: str, k: int = 10, min_score: float | None = None,
                         timeout: float | None = None, modality: str | None = None,
                         min_probability: float | None = None) -> list[Hit]:
        """`modality`: what the embedding encodes ("text" or "image"), to rank as that query would."""
        return await self.search(search_request(embedding=embedding, target=target, k=k, min_score=min_score,
                                          embedding_modality=modality, min_probability=min_probability), timeout)

    async def search_with_info(self, request: pb.SearchRequest, timeout: float | None = None) -> SearchAnswer:
        """`search` with the whole reply: the results, the index version, no_confident_match."""
        return await self._send(self._search_answer_call(request), timeout)

    async def batch_search(self, requests: Sequence[pb.SearchRequest],
                           timeout: float | None = None) -> list[list[Hit]]:
        return await self._send(self._batch_search_call(requests), timeout)

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
