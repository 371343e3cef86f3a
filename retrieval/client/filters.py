"""Typed builders of `Filter` messages for searches (`filters=[...]`): all must hold.

    from retrieval.client import filters as F
    client.search_text("a dog", filters=[F.eq("camera", "Canon"), F.between("year", 2010, None)])

A Python str is a string value, an int or float a number, a `datetime.date` / `datetime` a date
(sent as ISO 8601; `date_value("2012-05-01")` sends a string as a date). A field's type is the one
the index stores (`GetIndexInfo.filter_fields` lists the fields; the server refuses another type).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from typing import Union

from retrieval.pb import retrieval_pb2 as pb

Scalar = Union[str, int, float, dt.date, "DateValue"]


class DateValue(str):
    """A string sent as a date_value (ISO 8601)."""


def date_value(text: str) -> DateValue:
    return DateValue(text)


def value(v: Scalar) -> pb.Value:
    if isinstance(v, DateValue):
        return pb.Value(date_value=str(v))
    if isinstance(v, str):
        return pb.Value(string_value=v)
    if isinstance(v, (dt.date, dt.datetime)):
        return pb.Value(date_value=v.isoformat())
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return pb.Value(number_value=float(v))
    raise TypeError(f"a filter value is a str, a number or a date, not {type(v).__name__}")


def eq(field: str, v: Scalar) -> pb.Filter:
    """field == v"""
    return pb.Filter(field=field, equals=value(v))


def any_of(field: str, values: Iterable[Scalar]) -> pb.Filter:
    """field is one of values"""
    return pb.Filter(field=field, any_of=pb.ValueList(values=[value(v) for v in values]))


def between(field: str, low: Scalar | None = None, high: Scalar | None = None) -> pb.Filter:
    """low <= field <= high (numbers or dates; None leaves that side open)."""
    bounds = pb.Range()
    if low is not None:
        bounds.min.CopyFrom(value(low))
    if high is not None:
        bounds.max.CopyFrom(value(high))
    return pb.Filter(field=field, range=bounds)


def _scalar(text: str) -> Scalar:
    """A command-line value: "quoted" is a string; else a number if it parses as one, a date if it is
    ISO 8601 (YYYY-MM-DD...), else a string."""
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] == '"':
        return text[1:-1]
    try:
        return float(text)
    except ValueError:
        pass
    try:
        if len(text) >= 10 and text[4] == "-" and text[7] == "-":
            dt.datetime.fromisoformat(text)
            return DateValue(text)
    except ValueError:
        pass
    return text


def parse(expression: str) -> pb.Filter:
    """A filter written as on the command line: `field=value`, `field=a|b|c` (any of), `field>=low`,
    `field<=high`, `field=low..high` (inclusive). Raises ValueError for anything else."""
    for op in (">=", "<="):
        if op in expression:
            field, _, text = expression.partition(op)
            bound = _scalar(text)
            return between(field.strip(), bound, None) if op == ">=" else between(field.strip(), None, bound)
    field, sep, text = expression.partition("=")
    if not sep or not field.strip() or not text.strip():
        raise ValueError(
            f"a filter is field=value, field=a|b, field>=low, field<=high or field=low..high: {expression!r}"
        )
    if ".." in text and not text.strip().startswith('"'):
        low, _, high = text.partition("..")
        return between(field.strip(), _scalar(low), _scalar(high))
    if "|" in text:
        return any_of(field.strip(), [_scalar(v) for v in text.split("|")])
    return eq(field.strip(), _scalar(text))
