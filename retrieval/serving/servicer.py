"""The gRPC servicer: translates protobuf messages to engine calls and back, and errors to
status codes (through `retrieval.serving.status`, the one mapping). It receives its engine and
its metrics; it loads nothing itself."""
from __future__ import annotations

import asyncio
import functools
import time
from typing import Any, Awaitable, Callable

import grpc
import numpy as np

from retrieval.serving.engine import Engine, Hit
from retrieval.errors import InvalidInputError
from retrieval.pb import retrieval_pb2 as pb
from retrieval.pb import retrieval_pb2_grpc as pb_grpc
from retrieval.serving.status import status_for

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["RetrievalService"].full_name
_MODALITY_OUT = {"image": pb.MODALITY_IMAGE, "text": pb.MODALITY_TEXT}
_MODALITY_IN = {pb.MODALITY_UNSPECIFIED: None, pb.MODALITY_IMAGE: "image", pb.MODALITY_TEXT: "text"}


def _rpc(method: Callable[..., Awaitable[Any]]):
    """Times and counts the call; maps any exception to a status code without a traceback."""
    name = method.__name__

    @functools.wraps(method)
    async def wrapper(self: "RetrievalServicer", request, context: grpc.aio.ServicerContext):
        start = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            return await method(self, request, context)
        except asyncio.CancelledError:  # the client went away or its deadline passed
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception as e:  # noqa: BLE001 - the client gets a status, the log gets the rest
            code, message = status_for(e, name)
        finally:
            if self.metrics is not None:
                self.metrics.observe_request(name, code.name, time.perf_counter() - start)
        await context.abort(code, message)

    return wrapper


def _query_args(req: pb.SearchRequest) -> tuple:
    kind = req.query.WhichOneof("kind")
    if kind == "text":
        query: Any = req.query.text
    elif kind == "image":
        query = req.query.image
    elif kind == "embedding":
        query = np.asarray(req.query.embedding.values, dtype=np.float32)
    else:
        raise InvalidInputError("query is empty: set text, image or embedding")
    if req.target not in _MODALITY_IN:
        raise InvalidInputError(f"unknown target modality {req.target}")
    source = req.query.embedding.modality if kind == "embedding" else pb.MODALITY_UNSPECIFIED
    if source not in _MODALITY_IN:
        raise InvalidInputError(f"unknown embedding modality {source}")
    return (query, _MODALITY_IN[req.target], req.k, (req.min_score if req.HasField("min_score") else None),
            _MODALITY_IN[source])


def _response(hits: list[Hit], version: str) -> pb.SearchResponse:
    return pb.SearchResponse(index_version=version, results=[
        pb.SearchResult(id=h.id, score=h.score, angle_deg=h.angle_deg, modality=_MODALITY_OUT[h.modality],
                        uri=h.uri, caption=h.caption, image_id=h.image_id, image_uri=h.image_uri)
        for h in hits])


class RetrievalServicer(pb_grpc.RetrievalServiceServicer):
    def __init__(self, engine: Engine, metrics=None, max_batch_queries: int = 256):
        self.engine, self.metrics, self.max_batch_queries = engine, metrics, max_batch_queries

    @_rpc
    async def Search(self, request: pb.SearchRequest, context) -> pb.SearchResponse:
        hits, version = await self.engine.search(*_query_args(request))
        return _response(hits, version)

    @_rpc
    async def BatchSearch(self, request: pb.BatchSearchRequest, context) -> pb.BatchSearchResponse:
        n = len(request.requests)
        if n == 0:
            raise InvalidInputError("requests is empty")
        if n > self.max_batch_queries:
            raise InvalidInputError(f"{n} requests in one batch, over the limit of {self.max_batch_queries}")
        queries = []
        for i, r in enumerate(request.requests):
            try:
                queries.append(_query_args(r))
            except InvalidInputError as e:
                raise InvalidInputError(f"requests[{i}]: {e}") from None
        answers = await self.engine.search_many(queries)
        return pb.BatchSearchResponse(responses=[_response(h, v) for h, v in answers])

    @_rpc
    async def Embed(self, request: pb.EmbedRequest, context) -> pb.EmbedResponse:
        kind = request.WhichOneof("input")
        if kind is None:
            raise InvalidInputError("input is empty: set text or image")
        live = self.engine.live()
        vector = await self.engine.embed(getattr(request, kind), live)
        return pb.EmbedResponse(embedding=pb.Embedding(values=vector.tolist(), modality=_MODALITY_OUT[kind]),
                                model=live.encoder.name,
                                model_fingerprint=live.encoder.fingerprint)

    @_rpc
    async def GetIndexInfo(self, request: pb.GetIndexInfoRequest, context) -> pb.IndexInfo:
        return pb.IndexInfo(**self.engine.info())
