"""A captions file, read into rows: CSV or TSV with a header, or JSONL, one caption a row.

The caption's text is the `text` (or `caption`) column, its image the `image` (`image_path`,
`path`, `uri`) column, its explicit id the `id` (`caption_id`) column, matched without regard to
case; every other column (CSV/TSV header or JSONL key) is an attribute of the caption, as a
non-empty string (`index_builder.attributes`). A row without text, a line that is not JSON or not
a JSON object, is skipped with its file:line and the reason; a file of another format, or a CSV
without a text column, is a DatasetError.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from retrieval.errors import DatasetError

TEXT_COLUMNS = ("text", "caption")
IMAGE_COLUMNS = ("image", "image_path", "path", "uri")
ID_COLUMNS = ("id", "caption_id")


def _pick(columns: list[str], wanted: tuple[str, ...]) -> str | None:
    lowered = {c.strip().lower(): c for c in columns}
    return next((lowered[w] for w in wanted if w in lowered), None)


KNOWN_COLUMNS = {*TEXT_COLUMNS, *IMAGE_COLUMNS, *ID_COLUMNS}


def extra_columns(row: dict) -> dict[str, str]:
    """A row's columns other than the known ones, as non-empty strings (its attributes)."""
    out = {}
    for name, value in row.items():
        if not isinstance(name, str) or name.strip().lower() in KNOWN_COLUMNS or value is None:
            continue
        text = ("true" if value else "false") if isinstance(value, bool) else str(value).strip()
        if text and not isinstance(value, (dict, list)):
            out[name.strip()] = text
    return out


def read_captions_file(path: Path) -> tuple[list[dict], list[tuple[str, str]]]:
    """Rows {text, image, id, attrs} from a CSV (with a header) or JSONL file; bad rows are skipped."""
    if not path.is_file():
        raise DatasetError(f"captions file '{path}' does not exist")
    rows: list[dict] = []
    skipped: list[tuple[str, str]] = []
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
            cols = list(reader.fieldnames or [])
            text_col = _pick(cols, TEXT_COLUMNS)
            if text_col is None:
                raise DatasetError(f"{path} needs a header with a 'text' or 'caption' column, found {cols}")
            image_col, id_col = _pick(cols, IMAGE_COLUMNS), _pick(cols, ID_COLUMNS)
            for line, row in enumerate(reader, start=2):
                rows.append(
                    {
                        "where": f"{path.name}:{line}",
                        "text": row.get(text_col),
                        "image": row.get(image_col) if image_col else None,
                        "id": row.get(id_col) if id_col else None,
                        "attrs": extra_columns(row),
                    }
                )
    elif suffix in (".jsonl", ".ndjson", ".json"):
        with path.open(encoding="utf-8") as f:
            for line, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                where = f"{path.name}:{line}"
                try:
                    obj = json.loads(raw)
                except ValueError as e:
                    skipped.append((where, f"invalid JSON ({e.msg})"))
                    continue
                if not isinstance(obj, dict):
                    skipped.append((where, "a line must be a JSON object"))
                    continue
                keys = list(obj)
                text_k, image_k, id_k = _pick(keys, TEXT_COLUMNS), _pick(keys, IMAGE_COLUMNS), _pick(keys, ID_COLUMNS)
                rows.append(
                    {
                        "where": where,
                        "text": obj.get(text_k) if text_k else None,
                        "image": obj.get(image_k) if image_k else None,
                        "id": obj.get(id_k) if id_k else None,
                        "attrs": extra_columns(obj),
                    }
                )
    else:
        raise DatasetError(f"captions file '{path}' must be .csv, .tsv or .jsonl (got '{suffix or 'no suffix'}')")
    good = []
    for row in rows:
        text = row["text"] if isinstance(row["text"], str) else None
        if not text or not text.strip():
            skipped.append((row["where"], "no caption text"))
            continue
        row["text"] = text.strip()
        row["image"] = str(row["image"]).strip() or None if row["image"] not in (None, "") else None
        row["id"] = str(row["id"]).strip() or None if row["id"] not in (None, "") else None
        good.append(row)
    return good, skipped
