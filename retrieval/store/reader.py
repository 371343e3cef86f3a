"""Reading a published index version: what the server and the builder's checks share.

Layout under an index root (written by `index_builder.publish`):

    ROOT/CURRENT              one line: the live version's directory name, e.g. "v0007"
    ROOT/v0007/manifest.json  model, fingerprint, dim, counts, index types, query bank, checksums
    ROOT/v0007/images.faiss   IndexIDMap2 over an inner-product index of image vectors [g, b_g]
    ROOT/v0007/texts.faiss    the same for captions
    ROOT/v0007/meta.sqlite    tables `images(id, uri, sha256)` and `texts(id, caption, image_id, image_uri, sha256)`

Each stored vector is a unit embedding g (D) plus its inverted-softmax bias b_g as coordinate D+1
(`retrieval.embedding.querybank`; 0 for models without a query bank). A cross-modal query q searches with
[q, 1], so the index ranks by cos(q, g) + b_g; any other with [q, 0], the plain cosine. Search
results report the cosine either way (the score minus the bias it included).

Readers resolve CURRENT once per open; a version directory is complete before CURRENT names it.
A version is data, never code: the manifest is checked against a typed schema (`Manifest`), only
plain files inside the version directory are read (no symlinks, no paths), and its model is a
registered name or a safetensors checkpoint inside the version (`IndexVersion.model_source`).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import sqlite3
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import faiss
import numpy as np

from retrieval.errors import IndexCorruptError, IndexFormatError, IndexUnavailableError, InvalidInputError

FORMAT = "sphere-index/2"   # /2: vectors carry the inverted-softmax bias as coordinate D+1
CURRENT = "CURRENT"
MANIFEST = "manifest.json"
META = "meta.sqlite"
INDEX_FILES = {"image": "images.faiss", "text": "texts.faiss"}
MODEL_FILE = "model.safetensors"  # where the builder copies a checkpoint-file model
CHECKPOINT_SUFFIX = ".safetensors"
VERSION_RE = re.compile(r"^v(\d{4,})$")
Modality = Literal["image", "text"]


def version_name(number: int) -> str:
    return f"v{number:04d}"


def list_versions(root: str | Path) -> list[str]:
    """Published versions under root, oldest first: vNNNN directories holding a manifest. A publish
    renames a finished temporary directory (its manifest written last) to vNNNN, so nothing a killed
    build leaves behind (a `.tmp-*` directory) is listed; a version it renamed but did not make
    CURRENT is complete, and listed."""
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


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open_plain(path) as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def is_plain_name(name: object) -> bool:
    """A file name that stays in its directory: no separators, not '.' or '..', no NUL."""
    return (isinstance(name, str) and name not in ("", ".", "..") and not any(c in name for c in "/\\\0"))


def open_plain(path: str | Path):
    """Open a regular file for reading, refusing a symlink, a FIFO, a device or a directory
    (O_NOFOLLOW; O_NONBLOCK so that a FIFO cannot block the open)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as e:
        raise IndexCorruptError(f"{_shown(path)} cannot be opened as a plain file ({e.strerror})") from None
    f = os.fdopen(fd, "rb")
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        f.close()
        raise IndexCorruptError(f"{_shown(path)} is not a regular file")
    return f


def _shown(path: str | Path) -> str:
    """A path as messages show it: VERSION/NAME, relative to the index root (no host paths)."""
    path = Path(path)
    return f"{path.parent.name}/{path.name}"


def _plain_file(directory: Path, name: str) -> Path:
    """directory/name when it is a regular file there (not a symlink, which could lead anywhere)."""
    path = directory / name
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        raise IndexCorruptError(f"{_shown(path)} is missing") from None
    if not stat.S_ISREG(mode):
        raise IndexCorruptError(f"{_shown(path)} is {'a symlink' if stat.S_ISLNK(mode) else 'not a regular file'}; "
                                f"a version holds plain files only")
    return path


def _is_checkpoint_name(model: str) -> bool:
    """Does a manifest's model name a checkpoint file in the version (rather than a registered model)?"""
    return is_plain_name(model) and model.endswith(CHECKPOINT_SUFFIX)


def version_dir(root: str | Path, version: str) -> Path:
    """ROOT/version, refused unless its name is a version name and it is a directory that stays
    under the index root (a symlinked version must resolve inside it)."""
    root = Path(root)
    if not VERSION_RE.match(version):
        raise IndexCorruptError(f"'{version}' is not a version directory name")
    path = root / version
    if path.is_symlink() and not path.resolve().is_relative_to(root.resolve()):
        raise IndexCorruptError(f"version {version} is a symlink that leads outside the index root")
    if not path.is_dir():
        raise IndexCorruptError(f"version {version} is not a directory")
    return path


def version_signature(root: str | Path, version: str) -> tuple:
    """A cheap signature of a version's files (name, inode, size, mtime of each entry, symlinks
    not followed): it changes when a file is rewritten, added or removed."""
    path = Path(root) / version
    try:
        entries = sorted(os.scandir(path), key=lambda e: e.name) if path.is_dir() else []
        stats = [(e.name, *_stat_key(e.stat(follow_symlinks=False))) for e in entries]
        return (_stat_key(os.lstat(path)), *stats)
    except OSError:
        return ()


def _stat_key(st: os.stat_result) -> tuple[int, int, int]:
    return st.st_ino, st.st_size, st.st_mtime_ns


@dataclass(frozen=True)
class Manifest:
    """What a reader relies on in manifest.json, type-checked; `raw` is the whole document (counts,
    reports, recall) as the builder wrote it."""
    format: str
    model: str              # a registered model name, or a checkpoint file in the version directory
    fingerprint: str
    dim: int
    files: dict[str, str]   # plain file name -> sha256
    raw: dict[str, Any]

    @classmethod
    def from_json(cls, text: str, where: str = MANIFEST) -> "Manifest":
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
            raise IndexFormatError(f"{where} has index format {fmt!r}, this reader needs {FORMAT!r}; "
                                   f"rebuild it with `index-builder build`")
        dim, files = _field(doc, "dim", int, where), _field(doc, "files", dict, where)
        if dim < 1:
            raise IndexCorruptError(f"{where}: field 'dim' must be positive, got {dim}")
        for name, digest in files.items():
            if not is_plain_name(name) or not isinstance(digest, str):
                raise IndexCorruptError(f"{where}: field 'files' must map plain file names in the version directory "
                                        f"to sha256 strings; {name!r}: {digest!r} is not one")
        return cls(fmt, _field(doc, "model", str, where), _field(doc, "fingerprint", str, where), dim, files, doc)


_TYPE_NAMES = {str: "a non-empty string", int: "an integer", dict: "an object"}


def _field(doc: dict, key: str, kind: type, where: str):
    if key not in doc:
        raise IndexCorruptError(f"{where}: field '{key}' is missing")
    value = doc[key]
    if not isinstance(value, kind) or isinstance(value, bool) or (kind is str and not value):
        raise IndexCorruptError(f"{where}: field '{key}' must be {_TYPE_NAMES[kind]}, got {json.dumps(value)[:80]}")
    return value


class IndexVersion:
    """One published version, opened read-only: FAISS search plus SQLite metadata."""

    def __init__(self, path: Path, manifest: Manifest, indexes: dict[str, faiss.Index]):
        self.path, self.name, self.manifest, self.indexes = path, path.name, manifest, indexes
        self.dim = manifest.dim
        self._db = sqlite3.connect(f"file:{_plain_file(path, META)}?mode=ro", uri=True, check_same_thread=False)

    @classmethod
    def open(cls, root: str | Path, version: str | None = None, verify: bool = True) -> "IndexVersion":
        """Open `version`, or the one CURRENT names. `verify` checks the sha256 of every file the
        manifest lists, and that it lists every file read here."""
        root = Path(root)
        version = version or read_current(root)
        if version is None:
            raise IndexUnavailableError(f"no index version is published under '{root}' yet (no {CURRENT} file)")
        path = version_dir(root, version)
        with open_plain(_plain_file(path, MANIFEST)) as f:
            manifest = Manifest.from_json(f.read().decode("utf-8", "replace"), f"{version}/{MANIFEST}")
        if verify:
            model_file = [manifest.model] if _is_checkpoint_name(manifest.model) else []
            read_here = [*INDEX_FILES.values(), META, *model_file]
            unlisted = [name for name in read_here if name not in manifest.files]
            if unlisted:
                raise IndexCorruptError(f"{version}/{MANIFEST}: field 'files' has no checksum for "
                                        f"{', '.join(unlisted)}")
            for name, digest in manifest.files.items():
                if sha256_file(_plain_file(path, name)) != digest:
                    raise IndexCorruptError(f"{version}/{name} does not match its checksum in the manifest")
        indexes = {}
        for modality, filename in INDEX_FILES.items():
            try:
                index = faiss.read_index(str(_plain_file(path, filename)))
            except RuntimeError as e:  # faiss reports an unreadable file this way
                raise IndexCorruptError(f"cannot read {version}/{filename}: {str(e).splitlines()[0]}") from e
            if index.d != manifest.dim + 1:
                raise IndexCorruptError(f"{version}/{filename} has dimension {index.d}, the manifest's embedding "
                                        f"dimension {manifest.dim} plus its bias coordinate is {manifest.dim + 1}")
            ivf = faiss.try_extract_index_ivf(index)
            if ivf is not None:
                ivf.make_direct_map()  # reconstruct by id (the bias of each hit), made before any search
            indexes[modality] = index
        return cls(path, manifest, indexes)

    @property
    def model(self) -> str:
        return self.manifest.model

    @property
    def fingerprint(self) -> str:
        return self.manifest.fingerprint

    def model_source(self) -> str:
        """What `create_model` loads for this version: the registered model the manifest names, or
        the safetensors checkpoint inside the version directory it names. Anything else (a path
        elsewhere on the host, an open_clip spec) is refused: an index folder names its model but
        does not choose files or code outside itself. The server's --model overrides this."""
        from retrieval.embedding.factory import list_models  # torch and the towers: only where a model is loaded

        model = self.manifest.model
        if model in list_models():
            return model
        if _is_checkpoint_name(model):
            return str(_plain_file(self.path, model))
        shown = repr(model) if is_plain_name(model) else "a path"  # a path on the builder's host is not shown
        raise IndexCorruptError(f"{self.name}/{MANIFEST}: field 'model' is {shown}, which is neither a registered "
                                f"model ({', '.join(list_models())}) nor a {CHECKPOINT_SUFFIX} checkpoint in the "
                                f"version directory; serve it with --model if you trust it")

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
            scores[found] -= reconstruct(index, ids[found])[:, self.dim]   # back to the cosine
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

    def longest_strings(self, modality: Modality) -> dict[str, int]:
        """Bytes of the longest stored string per metadata column a result of `modality` carries
        (uri; caption and image_uri): what bounds a reply's size before any search."""
        table, cols = ("images", ("uri",)) if modality == "image" else ("texts", ("caption", "image_uri"))
        lengths = ", ".join(f"coalesce(max(length(CAST({c} AS BLOB))), 0)" for c in cols)
        return dict(zip(cols, self._db.execute(f"SELECT {lengths} FROM {table}").fetchone()))

    def close(self) -> None:
        self._db.close()
