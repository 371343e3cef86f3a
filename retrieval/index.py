"""Reading a published index version: what the server and the builder's checks share.

Layout under an index root (written by `index_builder.publish`):

    ROOT/CURRENT              one line: the live version's directory name, e.g. "v0007"
    ROOT/v0007/manifest.json  model, fingerprint, dim, counts, index types, checksums
    ROOT/v0007/images.faiss   IndexIDMap2 over an inner-product index of image unit vectors
    ROOT/v0007/texts.faiss    the same for captions
    ROOT/v0007/meta.sqlite    tables `images(id, uri, sha256)` and `texts(id, caption, image_id, image_uri, sha256)`

Readers resolve CURRENT once per open; a version directory is complete before CURRENT names it.
"""
from __future__ import annotations

import hashlib
import json
import re
import sqlite3
from pathlib import Path
from typing import Literal

import faiss
import numpy as np

from retrieval.errors import IndexCorruptError, IndexUnavailableError, InvalidInputError

CURRENT = "CURRENT"
MANIFEST = "manifest.json"
META = "meta.sqlite"
INDEX_FILES = {"image": "images.faiss", "text": "texts.faiss"}
VERSION_RE = re.compile(r"^v(\d{4,})$")
Modality = Literal["image", "text"]


def version_name(number: int) -> str:
    return f"v{number:04d}"


def list_versions(root: str | Path) -> list[str]:
    """Complete version directories under root, oldest first (temporary build dirs excluded)."""
    root = Path(root)
    if not root.is_dir():
        return []
    names = [p.name for p in root.iterdir() if p.is_dir() and VERSION_RE.match(p.name) and (p / MANIFEST).is_file()]
    return sorted(names, key=lambda n: int(VERSION_RE.match(n).group(1)))


def read_current(root: str | Path) -> str | None:
    """The version CURRENT names, or None when nothing is published yet."""
    path = Path(root) / CURRENT
    try:
        name = path.read_text().strip()
    except FileNotFoundError:
        return None
    if not VERSION_RE.match(name):
        raise IndexCorruptError(f"{path} names '{name}', which is not a version directory name")
    return name


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class IndexVersion:
    """One published version, opened read-only: FAISS search plus SQLite metadata."""

    def __init__(self, path: Path, manifest: dict, indexes: dict[str, faiss.Index]):
        self.path, self.name, self.manifest, self.indexes = path, path.name, manifest, indexes
        self.dim = int(manifest["dim"])
        self._db = sqlite3.connect(f"file:{path / META}?mode=ro", uri=True, check_same_thread=False)

    @classmethod
    def open(cls, root: str | Path, version: str | None = None, verify: bool = True) -> "IndexVersion":
        """Open `version`, or the one CURRENT names. `verify` checks every file's sha256."""
        root = Path(root)
        version = version or read_current(root)
        if version is None:
            raise IndexUnavailableError(f"no index version is published under '{root}' yet (no {CURRENT} file)")
        path = root / version
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except (OSError, ValueError) as e:
            raise IndexCorruptError(f"cannot read {path / MANIFEST}: {e}") from e
        if verify:
            for name, digest in manifest.get("files", {}).items():
                if not (path / name).is_file() or sha256_file(path / name) != digest:
                    raise IndexCorruptError(f"{path / name} is missing or does not match its checksum in the manifest")
        indexes = {}
        for modality, filename in INDEX_FILES.items():
            try:
                index = faiss.read_index(str(path / filename))
            except RuntimeError as e:  # faiss reports a missing or unreadable file this way
                raise IndexCorruptError(f"cannot read {path / filename}: {str(e).splitlines()[0]}") from e
            if index.d != int(manifest["dim"]):
                raise IndexCorruptError(f"{path / filename} has dimension {index.d}, manifest says {manifest['dim']}")
            indexes[modality] = index
        return cls(path, manifest, indexes)

    @property
    def model(self) -> str:
        return self.manifest["model"]

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    def count(self, modality: Modality) -> int:
        return int(self.indexes[modality].ntotal)

    def search(self, modality: Modality, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k of `modality` for unit query rows (B, D): (cosines (B, k), ids (B, k)); id -1 pads
        when fewer than k items exist. Thread-safe (FAISS search is read-only)."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise InvalidInputError(f"query vectors must have shape (B, {self.dim}), got {queries.shape}")
        if k <= 0:
            raise InvalidInputError(f"k must be positive, got {k}")
        scores, ids = self.indexes[modality].search(queries, min(k, max(1, self.count(modality))))
        return scores, ids

    def metadata(self, modality: Modality, ids: np.ndarray | list[int]) -> list[dict | None]:
        """Rows for ids, in order (None for -1 or unknown ids)."""
        ids = [int(i) for i in ids]
        table, cols = ("images", "id, uri, sha256") if modality == "image" else ("texts", "id, caption, image_id, image_uri, sha256")
        wanted = [i for i in ids if i >= 0]
        rows: dict[int, dict] = {}
        for start in range(0, len(wanted), 500):  # SQLite's bound-parameter limit
            chunk = wanted[start:start + 500]
            cur = self._db.execute(f"SELECT {cols} FROM {table} WHERE id IN ({','.join('?' * len(chunk))})", chunk)
            names = [d[0] for d in cur.description]
            rows.update({r[0]: dict(zip(names, r)) for r in cur.fetchall()})
        return [rows.get(i) for i in ids]

    def close(self) -> None:
        self._db.close()
