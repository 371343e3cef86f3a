"""The metadata database of a version (`meta.sqlite`): its schema, written by the builder and read by
`IndexVersion`: `images(id, uri, sha256)`, `texts(id, caption, image_id, image_uri, sha256)` and the items' stored
attributes, one row per item and field, `attributes(modality, id, field, str_value, num_value)`
(strings in str_value; numbers and dates, as POSIX seconds, in num_value: `retrieval.store.attributes`),
indexed for filters by (modality, field, value)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Protocol

from retrieval.hits import Modality


class ImageItem(Protocol):
    id: int
    uri: str
    sha256: str


class TextItem(Protocol):
    id: int
    caption: str
    sha256: str


TABLES: dict[Modality, str] = {"image": "images", "text": "texts"}
COLUMNS: dict[Modality, tuple[str, ...]] = {
    "image": ("id", "uri", "sha256"),
    "text": ("id", "caption", "image_id", "image_uri", "sha256"),
}
RESULT_STRINGS: dict[Modality, tuple[str, ...]] = {"image": ("uri",), "text": ("caption", "image_uri")}
SCHEMA = """
CREATE TABLE images (id INTEGER PRIMARY KEY, uri TEXT NOT NULL, sha256 TEXT NOT NULL);
CREATE TABLE texts (id INTEGER PRIMARY KEY, caption TEXT NOT NULL, image_id INTEGER, image_uri TEXT, sha256 TEXT NOT NULL);
CREATE INDEX texts_image_id ON texts (image_id);
CREATE TABLE attributes (modality TEXT NOT NULL, id INTEGER NOT NULL, field TEXT NOT NULL, str_value TEXT,
                         num_value REAL);
CREATE INDEX attributes_str ON attributes (modality, field, str_value, id);
CREATE INDEX attributes_num ON attributes (modality, field, num_value, id);
"""
AttributeRow = tuple[str, int, str, "str | None", "float | None"]  # (modality, id, field, str_value, num_value)


def image_rows(images: Iterable[ImageItem]) -> Iterator[tuple]:
    return ((it.id, it.uri, it.sha256) for it in images)


def text_rows(texts: Iterable[tuple[TextItem, int | None, str | None]]) -> Iterator[tuple]:
    """`texts` yields (item, image id or None, image uri or None)."""
    return ((it.id, it.caption, image_id, image_uri, it.sha256) for it, image_id, image_uri in texts)


def write_metadata(
    path: Path,
    images: Iterable[ImageItem],
    texts: Iterable[tuple[TextItem, int | None, str | None]],
    attributes: Iterable[AttributeRow] = (),
    chunk: int = 10_000,
) -> None:
    """`texts` yields (item, image id or None, image uri or None)."""
    db = sqlite3.connect(path)
    try:
        db.executescript(SCHEMA)
        _insert(db, "INSERT INTO images VALUES (?, ?, ?)", image_rows(images), chunk)
        _insert(db, "INSERT INTO texts VALUES (?, ?, ?, ?, ?)", text_rows(texts), chunk)
        _insert(db, "INSERT INTO attributes VALUES (?, ?, ?, ?, ?)", attributes, chunk)
        db.commit()
    finally:
        db.close()


def same_metadata(
    path: Path,
    images: Iterable[ImageItem],
    texts: Iterable[tuple[TextItem, int | None, str | None]],
    attributes: Iterable[AttributeRow] = (),
) -> bool:
    """Whether a published version's database holds exactly these rows (what write_metadata would write)."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        has_attributes = db.execute("SELECT 1 FROM sqlite_master WHERE name = 'attributes'").fetchone() is not None
        stored = set(db.execute("SELECT * FROM attributes")) if has_attributes else set()
        return stored == set(attributes) and all(
            set(db.execute(f"SELECT {cols} FROM {table}")) == set(rows)
            for table, cols, rows in (
                (TABLES["image"], ", ".join(COLUMNS["image"]), image_rows(images)),
                (TABLES["text"], ", ".join(COLUMNS["text"]), text_rows(texts)),
            )
        )
    finally:
        db.close()


def _insert(db: sqlite3.Connection, sql: str, rows: Iterable[tuple], chunk: int) -> None:
    batch = []
    for row in rows:
        batch.append(row)
        if len(batch) >= chunk:
            db.executemany(sql, batch)
            batch = []
    if batch:
        db.executemany(sql, batch)


def read_hashes(path: Path, table: str) -> dict[int, str]:
    """{id: sha256} of a published version's table (what an incremental build compares against)."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return {int(i): s for i, s in db.execute(f"SELECT id, sha256 FROM {table}")}
    finally:
        db.close()


def select_rows(db: sqlite3.Connection, modality: Modality, ids: list[int]) -> dict[int, dict]:
    """{id: row as a dict} for the ids that exist."""
    table, cols = TABLES[modality], ", ".join(COLUMNS[modality])
    rows: dict[int, dict] = {}
    for start in range(0, len(ids), 500):  # SQLite's bound-parameter limit
        chunk = ids[start : start + 500]
        cur = db.execute(f"SELECT {cols} FROM {table} WHERE id IN ({','.join('?' * len(chunk))})", chunk)
        names = [d[0] for d in cur.description]
        rows.update({r[0]: dict(zip(names, r)) for r in cur.fetchall()})
    return rows


def longest_strings(db: sqlite3.Connection, modality: Modality) -> dict[str, int]:
    """Bytes of the longest stored string per column a result of `modality` carries."""
    cols = RESULT_STRINGS[modality]
    lengths = ", ".join(f"coalesce(max(length(CAST({c} AS BLOB))), 0)" for c in cols)
    return dict(zip(cols, db.execute(f"SELECT {lengths} FROM {TABLES[modality]}").fetchone()))
