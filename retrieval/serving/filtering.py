"""The proto side of filters and pages: `Filter` messages to typed conditions (their meaning is
`retrieval.store.attributes`'), and the digest of a request that a page token is bound to."""

from __future__ import annotations

import hashlib

from retrieval.errors import InvalidInputError
from retrieval.pb import retrieval_pb2 as pb
from retrieval.serving.pages import PageRequest
from retrieval.store.attributes import Condition, Value

MAX_FILTERS = 32
_KINDS = {"string_value": "string", "number_value": "number", "date_value": "date"}


def _value(field: str, value: pb.Value, what: str) -> Value:
    kind = value.WhichOneof("kind")
    if kind is None:
        raise InvalidInputError(
            f"filter on '{field}': {what} has no value (set string_value, number_value or date_value)"
        )
    return _KINDS[kind], getattr(value, kind)


def conditions(filters) -> tuple[Condition, ...]:
    """Typed conditions of a request's `filters` (all must hold), checked for shape; their fields
    and types are checked against the index version when it is searched."""
    if len(filters) > MAX_FILTERS:
        raise InvalidInputError(f"{len(filters)} filters, over the limit of {MAX_FILTERS}")
    out = []
    for f in filters:
        if not f.field:
            raise InvalidInputError("a filter has no field name")
        op = f.WhichOneof("condition")
        if op == "equals":
            out.append(Condition(f.field, op, (_value(f.field, f.equals, "equals"),)))
        elif op == "any_of":
            out.append(Condition(f.field, op, tuple(_value(f.field, v, "an any_of entry") for v in f.any_of.values)))
        elif op == "range":
            bounds = tuple(
                _value(f.field, getattr(f.range, side), side) if f.range.HasField(side) else None
                for side in ("min", "max")
            )
            out.append(Condition(f.field, op, bounds))
        else:
            raise InvalidInputError(f"filter on '{f.field[:80]}' has no condition (set equals, any_of or range)")
    return tuple(out)


def page_request(req: pb.SearchRequest) -> PageRequest | None:
    """The page a search asks for, or None when it asks for no pages; the digest binds a token to
    everything in the request but its page fields."""
    if not req.page_size and not req.page_token:
        return None
    if req.page_size <= 0:
        raise InvalidInputError(f"page_size must be positive with a page_token, got {req.page_size}")
    rest = pb.SearchRequest()
    rest.CopyFrom(req)
    rest.ClearField("page_size")
    rest.ClearField("page_token")
    digest = hashlib.sha256(rest.SerializeToString(deterministic=True)).hexdigest()[:32]
    return PageRequest(req.page_size, req.page_token, digest)
