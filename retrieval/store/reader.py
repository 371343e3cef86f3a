"""Reading a published index version (`IndexVersion`): what the server and the builder's checks
share. Readers resolve CURRENT once per open; a version directory is complete before CURRENT names
it. A version is data, never code: its manifest is checked against a typed schema
(`retrieval.store.manifest`), only plain files inside the version directory are read
(`retrieval.store.layout`), and its model is a registered name or a safetensors checkpoint inside
the version (`IndexVersion.model_source`). Searches report the cosine, whether or not the ranking
added each item's bias (`retrieval.store.vectors`).

An index the manifest's `storage` marks "mmap" (built on disk, `index_builder.ivf_ondisk`) is a bare
IVF index whose inverted lists live in `images.ivfdata` beside it, memory-mapped rather than read
into RAM, with its biases in a side table (`retrieval.store.bias_table`); "memory" (the default) is
read whole.
"""

from __future__ import annotations

import functools
import sqlite3
from collections.abc import Collection
from pathlib import Path

import faiss
import numpy as np

from retrieval.errors import IndexCorruptError, IndexUnavailableError, InvalidInputError
from retrieval.hits import Modality
from retrieval.store import attributes, schema
from retrieval.store.bias_table import BiasTable
from retrieval.store.layout import (
    CHECKPOINT_SUFFIX,
    CURRENT,
    INDEX_FILES,
    MANIFEST,
    META,
    STORAGE_MEMORY,
    STORAGE_MMAP,
    is_checkpoint_name,
    is_plain_name,
    open_plain,
    plain_file,
    read_current,
    sha256_file,
    version_dir,
)
from retrieval.store.manifest import Manifest
from retrieval.store.vectors import query_rows, reconstruct, reconstructs, search_within


def read_index_file(path: Path, storage: str = STORAGE_MEMORY) -> faiss.Index:
    """Read an index file; with STORAGE_MMAP, map its on-disk inverted lists read-only from the data
    file named in it, looked up next to the index file (the version directory may have been renamed
    or mounted elsewhere since the build). That is what faiss's IO_FLAG_ONDISK_SAME_DIR does, but
    it also prints to stdout; so the lists are read without their data, then mapped here. Messages
    name the file as VERSION/NAME (no host paths)."""
    shown = f"{path.parent.name}/{path.name}"
    try:
        if storage != STORAGE_MMAP:
            return faiss.read_index(str(path))
        index = faiss.read_index(str(path), faiss.IO_FLAG_SKIP_IVF_DATA | faiss.IO_FLAG_READ_ONLY)
        ivf = faiss.try_extract_index_ivf(index)
        lists = faiss.downcast_InvertedLists(ivf.invlists) if ivf is not None else None
        if not isinstance(lists, faiss.OnDiskInvertedLists):
            raise IndexCorruptError(f"{shown} is marked memory-mapped but has no on-disk inverted lists")
        data = plain_file(path.parent, Path(lists.filename).name)
        if data.stat().st_size < lists.totsize:
            raise IndexCorruptError(
                f"{path.parent.name}/{data.name}, the inverted lists of {shown}, is shorter than the index says"
            )
        lists.filename = str(data)
        lists.do_mmap()
        return index
    except RuntimeError as e:  # faiss reports a missing or unreadable file this way
        raise IndexCorruptError(f"cannot read {shown}: {str(e).splitlines()[0]}") from e


class IndexVersion:
    """One published version, opened read-only: FAISS search plus SQLite metadata."""

    def __init__(
        self,
        path: Path,
        manifest: Manifest,
        indexes: dict[str, faiss.Index],
        bias_tables: dict[str, BiasTable] | None = None,
    ):
        self.path, self.name, self.manifest, self.indexes = path, path.name, manifest, indexes
        self.bias_tables = bias_tables or {}
        self.dim = manifest.dim
        self._db = sqlite3.connect(f"file:{plain_file(path, META)}?mode=ro", uri=True, check_same_thread=False)
        # the ids of recent filters: a page, and a repeated filter, cost no SQL (at most 16 arrays of ids)
        self.matching = functools.lru_cache(maxsize=16)(self._matching)

    @classmethod
    def open(cls, root: str | Path, version: str | None = None, verify: bool = True) -> IndexVersion:
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
                raise IndexCorruptError(
                    f"{version}/{MANIFEST}: field 'files' has no checksum for {', '.join(unlisted)}"
                )
            for name, digest in manifest.files.items():
                if sha256_file(plain_file(path, name)) != digest:
                    raise IndexCorruptError(f"{version}/{name} does not match its checksum in the manifest")
        indexes, bias_tables = {}, {}
        for modality, filename in INDEX_FILES.items():
            storage = manifest.raw.get("storage", {}).get(modality, STORAGE_MEMORY)
            index = read_index_file(plain_file(path, filename), storage)
            if index.d != manifest.dim + 1:
                raise IndexCorruptError(
                    f"{version}/{filename} has dimension {index.d}, the manifest's embedding "
                    f"dimension {manifest.dim} plus its bias coordinate is {manifest.dim + 1}"
                )
            ivf = faiss.try_extract_index_ivf(index)
            if storage == STORAGE_MMAP:
                bias_tables[modality] = BiasTable(path, Path(filename).stem)
            elif ivf is not None:
                ivf.make_direct_map()  # reconstruct by id (the bias of each hit), made before any search
            indexes[modality] = index
        return cls(path, manifest, indexes, bias_tables)

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
        raise IndexCorruptError(
            f"{self.name}/{MANIFEST}: field 'model' is {shown}, which is neither a registered "
            f"model ({', '.join(sorted(registered))}) nor a {CHECKPOINT_SUFFIX} checkpoint in the "
            f"version directory; serve it with --model if you trust it"
        )

    def count(self, modality: Modality) -> int:
        return int(self.indexes[modality].ntotal)

    def search(
        self,
        modality: Modality,
        queries: np.ndarray,
        k: int,
        cross_modal: bool = False,
        allowed: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k of `modality` for unit query rows (B, D): (cosines (B, k), ids (B, k)); id -1 pads
        when fewer than k items exist. `cross_modal` ranks by cosine + the inverted softmax's bias
        (queries of the other modality); `allowed` restricts the search to those ids (`search_within`:
        min(k, len(allowed)) results). Thread-safe (FAISS search and reconstruction are read-only)."""
        queries = np.asarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise InvalidInputError(f"query vectors must have shape (B, {self.dim}), got {queries.shape}")
        if k <= 0:
            raise InvalidInputError(f"k must be positive, got {k}")
        index = self.indexes[modality]
        rows = query_rows(queries, cross_modal)
        if allowed is None:
            scores, ids = index.search(rows, min(k, max(1, self.count(modality))))
        else:
            scores, ids = search_within(index, rows, k, allowed)
        if cross_modal:
            found = ids >= 0
            scores[found] -= self.bias(modality, ids[found])  # back to the cosine
        return scores, ids

    def vectors(self, modality: Modality, ids: np.ndarray) -> np.ndarray:
        """The stored unit vectors (N, D) of known ids (their rows [g, b_g] without the bias)."""
        return self.rows(modality, ids)[:, : self.dim]

    def rows(self, modality: Modality, ids: np.ndarray) -> np.ndarray:
        """The stored rows (N, D+1) [g, b_g] of known ids. A memory-mapped IVF index keeps no direct
        map, so it cannot give them back: what needs them (more like this, diversity, dedup) is
        refused on it with a clear error; its biases are in `bias`."""
        if not reconstructs(self.indexes[modality]):
            raise InvalidInputError(
                f"the {modality} index of {self.name} is memory-mapped and does not give stored "
                f"vectors back: more like this, diversity and dedup are not served on it"
            )
        return reconstruct(self.indexes[modality], ids)

    def bias(self, modality: Modality, ids: np.ndarray) -> np.ndarray:
        """The inverted-softmax bias b_g (N,) of known ids: from the side table of a memory-mapped
        index, else the stored rows' last coordinate."""
        table = self.bias_tables.get(modality)
        return table.lookup(ids) if table else reconstruct(self.indexes[modality], ids)[:, self.dim]

    def within(self, modality: Modality, query: np.ndarray, min_cosine: float) -> tuple[np.ndarray, np.ndarray]:
        """Every item whose cosine with the unit query (D,) is at least `min_cosine` (FAISS range
        search with [q, 0], so the bias plays no part in what is inside): (cosines, ids), unsorted.
        Exact on Flat and IVF-Flat storage over the probed lists; on HNSW the graph's search."""
        row = query_rows(np.asarray(query, np.float32)[None], cross_modal=False)
        _, cosines, ids = self.indexes[modality].range_search(row, float(min_cosine))
        return cosines, ids

    @property
    def filter_fields(self) -> dict[str, attributes.FieldType]:
        return self.manifest.filter_fields

    def _matching(self, modality: Modality, conditions: tuple[attributes.Condition, ...]) -> np.ndarray:
        """Sorted ids of `modality` items every condition holds for (InvalidInputError naming a bad
        one); read-only, as `matching` caches them."""
        ids = attributes.matching_ids(self._db, modality, conditions, self.filter_fields)
        ids.flags.writeable = False
        return ids

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
