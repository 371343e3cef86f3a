"""Reading a published index version: what the server and the builder's checks share.

Layout under an index root (written by `index_builder.publish`):

    ROOT/CURRENT              one line: the live version's directory name, e.g. "v0007"
    ROOT/v0007/manifest.json  model, fingerprint, dim, counts, index types, query bank, checksums
    ROOT/v0007/images.faiss   IndexIDMap2 over an inner-product index of image vectors [g, b_g]
    ROOT/v0007/texts.faiss    the same for captions
    ROOT/v0007/meta.sqlite    tables `images(id, uri, sha256)` and `texts(id, caption, image_id, image_uri, sha256)`

An index the manifest's `storage` marks "mmap" (built on disk, `index_builder.ivf_ondisk`) is a bare
IVF index whose inverted lists live in `images.ivfdata` beside it, memory-mapped rather than read
into RAM, with its biases in a side table (`images.ids.npy`, `images.bias.npy`:
`retrieval.store.bias_table`); "memory" (the default) is read whole.

Each stored vector is a unit embedding g (D) plus its inverted-softmax bias b_g as coordinate D+1
(`retrieval.embedding.querybank`; 0 for models without a query bank). A cross-modal query q searches with
[q, 1], so the index ranks by cos(q, g) + b_g; any other with [q, 0], the plain cosine. Search
results report the cosine either way (the score minus the bias it included).

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

from retrieval.errors import IndexCorruptError, IndexFormatError, IndexUnavailableError, InvalidInputError
from retrieval.store.bias_table import BiasTable

FORMAT = "sphere-index/2"   # /2: vectors carry the inverted-softmax bias as coordinate D+1
CURRENT = "CURRENT"
MANIFEST = "manifest.json"
META = "meta.sqlite"
INDEX_FILES = {"image": "images.faiss", "text": "texts.faiss"}
VERSION_RE = re.compile(r"^v(\d{4,})$")
STORAGE_MEMORY, STORAGE_MMAP = "memory", "mmap"
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


def with_bias(vectors: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """(N, D) unit gallery rows and (N,) biases -> (N, D+1) rows as the index stores them."""
    return np.ascontiguousarray(np.hstack([vectors, bias[:, None]]), dtype=np.float32)


def query_rows(queries: np.ndarray, cross_modal: bool) -> np.ndarray:
    """(B, D) unit queries -> (B, D+1): last coordinate 1 to add the gallery's bias, 0 not to."""
    return with_bias(queries, np.full(len(queries), 1.0 if cross_modal else 0.0, np.float32))


def reconstruct(index: faiss.Index, ids: np.ndarray) -> np.ndarray:
    """Vectors stored under `ids` (exact for Flat storage: Flat, HNSW*,Flat, IVF*,Flat; IVF
    indexes need their direct map, which `IndexVersion.open` makes)."""
    return index.reconstruct_batch(np.ascontiguousarray(ids, dtype=np.int64))


def restricted_to(index: faiss.Index, allowed: np.ndarray) -> faiss.SearchParameters:
    """Search parameters that keep only `allowed` ids, of the type the wrapped index expects
    (IVF and HNSW reject the generic type), carrying its nprobe / efSearch."""
    sel = faiss.IDSelectorBatch(np.ascontiguousarray(allowed, np.int64))
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        return faiss.SearchParametersIVF(sel=sel, nprobe=ivf.nprobe)
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap2) else index
    if isinstance(inner, faiss.IndexHNSW):
        return faiss.SearchParametersHNSW(sel=sel, efSearch=inner.hnsw.efSearch)
    return faiss.SearchParameters(sel=sel)


def read_index_file(path: Path, storage: str = STORAGE_MEMORY) -> faiss.Index:
    """Read an index file; with STORAGE_MMAP, map its on-disk inverted lists read-only from the data
    file named in it, looked up next to the index file (the version directory may have been renamed
    or mounted elsewhere since the build). That is what faiss's IO_FLAG_ONDISK_SAME_DIR does, but
    it also prints to stdout; so the lists are read without their data, then mapped here."""
    try:
        if storage != STORAGE_MMAP:
            return faiss.read_index(str(path))
        index = faiss.read_index(str(path), faiss.IO_FLAG_SKIP_IVF_DATA | faiss.IO_FLAG_READ_ONLY)
        ivf = faiss.try_extract_index_ivf(index)
        lists = faiss.downcast_InvertedLists(ivf.invlists) if ivf is not None else None
        if not isinstance(lists, faiss.OnDiskInvertedLists):
            raise IndexCorruptError(f"{path} is marked memory-mapped but has no on-disk inverted lists")
        data = path.parent / Path(lists.filename).name
        if not data.is_file() or data.stat().st_size < lists.totsize:
            raise IndexCorruptError(f"{data}, the inverted lists of {path}, is missing or shorter than the index says")
        lists.filename = str(data)
        lists.do_mmap()
        return index
    except RuntimeError as e:  # faiss reports a missing or unreadable file this way
        raise IndexCorruptError(f"cannot read {path}: {str(e).splitlines()[0]}") from e


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class IndexVersion:
    """One published version, opened read-only: FAISS search plus SQLite metadata."""

    def __init__(self, path: Path, manifest: dict, indexes: dict[str, faiss.Index],
                 bias_tables: dict[str, BiasTable] | None = None):
        self.path, self.name, self.manifest, self.indexes = path, path.name, manifest, indexes
        self.bias_tables = bias_tables or {}
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
        if manifest.get("format") != FORMAT:
            raise IndexFormatError(f"{path} has index format {manifest.get('format')!r}, this reader needs {FORMAT!r}; "
                                    f"rebuild it with `index-builder build`")
        if verify:
            for name, digest in manifest.get("files", {}).items():
                if not (path / name).is_file() or sha256_file(path / name) != digest:
                    raise IndexCorruptError(f"{path / name} is missing or does not match its checksum in the manifest")
        indexes, bias_tables = {}, {}
        for modality, filename in INDEX_FILES.items():
            storage = manifest.get("storage", {}).get(modality, STORAGE_MEMORY)
            index = read_index_file(path / filename, storage)
            if index.d != int(manifest["dim"]) + 1:
                raise IndexCorruptError(f"{path / filename} has dimension {index.d}, the manifest's embedding "
                                        f"dimension {manifest['dim']} plus its bias coordinate is {int(manifest['dim']) + 1}")
            ivf = faiss.try_extract_index_ivf(index)
            if storage == STORAGE_MMAP:
                bias_tables[modality] = BiasTable(path, Path(filename).stem)
            elif ivf is not None:
                ivf.make_direct_map()  # reconstruct by id (the bias of each hit), made before any search
            indexes[modality] = index
        return cls(path, manifest, indexes, bias_tables)

    @property
    def model(self) -> str:
        return self.manifest["model"]

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    def count(self, modality: Modality) -> int:
        return int(self.indexes[modality].ntotal)

    def search(self, modality: Modality, queries: np.ndarray, k: int, cross_modal: bool = False,
               allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k of `modality` for unit query rows (B, D): (cosines (B, k), ids (B, k)); id -1 pads
        when fewer than k items exist. `cross_modal` ranks by cosine + the inverted softmax's bias
        (queries of the other modality); `allowed` restricts the search to those ids.
        Thread-safe (FAISS search and reconstruction are read-only)."""
        queries = np.asarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise InvalidInputError(f"query vectors must have shape (B, {self.dim}), got {queries.shape}")
        if k <= 0:
            raise InvalidInputError(f"k must be positive, got {k}")
        index = self.indexes[modality]
        params = None if allowed is None else restricted_to(index, allowed)
        scores, ids = index.search(query_rows(queries, cross_modal), min(k, max(1, self.count(modality))), params=params)
        if cross_modal:
            found = ids >= 0
            table = self.bias_tables.get(modality)
            bias = table.lookup(ids[found]) if table else reconstruct(index, ids[found])[:, self.dim]
            scores[found] -= bias   # back to the cosine
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
