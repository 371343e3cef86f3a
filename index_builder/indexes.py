"""A version's two FAISS indexes, from the vectors a build has: reused from the base version, or
in the shard store under their content hash.

Each stored row is the unit embedding with its inverted-softmax bias, [g, b_g] (D+1), so that a
cross-modal query [q, 1] ranks by the corrected score and a same-modal one [q, 0] by the cosine.
The index type is given (--index-factory) or chosen by size, held in memory or as an on-disk IVF
(`ivf_ondisk`), and each index's recall@10 against exact search is measured for cross-modal and
in-collection queries. Vectors stream in blocks: no modality is ever held whole in memory.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np

from index_builder import faiss_index, ivf_ondisk
from index_builder.encode import ShardStore
from retrieval.embedding.querybank import QueryBank
from retrieval.store.layout import INDEX_FILES, STORAGE_MEMORY, STORAGE_MMAP
from retrieval.store.vectors import query_rows, reconstruct, with_bias

log = logging.getLogger(__name__)

BLOCK = 8192  # items per block read back from a base index


@dataclass
class Vectors:
    """One modality's items: ids reused from the base version, ids whose vector is in the shard
    store under their content hash."""

    reuse: list[int]
    need: dict[str, list[int]]  # sha256 -> ids
    store: ShardStore
    base_index: faiss.Index | None

    @property
    def count(self) -> int:
        return len(self.reuse) + sum(len(v) for v in self.need.values())

    def blocks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids, unit embeddings (n, D)) of every item, reused ones first."""
        for start in range(0, len(self.reuse), BLOCK):
            ids = np.asarray(self.reuse[start : start + BLOCK], np.int64)
            yield ids, reconstruct(self.base_index, ids)[:, :-1]  # the embedding without its bias
        emitted: set[str] = set()
        for shas, vecs in self.store.iter_vectors():
            rows, ids = [], []
            for r, sha in enumerate(shas.tolist()):
                if sha in self.need and sha not in emitted:
                    emitted.add(sha)
                    rows += [r] * len(self.need[sha])
                    ids += self.need[sha]
            if rows:
                yield np.asarray(ids, np.int64), vecs[rows]


def need_of(items: Iterable) -> dict[str, list[int]]:
    """{sha256: ids} of items (with .sha256 and .id): one vector serves every item of that content."""
    need: dict[str, list[int]] = {}
    for it in items:
        need.setdefault(it.sha256, []).append(it.id)
    return need


@dataclass
class Written:
    """What the manifest says of the indexes written."""

    factories: dict[str, str] = field(default_factory=dict)
    types: dict[str, str] = field(default_factory=dict)
    recalls: dict[str, dict] = field(default_factory=dict)
    storage: dict[str, str] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)


def plan(counts: dict[str, int], on_disk: bool, index_factory: str | None, dim: int) -> tuple[dict, dict]:
    """({modality: on disk?}, {modality: factory string}) for galleries of these sizes."""
    on_disk_of = {m: n > 0 and ivf_ondisk.wanted(on_disk, n, index_factory, dim + 1) for m, n in counts.items()}
    factory_of = {
        m: "Flat" if n == 0 else (index_factory or faiss_index.choose_factory(n, ivf=on_disk_of[m]))
        for m, n in counts.items()
    }
    return on_disk_of, factory_of


def write_indexes(
    vectors: dict[str, Vectors],
    on_disk_of: dict[str, bool],
    factory_of: dict[str, str],
    bank: QueryBank,
    dim: int,
    folder: Path,
    work: Path,
    recall_queries: int,
) -> Written:
    """Both indexes into `folder` (on-disk IVF lists are merged through `work`)."""
    written = Written()
    for modality, mod in vectors.items():
        other_name = "text" if modality == "image" else "image"
        other = vectors[other_name]
        on_disk, factory = on_disk_of[modality], factory_of[modality]
        log.info("building the %s index (%s%s) over %d vectors", modality, factory, ", on disk" * on_disk, mod.count)
        stored = stored_rows(mod.blocks, bank, modality)
        if on_disk:
            stem = Path(INDEX_FILES[modality]).stem
            built = ivf_ondisk.build(stored, mod.count, dim + 1, factory, folder, stem, work / f"ivf-{modality}")
            index, files = built.index, built.files
        else:
            index, files = faiss_index.build_index(stored, mod.count, dim + 1, factory), [INDEX_FILES[modality]]
            faiss.write_index(index, str(folder / INDEX_FILES[modality]))
        recall = faiss_index.recall_at_10(
            index,
            stored,
            {  # what cross-modal queries get, and in-collection ones
                "cross_modal": _query_sample(other, recall_queries, True),
                "same_modal": _query_sample(mod, recall_queries, False),
            },
        )
        recall["cross_modal"]["query_source"] = other_name
        recall["same_modal"]["query_source"] = f"{modality} (in-collection sample)"
        headline = recall["cross_modal"] if other.count else recall["same_modal"]
        written.factories[modality], written.types[modality] = factory, faiss_index.describe(index)
        written.recalls[modality] = {**headline, **recall}
        written.storage[modality] = STORAGE_MMAP if on_disk else STORAGE_MEMORY
        written.files += files
        del index
    return written


def stored_rows(blocks: faiss_index.Blocks, bank: QueryBank, modality: str) -> faiss_index.Blocks:
    """A fresh pass of (ids, rows [g, b_g]): each embedding with its inverted-softmax bias.
    Biases are computed on the first pass over a block and kept (4 bytes an item): the index's
    training sample, its adds and the recall check each pass over the blocks, in the same order."""
    biases: list[np.ndarray] = []  # one (n,) array per block, in block order

    def stored():
        for i, (ids, vecs) in enumerate(blocks()):
            if i == len(biases):
                biases.append(bank.bias(vecs, modality))
            assert len(biases[i]) == len(ids), "blocks must come in the same order on every pass"
            yield ids, with_bias(vecs, biases[i])

    return stored


def _query_sample(mod: Vectors, want: int, cross_modal: bool) -> np.ndarray:
    """About `want` query rows spread over the modality's items ([q, 1] for cross-modal, else [q, 0])."""
    if not mod.count:
        return np.zeros((0, 0), np.float32)
    return query_rows(faiss_index.sample(mod.blocks, mod.count, want), cross_modal=cross_modal)
