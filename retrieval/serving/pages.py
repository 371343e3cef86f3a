"""Pages of one ranking: `page_size` results at a time, and an opaque token for the next page.

A token is base64url of a small JSON object naming the index version that answered, the offset of
the next page and a digest of the request it continues (every field but page_size and page_token):
opaque to clients, but not a secret. A server trusts none of it beyond these checks: a token that
does not decode, or that continues another request, is INVALID_ARGUMENT; one made by a version the
server no longer serves is FAILED_PRECONDITION (`StalePageTokenError`): its ranking is gone.
Page n+1 continues where page n stopped because each page ranks the first offset + page_size
items again, on the same version, and slices; the ranking's depth is bounded by the server's
max_k (a search's own k, when set, bounds it lower), so the last page ends there.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass

from retrieval.errors import InvalidInputError, StalePageTokenError


@dataclass(frozen=True)
class PageRequest:
    size: int  # results per page
    token: str  # "" for the first page
    digest: str  # of the request, without its page fields (the servicer computes it)


def encode_token(version: str, offset: int, digest: str) -> str:
    raw = json.dumps({"v": version, "o": offset, "h": digest}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_token(token: str, version: str, digest: str) -> int:
    """The offset a token continues at, once it is checked against the live version and the request."""
    if len(token) > 512:
        raise InvalidInputError("page_token is not a token this server issued (too long)")
    try:
        doc = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise InvalidInputError("page_token is not a token this server issued") from None
    if not (
        isinstance(doc, dict)
        and isinstance(doc.get("v"), str)
        and isinstance(doc.get("h"), str)
        and isinstance(doc.get("o"), int)
        and not isinstance(doc.get("o"), bool)
        and doc["o"] > 0
    ):
        raise InvalidInputError("page_token is not a token this server issued")
    if doc["v"] != version:
        raise StalePageTokenError(
            f"page_token belongs to index version {doc['v'][:40]!r}, and the server now serves "
            f"{version}: a ranking's pages all come from one version; search again without "
            f"a page_token"
        )
    if doc["h"] != digest:
        raise InvalidInputError(
            "page_token was issued for another request: a token continues the query, target, "
            "k, filters and options it was issued for"
        )
    return doc["o"]


def page_window(page: PageRequest, version: str, depth: int) -> tuple[int, int]:
    """(offset, fetch): rank the first `fetch` items and return [offset, fetch). `depth` bounds the ranking."""
    offset = decode_token(page.token, version, page.digest) if page.token else 0
    if offset >= depth:
        raise InvalidInputError(f"page_token is past the end of the ranking ({depth} results at most)")
    return offset, min(offset + page.size, depth)


def next_token(page: PageRequest, version: str, returned: int, offset: int, fetch: int, depth: int) -> str:
    """The next page's token, or "" when this page is the last (short, or at the ranking's depth)."""
    return encode_token(version, fetch, page.digest) if returned == fetch - offset and fetch < depth else ""
