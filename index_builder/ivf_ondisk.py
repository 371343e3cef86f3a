"""IVF indexes built in pieces and merged on disk, for collections larger than one process's RAM
(faiss's recipe: `faiss.contrib.ondisk.merge_ondisk`, `OnDiskInvertedLists`).

1. `train_empty`: train the coarse quantizer (and PQ/OPQ codebooks, when the factory has them) once,
   on a sample; the trained empty index is a few MB.
2. `add_block`: a worker loads a copy of the empty index, adds its block of (ids, rows) and writes
   the block's inverted lists to a file. It is a pure function of files and arrays, so blocks can
   run sequentially, in local processes or in tasks of a cluster (any `map`-like callable).
3. `merge`: the blocks' inverted lists are concatenated list by list into one `.ivfdata` file
   (memory-mapped while merging, so the total may exceed RAM) beside an index file that holds the
   quantizer and the lists' offsets.

The index is a bare IVF (no IDMap2: ids live in the inverted lists, on disk); each row is [g, b_g]
as everywhere (`retrieval.store.reader`). The index file stores the data file's name without a
directory; readers look for it next to the index file (`retrieval.store.reader.read_index_file`,
like faiss's IO_FLAG_ONDISK_SAME_DIR), so a version directory can be renamed after the build (its
temporary name becomes vNNNN) or mounted anywhere. Searching an on-disk index needs no direct map; the bias of each
hit comes from a side table of (id, bias) sorted by id (`retrieval.store.bias_table`).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
from faiss.contrib.ondisk import merge_ondisk

from index_builder import faiss_index
from retrieval.errors import DatasetError
from retrieval.store.bias_table import write_bias_table
from retrieval.store.layout import STORAGE_MMAP
from retrieval.store.reader import read_index_file

log = logging.getLogger(__name__)

MIN_ROWS = faiss_index.ON_DISK_MIN  # above it, IVF indexes are built and served on disk
ADD_BLOCK = 262_144  # rows per add_block call: ~270 MB of [g, b_g] rows at D = 256, plus the block's lists
# Like the builtin map (the default: one block after another, lazily): mapper(fn, jobs) -> results in
# order. `fn` is a module-level function, so a process pool or a cluster can ship it; a mapper that
# drains `jobs` eagerly holds every block's rows at once.
Mapper = Callable[[Callable, Iterable], Iterable]


def wanted(requested: bool, n: int, factory: str | None, dim: int) -> bool:
    """Build on disk: on request (`--on-disk`), else for collections above MIN_ROWS whose factory can
    be (the automatic choice there is IVF)."""
    if requested or n <= MIN_ROWS:
        return requested
    try:
        check_factory(factory or faiss_index.choose_factory(n), dim)
    except DatasetError:
        return False
    return True


def check_factory(factory: str, dim: int) -> None:
    """DatasetError unless `factory` makes an IVF index whose lists can be merged on disk."""
    index = faiss_index.make_index(dim, factory, id_map=False)
    if faiss.try_extract_index_ivf(index) is None or isinstance(index, faiss.IndexRefine):
        raise DatasetError(
            f"on-disk indexes need an IVF factory without a refine stage (e.g. 'IVF4096,Flat' or "
            f"'OPQ32_256,IVF4096,PQ32'), got '{factory}'"
        )


def train_empty(sample: np.ndarray, factory: str) -> bytes:
    """The trained, empty index for rows like `sample` (n, D+1), serialized."""
    check_factory(factory, sample.shape[1])
    index = faiss_index.make_index(sample.shape[1], factory, id_map=False)
    faiss_index.train(index, np.ascontiguousarray(sample, np.float32), factory)
    return faiss.serialize_index(index).tobytes()


def add_block(empty_index: str | Path, ids: np.ndarray, rows: np.ndarray, out: str | Path) -> str:
    """Add one block of rows [g, b_g] under `ids` to a copy of the trained empty index; write it to `out`."""
    index = faiss.read_index(str(empty_index))
    index.add_with_ids(faiss_index.checked_rows(rows), np.ascontiguousarray(ids, np.int64))
    tmp = Path(f"{out}.part")
    faiss.write_index(index, str(tmp))
    tmp.replace(out)
    return str(out)


def add_job(job: tuple[str, np.ndarray, np.ndarray, str]) -> str:
    """`add_block` on one (empty index, ids, rows, out) tuple: what `build` maps over the blocks."""
    return add_block(*job)


def merge(empty_index: str | Path, blocks: list[str | Path], out_index: Path, out_data: Path) -> int:
    """Merge the blocks' inverted lists into `out_data` and write the index over it to `out_index`
    (both in one directory); returns the number of vectors."""
    if Path(out_index).parent != Path(out_data).parent:
        raise ValueError("the index and its data file must share a directory")
    index = faiss.read_index(str(empty_index))
    with _c_stdout_to_stderr():
        merge_ondisk(index, [str(b) for b in blocks], str(out_data))
    lists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists)
    lists.filename = Path(out_data).name  # resolved next to the index file on reading (see the docstring)
    faiss.write_index(index, str(out_index))
    return int(index.ntotal)


@contextlib.contextmanager
def _c_stdout_to_stderr():
    """faiss prints 'resizing FILE to N bytes' on C's stdout while it merges, and the builder's stdout
    carries its --json output: point file descriptor 1 at stderr meanwhile (flushing C's buffers on
    the way out). Hand-written: ten lines, against a dependency (wurlitzer) for them."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        ctypes.CDLL(None).fflush(None)
        os.dup2(saved, 1)
        os.close(saved)


def _chunks(blocks: Iterator[tuple[np.ndarray, np.ndarray]], size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Re-cut a stream of (ids, rows) blocks into blocks of `size` rows (the last one shorter)."""
    ids_buf: list[np.ndarray] = []
    rows_buf: list[np.ndarray] = []
    held = 0
    for ids, rows in blocks:
        ids_buf.append(np.asarray(ids, np.int64))
        rows_buf.append(np.asarray(rows, np.float32))
        held += len(ids)
        while held >= size:
            ids_all, rows_all = np.concatenate(ids_buf), np.concatenate(rows_buf)
            yield ids_all[:size], rows_all[:size]
            ids_buf, rows_buf, held = [ids_all[size:]], [rows_all[size:]], held - size
    if held:
        yield np.concatenate(ids_buf), np.concatenate(rows_buf)


@dataclass
class OnDiskIndex:
    index: faiss.Index  # opened as a server opens it: memory-mapped
    files: list[str]  # names of the files written in the output directory
    seconds: dict[str, float]  # train, add, merge


def build(
    blocks: faiss_index.Blocks,
    n: int,
    dim: int,
    factory: str,
    out_dir: Path,
    stem: str,
    work: Path,
    mapper: Mapper = map,
    block_rows: int = ADD_BLOCK,
) -> OnDiskIndex:
    """Train on an even sample of the stream, add it block by block through `mapper`, merge into
    out_dir/{stem}.faiss + {stem}.ivfdata, and write the bias side table.
    `work` holds the empty index and the block files until the merge is done."""
    if work.exists():
        shutil.rmtree(work)  # blocks of an interrupted build: their ids may not match this one's
    work.mkdir(parents=True)
    empty = work / "empty.faiss"
    clock = [time.perf_counter()]
    seconds: dict[str, float] = {}

    def lap(name: str) -> None:
        clock.append(time.perf_counter())
        seconds[name] = round(clock[-1] - clock[-2], 2)

    empty.write_bytes(train_empty(faiss_index.sample(blocks, n, faiss_index.train_rows(factory, dim)), factory))
    lap("train")
    all_ids: list[np.ndarray] = []
    biases: list[np.ndarray] = []

    def jobs():
        for i, (ids, rows) in enumerate(_chunks(blocks(), block_rows)):
            all_ids.append(ids)
            biases.append(rows[:, -1].copy())
            yield str(empty), ids, rows, str(work / f"block{i:06d}.faiss")

    block_files = list(mapper(add_job, jobs()))
    faiss_index.check_count(sum(len(i) for i in all_ids), n)
    lap("add")
    index_name, data_name = f"{stem}.faiss", f"{stem}.ivfdata"
    log.info("merging %d block(s) of the %s index on disk into %s", len(block_files), factory, out_dir / data_name)
    merge(empty, block_files, out_dir / index_name, out_dir / data_name)
    shutil.rmtree(work)
    ids = np.concatenate(all_ids) if all_ids else np.zeros(0, np.int64)
    side = write_bias_table(out_dir, stem, ids, np.concatenate(biases) if biases else np.zeros(0, np.float32))
    lap("merge")
    log.info("on-disk %s index of %d vectors: %s seconds", factory, n, seconds)
    return OnDiskIndex(read_index_file(out_dir / index_name, STORAGE_MMAP), [index_name, data_name, *side], seconds)
