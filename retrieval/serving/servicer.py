"""The gRPC servicer: translates protobuf messages to engine calls and back, and errors to
status codes (through `retrieval.serving.status`, the one mapping). It receives its engine and
its metrics; it loads nothing itself. `add_to_server` registers it so that each method parses its
own request bytes: a malformed request is a client error like any other. Each call hands the
engine a callable that says whether its client still waits (its deadline, its cancellation)."""
from __future__ import annotations

import asyncio
import functools
import time
from typing import Any, Awaitable, Callable

import grpc
import numpy as np
from google.protobuf.message import DecodeError, Message

from retrieval.serving.batcher import Alive
from retrieval.hits import Hit
from retrieval.serving.confidence import no_confident_match
from retrieval.serving.engine import Engine
from retrieval.errors import BatchItemError, InvalidInputError
from retrieval.pb import retrieval_pb2 as pb
from retrieval.serving.status import cancelled_status, status_for

_SERVICE = pb.DESCRIPTOR.services_by_name["RetrievalService"]
SERVICE_NAME = _SERVICE.full_name
_MODALITY_OUT = {"image": pb.MODALITY_IMAGE, "text": pb.MODALITY_TEXT}
_MODALITY_IN = {pb.MODALITY_UNSPECIFIED: None, pb.MODALITY_IMAGE: "image", pb.MODALITY_TEXT: "text"}


def _rpc(method: Callable[..., Awaitable[Any]]):
    """Parses the request's bytes, times and counts the call; maps any exception to a status code
    without a traceback."""
    name = method.__name__
    request_type = getattr(pb, _SERVICE.methods_by_name[name].input_type.name)

    @functools.wraps(method)
    async def wrapper(self: "RetrievalServicer", request: bytes, context: grpc.aio.ServicerContext):
        start = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            return await method(self, _parse(request_type, request), context)
        except asyncio.CancelledError:  # the client went away or its deadline passed
            code = cancelled_status(context)
            raise
        except Exception as e:  # noqa: BLE001 - the client gets a status, the log gets the rest
            code, message = status_for(e, name)
        finally:
            if self.metrics is not None:
                self.metrics.observe_request(name, code.name, time.perf_counter() - start)
        await context.abort(code, message)

    return wrapper


def _parse(request_type: type[Message], data: bytes) -> Message:
    try:
        return request_type.FromString(data)
    except DecodeError as e:  # a corrupt wire format, or a string field that is not UTF-8
        raise InvalidInputError(f"malformed request: {e}") from None


def _alive(context: grpc.aio.ServicerContext) -> Alive:
    """Whether the call's client still waits: not cancelled, and its deadline (if any) not passed."""
    remaining = context.time_remaining()
    deadline = None if remaining is None else time.monotonic() + remaining
    return lambda: not context.cancelled() and (deadline is None or time.monotonic() < deadline)


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
            _MODALITY_IN[source], (req.min_probability if req.HasField("min_probability") else None))


def _response(hits: list[Hit], version: str, min_probability: float | None = None) -> pb.SearchResponse:
    return pb.SearchResponse(index_version=version, no_confident_match=no_confident_match(hits, min_probability),
                             results=[pb.SearchResult(id=h.id, score=h.score, angle_deg=h.angle_deg,
                                                      modality=_MODALITY_OUT[h.modality], uri=h.uri, caption=h.caption,
                                                      image_id=h.image_id, image_uri=h.image_uri,
                                                      match_probability=h.match_probability)
                                      for h in hits])


class RetrievalServicer:
    def __init__(self, engine: Engine, metrics=None, max_batch_queries: int = 256):
        self.engine, self.metrics, self.max_batch_queries = engine, metrics, max_batch_queries

    @_rpc
    async def Search(self, request: pb.SearchRequest, context) -> pb.SearchResponse:
        args = _query_args(request)
        hits, version = await self.engine.search(*args, alive=_alive(context))
        return _response(hits, version, args[-1])

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
                raise BatchItemError(i, e) from e
        answers = await self.engine.search_many(queries, alive=_alive(context))
        return pb.BatchSearchResponse(responses=[_response(h, v, q[-1]) for (h, v), q in zip(answers, queries)])

    @_rpc
    async def Embed(self, request: pb.EmbedRequest, context) -> pb.EmbedResponse:
        kind = request.WhichOneof("input")
        if kind is None:
            raise InvalidInputError("input is empty: set text or image")
        live = self.engine.live()
        vector = await self.engine.embed(getattr(request, kind), live, _alive(context))
        return pb.EmbedResponse(embedding=pb.Embedding(values=vector.tolist(), modality=_MODALITY_OUT[kind]),
                                model=live.encoder.name,
                                model_fingerprint=live.encoder.fingerprint)

    @_rpc
    async def GetIndexInfo(self, request: pb.GetIndexInfoRequest, context) -> pb.IndexInfo:
        return pb.IndexInfo(**self.engine.info())

    async def Walk(self, request: bytes, context) -> None:
        # issue 14 implements paths; until then the RPC the proto declares answers UNIMPLEMENTED
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Walk is not served by this version of the server")


def add_to_server(servicer: RetrievalServicer, server: grpc.aio.Server) -> None:
    """Registers the service with requests arriving as raw bytes, each parsed inside its method's
    error handling: bytes that do not parse get INVALID_ARGUMENT with a message (grpc's own
    deserializer would answer UNKNOWN and log a traceback per request). Reflection is unaffected."""
    def handler(method):  # unary or server-streaming, as the proto declares the method
        make = grpc.unary_stream_rpc_method_handler if method.server_streaming else grpc.unary_unary_rpc_method_handler
        return make(getattr(servicer, method.name), response_serializer=getattr(pb, method.output_type.name).SerializeToString)

    handlers = {m.name: handler(m) for m in _SERVICE.methods}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)
