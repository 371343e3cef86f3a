"""Clients of the retrieval service. Every call carries a deadline (`timeout` seconds, per client
or per call); errors arrive as `grpc.RpcError` with the server's status code and message.

    from retrieval.client import RetrievalClient
    with RetrievalClient("localhost:50051") as client:
        for r in client.search_text("a dog running on the beach", k=5):
            print(r.score, r.angle_deg, r.uri)

`AsyncRetrievalClient` has the same methods as coroutines (grpc.aio), for many concurrent calls.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import grpc
import numpy as np

from retrieval.hits import Hit
from retrieval.pb import retrieval_pb2 as pb
from retrieval.pb import retrieval_pb2_grpc as pb_grpc

DEFAULT_ADDRESS = "localhost:50051"
DEFAULT_TIMEOUT_S = 10.0
MiB = 1 << 20
_TARGETS = {None: pb.MODALITY_UNSPECIFIED, "image": pb.MODALITY_IMAGE, "text": pb.MODALITY_TEXT}
_MODALITY = {pb.MODALITY_IMAGE: "image", pb.MODALITY_TEXT: "text", pb.MODALITY_UNSPECIFIED: ""}


Result = Hit  # what the client returns: the engine's own result type


def _results(resp: pb.SearchResponse) -> list[Result]:
    return [Result(r.id, r.score, r.angle_deg, _MODALITY[r.modality], r.uri, r.caption, r.image_id, r.image_uri)
            for r in resp.results]


def _image_bytes(image: bytes | str | Path) -> bytes:
    return image if isinstance(image, (bytes, bytearray)) else Path(image).read_bytes()


def search_request(text: str | None = None, image: bytes | str | Path | None = None, embedding=None,
                   target: str | None = None, k: int = 10, min_score: float | None = None,
                   embedding_modality: str | None = None) -> pb.SearchRequest:
    """One query: exactly one of text, image (bytes or a path) or embedding; `embedding_modality`
    ("text" or "image", what the embedding encodes) makes it rank as that query would."""
    if sum(x is not None for x in (text, image, embedding)) != 1:
        raise ValueError("give exactly one of text, image or embedding")
    if text is not None:
        query = pb.Query(text=text)
    elif image is not None:
        query = pb.Query(image=_image_bytes(image))
    else:
        query = pb.Query(embedding=pb.Embedding(values=np.asarray(embedding, np.float32).reshape(-1).tolist(),
                                                modality=_TARGETS[embedding_modality]))
    req = pb.SearchRequest(query=query, target=_TARGETS[target], k=k)
    if min_score is not None:
        req.min_score = min_score
    return req


def _channel_args(token: str | None, tls_ca: str | bytes | None, max_message_mb: float):
    options = [("grpc.max_send_message_length", int(max_message_mb * MiB)),
               ("grpc.max_receive_message_length", int(max_message_mb * MiB))]
    metadata = (("authorization", f"Bearer {token}"),) if token else None
    creds = None
    if tls_ca is not None:
        ca = tls_ca if isinstance(tls_ca, bytes) else Path(tls_ca).read_bytes()
        creds = grpc.ssl_channel_credentials(root_certificates=ca)
    return options, metadata, creds


class RetrievalClient:
    """Blocking client; thread-safe (one channel, many threads)."""

    def __init__(self, address: str = DEFAULT_ADDRESS, timeout: float = DEFAULT_TIMEOUT_S, token: str | None = None,
                 tls_ca: str | bytes | None = None, max_message_mb: float = 20.0):
        options, self._metadata, creds = _channel_args(token, tls_ca, max_message_mb)
        self.address, self.timeout = address, timeout
        self.channel = (grpc.secure_channel(address, creds, options) if creds else
                        grpc.insecure_channel(address, options))
        self.stub = pb_grpc.RetrievalServiceStub(self.channel)

    def _call(self, method, request, timeout: float | None):
        return method(request, timeout=self.timeout if timeout is None else timeout, metadata=self._metadata)

    def search(self, request: pb.SearchRequest, timeout: float | None = None) -> list[Result]:
        return _results(self._call(self.stub.Search, request, timeout))

    def search_text(self, text: str, k: int = 10, target: str | None = None, min_score: float | None = None,
                    timeout: float | None = None) -> list[Result]:
        return self.search(search_request(text=text, target=target, k=k, min_score=min_score), timeout)

    def search_image(self, image: bytes | str | Path, k: int = 10, target: str | None = None,
                     min_score: float | None = None, timeout: float | None = None) -> list[Result]:
        return self.search(search_request(image=image, target=target, k=k, min_score=min_score), timeout)

    def search_embedding(self, embedding, target: str, k: int = 10, min_score: float | None = None,
                         timeout: float | None = None, modality: str | None = None) -> list[Result]:
        """`modality`: what the embedding encodes ("text" or "image"), to rank as that query would."""
        return self.search(search_request(embedding=embedding, target=target, k=k, min_score=min_score,
                                          embedding_modality=modality), timeout)

    def batch_search(self, requests: Sequence[pb.SearchRequest], timeout: float | None = None) -> list[list[Result]]:
        resp = self._call(self.stub.BatchSearch, pb.BatchSearchRequest(requests=list(requests)), timeout)
        return [_results(r) for r in resp.responses]

    def embed_text(self, text: str, timeout: float | None = None) -> np.ndarray:
        return np.asarray(self._call(self.stub.Embed, pb.EmbedRequest(text=text), timeout).embedding.values, np.float32)

    def embed_image(self, image: bytes | str | Path, timeout: float | None = None) -> np.ndarray:
        resp = self._call(self.stub.Embed, pb.EmbedRequest(image=_image_bytes(image)), timeout)
        return np.asarray(resp.embedding.values, np.float32)

    def index_info(self, timeout: float | None = None) -> pb.IndexInfo:
        return self._call(self.stub.GetIndexInfo, pb.GetIndexInfoRequest(), timeout)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "RetrievalClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncRetrievalClient:
    """grpc.aio client: the same calls as coroutines, each with a deadline."""

    def __init__(self, address: str = DEFAULT_ADDRESS, timeout: float = DEFAULT_TIMEOUT_S, token: str | None = None,
                 tls_ca: str | bytes | None = None, max_message_mb: float = 20.0):
        options, self._metadata, creds = _channel_args(token, tls_ca, max_message_mb)
        self.address, self.timeout = address, timeout
        self.channel = (grpc.aio.secure_channel(address, creds, options) if creds else
                        grpc.aio.insecure_channel(address, options))
        self.stub = pb_grpc.RetrievalServiceStub(self.channel)

    async def search(self, request: pb.SearchRequest, timeout: float | None = None) -> list[Result]:
        resp = await self.stub.Search(request, timeout=self.timeout if timeout is None else timeout,
                                      metadata=self._metadata)
        return _results(resp)

    async def search_text(self, text: str, k: int = 10, target: str | None = None, timeout: float | None = None):
        return await self.search(search_request(text=text, target=target, k=k), timeout)

    async def search_image(self, image: bytes | str | Path, k: int = 10, target: str | None = None,
                           timeout: float | None = None):
        return await self.search(search_request(image=image, target=target, k=k), timeout)

    async def index_info(self, timeout: float | None = None) -> pb.IndexInfo:
        return await self.stub.GetIndexInfo(pb.GetIndexInfoRequest(), timeout=self.timeout if timeout is None else timeout,
                                            metadata=self._metadata)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> "AsyncRetrievalClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
