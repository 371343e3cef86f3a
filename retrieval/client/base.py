"""What the sync and async clients share (httpx's `Client` / `AsyncClient` over one base is the
model): connection settings, and for every RPC a `Call` (the method name, the request and the
parser of its reply), so the two clients differ only in how they send a call."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import grpc
import numpy as np

from retrieval.hits import Hit
from retrieval.pb import retrieval_pb2 as pb

DEFAULT_ADDRESS = "localhost:50051"
DEFAULT_TIMEOUT_S = 10.0
MiB = 1 << 20
_TARGETS = {None: pb.MODALITY_UNSPECIFIED, "image": pb.MODALITY_IMAGE, "text": pb.MODALITY_TEXT}
_MODALITY = {pb.MODALITY_IMAGE: "image", pb.MODALITY_TEXT: "text", pb.MODALITY_UNSPECIFIED: ""}


def hits_of(resp: pb.SearchResponse) -> list[Hit]:
    return [Hit(r.id, r.score, r.angle_deg, _MODALITY[r.modality], r.uri, r.caption, r.image_id, r.image_uri,
                r.match_probability if r.HasField("match_probability") else None)
            for r in resp.results]


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


def search_request(text: str | None = None, image: bytes | str | Path | None = None, embedding=None,
                   target: str | None = None, k: int = 10, min_score: float | None = None,
                   embedding_modality: str | None = None, min_probability: float | None = None) -> pb.SearchRequest:
    """One query: exactly one of text, image (bytes or a path) or embedding; `embedding_modality`
    ("text" or "image", what the embedding encodes) makes it rank as that query would;
    `min_probability` drops text <-> image results less likely to match (calibrated models)."""
    if sum(x is not None for x in (text, image, embedding)) != 1:
        raise ValueError("give exactly one of text, image or embedding")
    if text is not None:
        query = pb.Query(text=text)
    elif image is not None:
        query = pb.Query(image=image_bytes(image))
    else:
        query = pb.Query(embedding=pb.Embedding(values=np.asarray(embedding, np.float32).reshape(-1).tolist(),
                                                modality=_TARGETS[embedding_modality]))
    req = pb.SearchRequest(query=query, target=_TARGETS[target], k=k)
    if min_score is not None:
        req.min_score = min_score
    if min_probability is not None:
        req.min_probability = min_probability
    return req


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

    def __init__(self, address: str = DEFAULT_ADDRESS, timeout: float = DEFAULT_TIMEOUT_S, token: str | None = None,
                 tls_ca: str | bytes | None = None, max_message_mb: float = 20.0):
        self.address, self.timeout = address, timeout
        self.options = [("grpc.max_send_message_length", int(max_message_mb * MiB)),
                        ("grpc.max_receive_message_length", int(max_message_mb * MiB))]
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
    def _search_answer_call(request: pb.SearchRequest) -> Call:
        return Call("Search", request, answer_of)

    @staticmethod
    def _batch_search_call(requests: Sequence[pb.SearchRequest]) -> Call:
        return Call("BatchSearch", pb.BatchSearchRequest(requests=list(requests)),
                    lambda resp: [hits_of(r) for r in resp.responses])

    @staticmethod
    def _embed_call(text: str | None = None, image: bytes | str | Path | None = None) -> Call:
        request = pb.EmbedRequest(text=text) if text is not None else pb.EmbedRequest(image=image_bytes(image))
        return Call("Embed", request, _vector)

    @staticmethod
    def _index_info_call() -> Call:
        return Call("GetIndexInfo", pb.GetIndexInfoRequest(), lambda resp: resp)
