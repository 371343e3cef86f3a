"""Stored attributes of a build: the extra columns of the captions file, and an optional per-image
attributes file (`index-builder build --attributes FILE`: CSV/TSV with a header, or JSONL, with an
image column (image, image_path, path or uri: the image's path as the collection names it, relative
to the image folder, the dataset's images/ or the captions file's folder) and any other columns).

Which items carry what:
- an image: its row of the attributes file, plus each captions-file column whose value is the same
  on every caption of that image that has it (e.g. a per-photo `camera` repeated on each caption
  row); the attributes file wins a disagreement;
- a caption: its own columns, plus its image's attributes (its own value wins).
Each field gets one type for the whole build (`retrieval.store.attributes.infer_type`): a number if
every non-empty value parses as one, else a date if every one is ISO 8601, else a string.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from index_builder.captions_file import IMAGE_COLUMNS, extra_columns
from retrieval.errors import DatasetError
from retrieval.store.attributes import FieldType, infer_type, stored_value
from retrieval.store.schema import AttributeRow


@dataclass
class Attributes:
    fields: dict[str, FieldType]  # name -> type, sorted by name
    images: dict[int, dict[str, str]]  # image id -> {field: value as written}
    texts: dict[int, dict[str, str]]  # caption id -> {field: value as written}

    def rows(self) -> Iterator[AttributeRow]:
        """(modality, id, field, str_value, num_value) of every stored value."""
        for modality, items in (("image", self.images), ("text", self.texts)):
            for item_id, values in items.items():
                for name, text in values.items():
                    yield (modality, item_id, name, *stored_value(self.fields[name], text))


def read_attributes_file(path: Path) -> tuple[dict[str, dict[str, str]], list[tuple[str, str]]]:
    """{image reference: {field: value}} of a per-image attributes file, and rows skipped with why."""
    if not path.is_file():
        raise DatasetError(f"attributes file '{path}' does not exist")
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        with path.open(newline="", encoding="utf-8") as f:
            rows = [
                (f"{path.name}:{n}", r)
                for n, r in enumerate(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","), start=2)
            ]
    elif suffix in (".jsonl", ".ndjson", ".json"):
        with path.open(encoding="utf-8") as f:
            rows = []
            for n, line in enumerate(f, start=1):
                if line.strip():
                    try:
                        rows.append((f"{path.name}:{n}", json.loads(line)))
                    except ValueError as e:
                        raise DatasetError(f"{path.name}:{n} is not valid JSON ({e})") from None
    else:
        raise DatasetError(f"attributes file '{path}' must be .csv, .tsv or .jsonl (got '{suffix or 'no suffix'}')")
    found: dict[str, dict[str, str]] = {}
    skipped: list[tuple[str, str]] = []
    for where, row in rows:
        column = (
            next((c for c in row if isinstance(c, str) and c.strip().lower() in IMAGE_COLUMNS), None)
            if isinstance(row, dict)
            else None
        )
        if column is None or not str(row[column] or "").strip():
            skipped.append((where, "attributes row names no image (an image, image_path, path or uri column)"))
            continue
        ref = os.path.normpath(str(row[column]).strip()).replace(os.sep, "/")
        if ref in found:
            skipped.append((where, f"a second attributes row for image '{ref}'; the first is kept"))
            continue
        found[ref] = extra_columns(row)
    return found, skipped


def _constant_per_image(texts, text_attrs: dict[int, dict[str, str]]) -> dict[str, dict[str, str]]:
    """{image key: {field: value}} of the caption columns with one value across that image's captions."""
    seen: dict[str, dict[str, set[str]]] = {}
    for t in texts:
        if t.image_key is not None:
            for name, value in text_attrs.get(t.id, {}).items():
                seen.setdefault(t.image_key, {}).setdefault(name, set()).add(value)
    return {
        key: {name: next(iter(vals)) for name, vals in fields.items() if len(vals) == 1} for key, fields in seen.items()
    }


def assemble(
    images, texts, text_attrs: dict[int, dict[str, str]], attributes_file: str | None
) -> tuple[Attributes, list[tuple[str, str]]]:
    """The attributes of the indexed `images` and `texts` (see the module's docstring), and the rows of
    the attributes file that name no indexed image."""
    per_key, skipped = read_attributes_file(Path(attributes_file)) if attributes_file else ({}, [])
    keys = {it.key for it in images}
    skipped += [
        (f"{Path(attributes_file).name}: {ref}", "attributes for an image that is not indexed")
        for ref in per_key
        if ref not in keys
    ]
    from_captions = _constant_per_image(texts, text_attrs)
    image_attrs = {it.key: {**from_captions.get(it.key, {}), **per_key.get(it.key, {})} for it in images}
    by_id = {it.id: vals for it in images if (vals := image_attrs[it.key])}
    text_values = {
        t.id: vals for t in texts if (vals := {**image_attrs.get(t.image_key, {}), **text_attrs.get(t.id, {})})
    }
    values: dict[str, list[str]] = {}
    for item in (*by_id.values(), *text_values.values()):
        for name, text in item.items():
            values.setdefault(name, []).append(text)
    fields = {name: infer_type(values[name]) for name in sorted(values)}
    return Attributes(fields, by_id, text_values), skipped
