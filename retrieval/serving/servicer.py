"""The gRPC servicer: translates protobuf messages to engine calls and back, and errors to
status codes (through `retrieval.serving.status`, the one mapping). It receives its engine and
its metrics; it loads nothing itself. `add_to_server` registers it so that each method parses its
own request bytes: a malformed request is a client error like any other. Each call hands the
engine a callable that says whether its client still waits (its deadline, its cancellation)."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import numpy as np
from google.protobuf.message import DecodeError, Message

from retrieval.errors import BatchItemError, InvalidInputError
from retrieval.hits import Hit
from retrieval.pb import retrieval_pb2 as pb
from retrieval.serving.batcher import Alive
from retrieval.serving.confidence import no_confident_match
from retrieval.serving.engine import Engine
from retrieval.serving.filtering import conditions, page_request
from retrieval.serving.queries import Composed, ItemRef, Options, Term
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
    async def wrapper(self: RetrievalServicer, request: bytes, context: grpc.aio.ServicerContext):
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


def _modality(value: int, what: str):
    if value not in _MODALITY_IN:
        raise InvalidInputError(f"unknown {what} modality {value}")
    return _MODALITY_IN[value]


_COMBINE = {pb.COMBINE_UNSPECIFIED: "geodesic", pb.COMBINE_GEODESIC: "geodesic", pb.COMBINE_LINEAR: "linear"}


def _one(message: pb.Query | pb.QueryTerm, kind: str | None) -> tuple[Any, Any]:
    """A query's (or a term's) value and the modality an embedding declares."""
    if kind == "text":
        return message.text, None
    if kind == "image":
        return message.image, None
    if kind == "embedding":
        return (
            np.asarray(message.embedding.values, dtype=np.float32),
            _modality(message.embedding.modality, "embedding"),
        )
    if kind == "item":
        gallery = _modality(message.item.gallery, "item gallery")
        if gallery is None:
            raise InvalidInputError("an item reference must name its gallery (IMAGE or TEXT)")
        return ItemRef(message.item.id, gallery), None
    raise InvalidInputError("query is empty: set text, image, embedding, item or composed")


def _query(message: pb.Query) -> tuple[Any, Any]:
    """The engine's query (text, bytes, array, ItemRef or Composed) and an embedding's modality."""
    kind = message.WhichOneof("kind")
    if kind != "composed":
        return _one(message, kind)
    if message.composed.combine not in _COMBINE:
        raise InvalidInputError(f"unknown combine {message.composed.combine}")
    terms = []
    for i, term in enumerate(message.composed.terms):
        try:
            value, modality = _one(term, term.WhichOneof("kind"))
        except InvalidInputError as e:
            raise InvalidInputError(f"terms[{i}]: {e}") from None
        terms.append(Term(value, term.weight if term.HasField("weight") else 1.0, modality))
    return Composed(tuple(terms), _COMBINE[message.composed.combine]), None


def _optional(req: Message, name: str) -> float | None:
    return getattr(req, name) if req.HasField(name) else None


def _query_args(req: pb.SearchRequest) -> tuple:
    query, source = _query(req.query)
    options = Options(
        _optional(req, "max_angle_deg"),
        _optional(req, "diversity"),
        _optional(req, "dedup_angle_deg"),
        _optional(req, "min_probability"),
    )
    return (query, _modality(req.target, "target"), req.k, _optional(req, "min_score"), source, options)


def _results(hits: list[Hit]) -> list[pb.SearchResult]:
    return [
        pb.SearchResult(
            id=h.id,
            score=h.score,
            angle_deg=h.angle_deg,
            modality=_MODALITY_OUT[h.modality],
            uri=h.uri,
            caption=h.caption,
            image_id=h.image_id,
            image_uri=h.image_uri,
            match_probability=h.match_probability,
        )
        for h in hits
    ]


def _response(hits: list[Hit], version: str, options: Options | None = None) -> pb.SearchResponse:
    min_probability = options.min_probability if options is not None else None
    return pb.SearchResponse(
        index_version=version, results=_results(hits), no_confident_match=no_confident_match(hits, min_probability)
    )


class RetrievalServicer:
    def __init__(self, engine: Engine, metrics=None, max_batch_queries: int = 256):
        self.engine, self.metrics, self.max_batch_queries = engine, metrics, max_batch_queries

    @_rpc
    async def Search(self, request: pb.SearchRequest, context) -> pb.SearchResponse:
        *args, options = _query_args(request)
        where, page = conditions(request.filters), page_request(request)
        if page is not None:
            hits, version, token = await self.engine.search_page(*args, page, _alive(context), where, options)
            response = _response(hits, version, options)
            response.next_page_token = token
            return response
        hits, version = await self.engine.search(*args, alive=_alive(context), options=options, conditions=where)
        return _response(hits, version, options)

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
                if len(r.filters) or r.page_size or r.page_token:
                    raise InvalidInputError("filters and pages are served by Search, not BatchSearch")
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
        return pb.EmbedResponse(
            embedding=pb.Embedding(values=vector.tolist(), modality=_MODALITY_OUT[kind]),
            model=live.encoder.name,
            model_fingerprint=live.encoder.fingerprint,
        )

    @_rpc
    async def GetIndexInfo(self, request: pb.GetIndexInfoRequest, context) -> pb.IndexInfo:
        info = self.engine.info()
        geometry = info.pop("geometry")
        reply = pb.IndexInfo(**info)
        if geometry is not None:  # left unset for a version built before the builder measured it
            fields = pb.Geometry.DESCRIPTOR.fields_by_name
            reply.geometry.CopyFrom(pb.Geometry(**{k: v for k, v in geometry.items() if k in fields}))
        return reply

    async def Walk(self, request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.WalkStep]:
        """Streams the path's steps; an error (before or between steps) ends the stream with its
        status, mapped like the unary methods' (`status_for`)."""
        start = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            req = _parse(pb.WalkRequest, request)
            steps = self.engine.walk(
                _query(req.start),
                _query(req.end),
                _modality(req.target, "target"),
                req.steps,
                req.k,
                alive=_alive(context),
            )
            async for step, t, angle, hits, version in steps:
                yield pb.WalkStep(step=step, t=t, angle_deg=angle, results=_results(hits), index_version=version)
        except asyncio.CancelledError:
            code = cancelled_status(context)
            raise
        except Exception as e:  # noqa: BLE001 - the client gets a status, the log gets the rest
            code, message = status_for(e, "Walk")
        finally:
            if self.metrics is not None:
                self.metrics.observe_request("Walk", code.name, time.perf_counter() - start)
        if code != grpc.StatusCode.OK:
            await context.abort(code, message)


def add_to_server(servicer: RetrievalServicer, server: grpc.aio.Server) -> None:
    """Registers the service with requests arriving as raw bytes, each parsed inside its method's
    error handling: bytes that do not parse get INVALID_ARGUMENT with a message (grpc's own
    deserializer would answer UNKNOWN and log a traceback per request). Reflection is unaffected."""

    def handler(method):  # unary or server-streaming, as the proto declares the method
        make = grpc.unary_stream_rpc_method_handler if method.server_streaming else grpc.unary_unary_rpc_method_handler
        return make(
            getattr(servicer, method.name), response_serializer=getattr(pb, method.output_type.name).SerializeToString
        )

    handlers = {m.name: handler(m) for m in _SERVICE.methods}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)
