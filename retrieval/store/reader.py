"""Reading a published index version (`IndexVersion`): what the server and the builder's checks
share. Readers resolve CURRENT once per open; a version directory is complete before CURRENT names
it. A version is data, never code: its manifest is checked against a typed schema
(`retrieval.store.manifest`), only plain files inside the version directory are read
(`retrieval.store.layout`), and its model is a registered name or a safetensors checkpoint inside
the version (`IndexVersion.model_source`). Searches report the cosine, whether or not the ranking
added each item's bias (`retrieval.store.vectors`).
"""
from __future__ import annotations

import sqlite3
from collections.abc import Collection
from pathlib import Path

import faiss
import numpy as np

from retrieval.errors import IndexCorruptError, IndexUnavailableError, InvalidInputError
from retrieval.hits import Modality
from retrieval.store import schema
from retrieval.store.layout import (CHECKPOINT_SUFFIX, CURRENT, INDEX_FILES, MANIFEST, META, is_checkpoint_name,
                                    is_plain_name, open_plain, plain_file, read_current, sha256_file, version_dir)
from retrieval.store.manifest import Manifest
from retrieval.store.vectors import query_rows, reconstruct, restricted_to


class IndexVersion:
    """One published version, opened read-only: FAISS search plus SQLite metadata."""

    def __init__(self, path: Path, manifest: Manifest, indexes: dict[str, faiss.Index]):
        self.path, self.name, self.manifest, self.indexes = path, path.name, manifest, indexes
        self.dim = manifest.dim
        self._db = sqlite3.connect(f"file:{plain_file(path, META)}?mode=ro", uri=True, check_same_thread=False)

    @classmethod
    def open(cls, root: str | Path, version: str | None = None, verify: bool = True) -> "IndexVersion":
        """Open `version`, or the one CURRENT names. `verify` checks the sha256 of every file the
        manifest lists, and that it lists every file read here."""
        root = Path(root)
        version = version or read_current(root)
        if version is None:
            raise IndexUnavailableError(f"no index version is published under '{root}' yet (no {CURRENT} file)")
        path = version_dir(root, version)
        with open_plain(plain_file(path, MANIFEST)) as f:
            manifest = Manifest.from_json(f.read().decode("utf-8", "replace"), f"{version}/{MANIFEST}")
        if verify:
            model_file = [manifest.model] if is_checkpoint_name(manifest.model) else []
            read_here = [*INDEX_FILES.values(), META, *model_file]
            unlisted = [name for name in read_here if name not in manifest.files]
            if unlisted:
                raise IndexCorruptError(f"{version}/{MANIFEST}: field 'files' has no checksum for "
                                        f"{', '.join(unlisted)}")
            for name, digest in manifest.files.items():
                if sha256_file(plain_file(path, name)) != digest:
                    raise IndexCorruptError(f"{version}/{name} does not match its checksum in the manifest")
        indexes = {}
        for modality, filename in INDEX_FILES.items():
            try:
                index = faiss.read_index(str(plain_file(path, filename)))
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

    def model_source(self, registered: Collection[str]) -> str:
        """What `create_model` loads for this version: the `registered` model the manifest names, or
        the safetensors checkpoint inside the version directory it names. Anything else (a path
        elsewhere on the host, an open_clip spec) is refused: an index folder names its model but
        does not choose files or code outside itself. The server's --model overrides this."""
        model = self.manifest.model
        if model in registered:
            return model
        if is_checkpoint_name(model):
            return str(plain_file(self.path, model))
        shown = repr(model) if is_plain_name(model) else "a path"  # a path on the builder's host is not shown
        raise IndexCorruptError(f"{self.name}/{MANIFEST}: field 'model' is {shown}, which is neither a registered "
                                f"model ({', '.join(sorted(registered))}) nor a {CHECKPOINT_SUFFIX} checkpoint in the "
                                f"version directory; serve it with --model if you trust it")

    def count(self, modality: Modality) -> int:
        return int(self.indexes[modality].ntotal)

    def search(self, modality: Modality, queries: np.ndarray, k: int, cross_modal: bool = False,
               allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k of `modality` for unit query rows (B, D): (cosines (B, k), ids (B, k)); id -1 pads
        when fewer than k items exist. `cross_modal` ranks by cosine + the inverted softmax's bias
        (queries of the other modality); `allowed` restricts the search to those ids.
        Thread-safe (FAISS search and reconstruction are read-only)."""
        scores, _, ids = self.search_with_bias(modality, queries, k, cross_modal, allowed)
        return scores, ids

    def search_with_bias(self, modality: Modality, queries: np.ndarray, k: int, cross_modal: bool = True,
                         allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`search`, also returning each hit's inverted-softmax bias (B, k) (zero for padding, and
        when not `cross_modal`, which ranks by the plain cosine)."""
        queries = np.asarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise InvalidInputError(f"query vectors must have shape (B, {self.dim}), got {queries.shape}")
        if k <= 0:
            raise InvalidInputError(f"k must be positive, got {k}")
        index = self.indexes[modality]
        params = None if allowed is None else restricted_to(index, allowed)
        scores, ids = index.search(query_rows(queries, cross_modal), min(k, max(1, self.count(modality))), params=params)
        bias = np.zeros_like(scores)
        if cross_modal:
            found = ids >= 0
            bias[found] = reconstruct(index, ids[found])[:, self.dim]
            scores[found] -= bias[found]   # back to the cosine
        return scores, bias, ids

    def metadata(self, modality: Modality, ids: np.ndarray | list[int]) -> list[dict | None]:
        """Rows for ids, in order (None for -1 or unknown ids)."""
        ids = [int(i) for i in ids]
        rows = schema.select_rows(self._db, modality, [i for i in ids if i >= 0])
        return [rows.get(i) for i in ids]

    def longest_strings(self, modality: Modality) -> dict[str, int]:
        """Bytes of the longest stored string per metadata column a result of `modality` carries
        (uri; caption and image_uri): what bounds a reply's size before any search."""
        return schema.longest_strings(self._db, modality)

    def close(self) -> None:
        self._db.close()
