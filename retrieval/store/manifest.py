"""A version's manifest.json as a typed, validated record (one error naming the field)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from retrieval.errors import IndexCorruptError, IndexFormatError
from retrieval.store.attributes import FIELD_TYPES, FieldType
from retrieval.store.layout import FORMAT, MANIFEST, is_plain_name


@dataclass(frozen=True)
class Manifest:
    """What a reader relies on in manifest.json, type-checked; `raw` is the whole document (counts,
    reports, recall) as the builder wrote it."""

    format: str
    model: str  # a registered model name, or a checkpoint file in the version directory
    fingerprint: str
    dim: int
    files: dict[str, str]  # plain file name -> sha256
    raw: dict[str, Any]
    filter_fields: dict[str, FieldType] = field(default_factory=dict)  # stored attributes: name -> type

    @property
    def geometry(self) -> dict[str, float] | None:
        """The sphere's geometry measured when the version was built (`index_builder.geometry`): the
        metrics that are numbers (alignment, uniformity_image, uniformity_text, modality_gap,
        hubness_image, hubness_text, ...); None for a version built before the builder measured it."""
        doc = self.raw.get("geometry")
        if not isinstance(doc, dict):
            return None
        return {
            k: float(v)
            for k, v in doc.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("k", "pairs")
        }

    @classmethod
    def from_json(cls, text: str, where: str = MANIFEST) -> Manifest:
        """Parse and check; one IndexCorruptError naming the field for a missing or mistyped one
        (IndexFormatError for another format, whose other fields need not be this reader's)."""
        try:
            doc = json.loads(text)
        except ValueError as e:
            raise IndexCorruptError(f"{where} is not valid JSON: {e}") from None
        if not isinstance(doc, dict):
            raise IndexCorruptError(f"{where} is not a JSON object")
        fmt = _field(doc, "format", str, where)
        if fmt != FORMAT:
            raise IndexFormatError(
                f"{where} has index format {fmt!r}, this reader needs {FORMAT!r}; rebuild it with `index-builder build`"
            )
        dim, files = _field(doc, "dim", int, where), _field(doc, "files", dict, where)
        if dim < 1:
            raise IndexCorruptError(f"{where}: field 'dim' must be positive, got {dim}")
        for name, digest in files.items():
            if not is_plain_name(name) or not isinstance(digest, str):
                raise IndexCorruptError(
                    f"{where}: field 'files' must map plain file names in the version directory "
                    f"to sha256 strings; {name!r}: {digest!r} is not one"
                )
        fields = doc.get("filter_fields", {})
        if not isinstance(fields, dict) or not all(
            isinstance(k, str) and k and v in FIELD_TYPES for k, v in fields.items()
        ):
            raise IndexCorruptError(
                f"{where}: field 'filter_fields' must map attribute names to one of {', '.join(FIELD_TYPES)}"
            )
        return cls(
            fmt, _field(doc, "model", str, where), _field(doc, "fingerprint", str, where), dim, files, doc, dict(fields)
        )


_TYPE_NAMES = {str: "a non-empty string", int: "an integer", dict: "an object"}


def _field(doc: dict, key: str, kind: type, where: str):
    if key not in doc:
        raise IndexCorruptError(f"{where}: field '{key}' is missing")
    value = doc[key]
    if not isinstance(value, kind) or isinstance(value, bool) or (kind is str and not value):
        raise IndexCorruptError(f"{where}: field '{key}' must be {_TYPE_NAMES[kind]}, got {json.dumps(value)[:80]}")
    return value
