"""What the sync and async clients share (httpx's `Client` / `AsyncClient` over one base is the
model): connection settings, and for every RPC a `Call` (the method name, the request and the
parser of its reply), so the two clients differ only in how they send a call."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from retrieval.hits import Hit, ItemRef
from retrieval.pb import retrieval_pb2 as pb

DEFAULT_ADDRESS = "localhost:50051"
DEFAULT_TIMEOUT_S = 10.0
MiB = 1 << 20
_TARGETS = {None: pb.MODALITY_UNSPECIFIED, "image": pb.MODALITY_IMAGE, "text": pb.MODALITY_TEXT}
_MODALITY = {pb.MODALITY_IMAGE: "image", pb.MODALITY_TEXT: "text", pb.MODALITY_UNSPECIFIED: ""}


def hits_of(resp: pb.SearchResponse) -> list[Hit]:
    return [
        Hit(
            r.id,
            r.score,
            r.angle_deg,
            _MODALITY[r.modality],
            r.uri,
            r.caption,
            r.image_id,
            r.image_uri,
            r.match_probability if r.HasField("match_probability") else None,
        )
        for r in resp.results
    ]


@dataclass(frozen=True)
class SearchAnswer:
    """A search's whole reply: its results, the index version that answered, and whether
    `min_probability` was set and no result reached it."""

    hits: list[Hit]
    index_version: str
    no_confident_match: bool


def answer_of(resp: pb.SearchResponse) -> SearchAnswer:
    return SearchAnswer(hits_of(resp), resp.index_version, resp.no_confident_match)


def image_bytes(image: bytes | str | Path) -> bytes:
    return image if isinstance(image, (bytes, bytearray)) else Path(image).read_bytes()


# A term of a composed query, or a walk's end: a str is a text, bytes or a Path an image file, an array an
# embedding, an ItemRef a stored item. A term may come as (value, weight).
TermValue = Any
_COMBINE = {"geodesic": pb.COMBINE_GEODESIC, "linear": pb.COMBINE_LINEAR}


def _fill(message: pb.Query | pb.QueryTerm, value: TermValue, embedding_modality: str | None = None) -> None:
    if isinstance(value, str):
        message.text = value
    elif isinstance(value, (bytes, bytearray, Path)):
        message.image = image_bytes(value)
    elif isinstance(value, ItemRef):
        message.item.CopyFrom(pb.ItemRef(id=value.id, gallery=_TARGETS[value.gallery]))
    else:
        message.embedding.CopyFrom(
            pb.Embedding(
                values=np.asarray(value, np.float32).reshape(-1).tolist(), modality=_TARGETS[embedding_modality]
            )
        )


def query_message(value: TermValue, embedding_modality: str | None = None) -> pb.Query:
    """A Query of one text (str), image (bytes or Path), embedding (array) or stored item (ItemRef)."""
    query = pb.Query()
    _fill(query, value, embedding_modality)
    return query


def composed_query(terms: Sequence[TermValue], combine: str = "geodesic") -> pb.Query:
    """A composed Query: each term a value (weight 1) or (value, weight); weights < 0 push away."""
    out = []
    for term in terms:
        value, weight = term if isinstance(term, tuple) else (term, None)
        message = pb.QueryTerm()
        _fill(message, value)
        if weight is not None:
            message.weight = weight
        out.append(message)
    return pb.Query(composed=pb.ComposedQuery(terms=out, combine=_COMBINE[combine]))


def search_request(
    text: str | None = None,
    image: bytes | str | Path | None = None,
    embedding=None,
    target: str | None = None,
    k: int = 10,
    min_score: float | None = None,
    embedding_modality: str | None = None,
    *,
    item: ItemRef | None = None,
    filters: Sequence[pb.Filter] = (),
    page_size: int = 0,
    page_token: str = "",
    terms: Sequence[TermValue] | None = None,
    combine: str = "geodesic",
    max_angle_deg: float | None = None,
    diversity: float | None = None,
    dedup_angle_deg: float | None = None,
    min_probability: float | None = None,
) -> pb.SearchRequest:
    """One query: exactly one of text, image (bytes or a path), embedding, item (more like this) or
    terms (a composed query, see `composed_query`); `embedding_modality` ("text" or "image", what the
    embedding encodes) makes it rank as that query would. `max_angle_deg`: a spherical cap;
    `diversity`: MMR's lambda in [0, 1]; `dedup_angle_deg`: drop near-duplicates of better results. `filters` (`retrieval.client.filters`)
    must all hold; `page_size` asks for pages (k then bounds the whole ranking, 0 for the server's
    maximum), `page_token` for the page after the one that gave it. `min_probability` drops text <->
    image results less likely to match (calibrated models)."""
    if sum(x is not None for x in (text, image, embedding, item, terms)) != 1:
        raise ValueError("give exactly one of text, image, embedding, item or terms")
    if terms is not None:
        query = composed_query(terms, combine)
    elif image is not None:
        query = query_message(image if isinstance(image, (bytes, bytearray)) else Path(image))
    else:
        query = query_message(next(x for x in (text, item, embedding) if x is not None), embedding_modality)
    req = pb.SearchRequest(
        query=query, target=_TARGETS[target], k=k, filters=list(filters), page_size=page_size, page_token=page_token
    )
    for name, value in (
        ("min_score", min_score),
        ("max_angle_deg", max_angle_deg),
        ("diversity", diversity),
        ("dedup_angle_deg", dedup_angle_deg),
        ("min_probability", min_probability),
    ):
        if value is not None:
            setattr(req, name, value)
    return req


@dataclass(frozen=True)
class WalkStep:
    """One streamed step of a walk: its position t in [0, 1], its angle from the start, its new hits."""

    step: int
    t: float
    angle_deg: float
    hits: list[Hit]
    index_version: str


def walk_step(resp: pb.WalkStep) -> WalkStep:
    return WalkStep(resp.step, resp.t, resp.angle_deg, hits_of(resp), resp.index_version)


def walk_request(start: TermValue, end: TermValue, steps: int, k: int = 5, target: str | None = None) -> pb.WalkRequest:
    """A Walk from `start` to `end` (each a text, an image, an embedding or an ItemRef)."""
    return pb.WalkRequest(start=query_message(start), end=query_message(end), target=_TARGETS[target], steps=steps, k=k)


def _vector(resp: pb.EmbedResponse) -> np.ndarray:
    return np.asarray(resp.embedding.values, np.float32)


@dataclass(frozen=True)
class Call:
    """One RPC to make: `method` names the stub's method, `parse` turns its reply into the result."""

    method: str
    request: Any
    parse: Callable[[Any], Any]


class ClientBase:
    """Settings and the calls of every method; subclasses open a channel and send calls."""

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        timeout: float = DEFAULT_TIMEOUT_S,
        token: str | None = None,
        tls_ca: str | bytes | None = None,
        max_message_mb: float = 20.0,
    ):
        self.address, self.timeout = address, timeout
        self.options = [
            ("grpc.max_send_message_length", int(max_message_mb * MiB)),
            ("grpc.max_receive_message_length", int(max_message_mb * MiB)),
        ]
        self.metadata = (("authorization", f"Bearer {token}"),) if token else None
        self.credentials = None
        if tls_ca is not None:
            ca = tls_ca if isinstance(tls_ca, bytes) else Path(tls_ca).read_bytes()
            self.credentials = grpc.ssl_channel_credentials(root_certificates=ca)

    def _deadline(self, timeout: float | None) -> float:
        return self.timeout if timeout is None else timeout

    # -- the calls ----------------------------------------------------------------------------------
    @staticmethod
    def _search_call(request: pb.SearchRequest) -> Call:
        return Call("Search", request, hits_of)

    @staticmethod
    def _search_page_call(request: pb.SearchRequest) -> Call:
        return Call("Search", request, lambda resp: (hits_of(resp), resp.next_page_token))

    @staticmethod
    def _search_answer_call(request: pb.SearchRequest) -> Call:
        return Call("Search", request, answer_of)

    @staticmethod
    def _batch_search_call(requests: Sequence[pb.SearchRequest]) -> Call:
        return Call(
            "BatchSearch",
            pb.BatchSearchRequest(requests=list(requests)),
            lambda resp: [hits_of(r) for r in resp.responses],
        )

    @staticmethod
    def _embed_call(text: str | None = None, image: bytes | str | Path | None = None) -> Call:
        request = pb.EmbedRequest(text=text) if text is not None else pb.EmbedRequest(image=image_bytes(image))
        return Call("Embed", request, _vector)

    @staticmethod
    def _walk_call(start: TermValue, end: TermValue, steps: int, k: int, target: str | None) -> Call:
        return Call("Walk", walk_request(start, end, steps, k, target), walk_step)  # parse: per streamed step

    @staticmethod
    def _index_info_call() -> Call:
        return Call("GetIndexInfo", pb.GetIndexInfoRequest(), lambda resp: resp)
