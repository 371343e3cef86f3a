"""Stored attributes and the filters that select items by them.

An index version stores, per item, named attributes of one of three types (`FIELD_TYPES`): a
`string`, a `number` (float64) or a `date` (ISO 8601, stored as POSIX seconds, a date-time without
an offset read as UTC). The manifest lists each field's type (`Manifest.filter_fields`); the rows
live in meta.sqlite's `attributes` table (`retrieval.store.schema`). A filter is a list of
`Condition`s that must all hold: equality, membership in a set, or an inclusive range (numbers and
dates). `matching_ids` checks every condition against the field's type and answers the ids that
match with one SQL query over indexed columns, which the search then hands FAISS as its selector.
"""

from __future__ import annotations

import math
import re
import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Literal

import numpy as np

from retrieval.errors import InvalidInputError

FieldType = Literal["string", "number", "date"]
FIELD_TYPES: tuple[FieldType, ...] = ("string", "number", "date")
MAX_ANY_OF = 1000  # values in one set-membership condition (SQLite binds each as a parameter)
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}([T ].*)?$")


def parse_number(text: str) -> float | None:
    """A finite number, or None (nan and infinities are not numbers a range can hold)."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def parse_date(text: str) -> float | None:
    """POSIX seconds of an ISO 8601 date (YYYY-MM-DD) or date-time, or None; UTC when no offset is given."""
    if not isinstance(text, str) or not _DATE.match(text.strip()):
        return None
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


def infer_type(values: list[str]) -> FieldType:
    """A column is a number if every non-empty value parses as one, else a date if every one is ISO 8601,
    else a string."""
    values = [v for v in values if v != ""]
    if values and all(parse_number(v) is not None for v in values):
        return "number"
    if values and all(parse_date(v) is not None for v in values):
        return "date"
    return "string"


def stored_value(kind: FieldType, text: str) -> tuple[str | None, float | None]:
    """(str_value, num_value) of a value of a field of this type: strings by their text, numbers and
    dates by their number (a date keeps its text too, for reading back)."""
    if kind == "string":
        return text, None
    if kind == "number":
        return None, parse_number(text)
    return text, parse_date(text)


Value = tuple[FieldType, "str | float"]  # (the kind the request says, the value as sent)


@dataclass(frozen=True)
class Condition:
    """One filter on `field`: `equals` (one value), `any_of` (several) or `range` (values = (min, max),
    either None for an open bound; bounds inclusive)."""

    field: str
    op: Literal["equals", "any_of", "range"]
    values: tuple[Value | None, ...]


def _operand(cond: Condition, kind: FieldType, value: Value) -> str | float:
    sent, raw = value
    if sent != kind:
        raise InvalidInputError(
            f"filter on '{cond.field}': the field holds {kind}s, the filter gives a {sent} "
            f"value ({str(raw)[:40]!r}); send a {kind}_value"
        )
    if kind == "string":
        return str(raw)
    if kind == "number":
        number = parse_number(raw)
        if number is None:
            raise InvalidInputError(f"filter on '{cond.field}': {raw!r} is not a finite number")
        return number
    moment = parse_date(str(raw))
    if moment is None:
        raise InvalidInputError(f"filter on '{cond.field}': {str(raw)[:40]!r} is not an ISO 8601 date or date-time")
    return moment


def _clause(cond: Condition, kind: FieldType) -> tuple[str, list]:
    """SQL over one item's row of this field, and its parameters."""
    column = "str_value" if kind == "string" else "num_value"
    if cond.op == "equals":
        return f"{column} = ?", [_operand(cond, kind, cond.values[0])]
    if cond.op == "any_of":
        if not cond.values:
            raise InvalidInputError(f"filter on '{cond.field}': any_of is empty; give at least one value")
        if len(cond.values) > MAX_ANY_OF:
            raise InvalidInputError(
                f"filter on '{cond.field}': any_of has {len(cond.values)} values, over the limit of {MAX_ANY_OF}"
            )
        return f"{column} IN ({','.join('?' * len(cond.values))})", [_operand(cond, kind, v) for v in cond.values]
    if kind == "string":
        raise InvalidInputError(
            f"filter on '{cond.field}': a range applies to numbers and dates; the field holds "
            f"strings (use equals or any_of)"
        )
    low, high = (None if v is None else _operand(cond, kind, v) for v in cond.values)
    if low is not None and high is not None and low > high:
        raise InvalidInputError(f"filter on '{cond.field}': the range's min is above its max")
    parts = (
        [f"{column} IS NOT NULL"]
        + ([f"{column} >= ?"] if low is not None else [])
        + ([f"{column} <= ?"] if high is not None else [])
    )
    return " AND ".join(parts), [x for x in (low, high) if x is not None]


def check(conditions: tuple[Condition, ...], fields: Mapping[str, FieldType]) -> list[tuple[str, list]]:
    """Each condition's SQL, once it is checked against the fields the version stores."""
    clauses = []
    for cond in conditions:
        if cond.field not in fields:
            known = ", ".join(sorted(fields)) or "none"
            raise InvalidInputError(f"filter on unknown field '{cond.field[:80]}'; this index's fields: {known}")
        clauses.append(_clause(cond, fields[cond.field]))
    return clauses


def matching_ids(
    db: sqlite3.Connection, modality: str, conditions: tuple[Condition, ...], fields: Mapping[str, FieldType]
) -> np.ndarray:
    """Sorted int64 ids of `modality` items for which every condition holds (an item lacking a
    field matches no condition on it). Raises InvalidInputError naming the field of a bad one."""
    queries, params = [], []
    for (clause, args), cond in zip(check(conditions, fields), conditions):
        queries.append(f"SELECT id FROM attributes WHERE modality = ? AND field = ? AND {clause}")
        params += [modality, cond.field, *args]
    if not queries:
        raise InvalidInputError("no filter to apply")
    rows = db.execute(" INTERSECT ".join(queries), params).fetchall()
    return np.sort(np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows)))
