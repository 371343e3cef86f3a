"""Streaming, resumable encoding into content-addressed shards.

A build's work directory (`ROOT/.work-<model fingerprint>/`) holds, per modality, shards
`shard-000001.npz` with the sha256 of each encoded item's content and its unit vector, plus the
content hashes that failed to decode and why. A shard is written to a temporary name, fsynced and
renamed, so a build killed at any moment leaves only complete shards; the rerun scans them and
encodes only what they lack. Memory stays bounded: one shard's worth of vectors is in flight.

Images go through `retrieval.encoding.bulk.image_loader` (a DataLoader over `ImageFileDataset` whose
worker processes decode and preprocess while the main process runs the model). On 2 cores or
fewer there are no workers (`default_workers` says why): two threads each decode a batch and run
the model on it, one decoding while the other computes (`default_streams`, `retrieval.encoding.streams`).
Captions are tokenized in length-sorted batches in this process (`text_batches` says why), each
of two streams (on 2 cores or more) tokenizing its next batch while the other encodes.
`threaded_map` hands batches back in input order, so the shards do not depend on thread timing.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from retrieval.encoding.bulk import IMAGE_BATCH, default_streams, default_workers, image_loader, input_size
from retrieval.encoding.streams import threaded_map
from retrieval.errors import RetrievalError
from retrieval.progress import meter
from retrieval.sphere import is_unit_norm

log = logging.getLogger(__name__)

SHARD_RE = re.compile(r"^shard-(\d{6,})\.npz$")


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ShardStore:
    """Encoded vectors of one modality under one model, keyed by content sha256."""

    def __init__(self, directory: Path, dim: int):
        self.dir, self.dim = Path(directory), dim
        self.dir.mkdir(parents=True, exist_ok=True)

    def shard_paths(self) -> list[Path]:
        names = [p.name for p in self.dir.iterdir() if SHARD_RE.match(p.name)]
        return [self.dir / n for n in sorted(names, key=lambda n: int(SHARD_RE.match(n).group(1)))]

    def scan(self) -> tuple[set[str], dict[str, str]]:
        """(hashes with a vector, {hash: reason} of items that failed). Leftover temporary files
        of a killed run are removed; an unreadable shard is removed too (its items re-encode)."""
        for tmp in self.dir.glob("*.tmp*"):
            tmp.unlink(missing_ok=True)
        done: set[str] = set()
        failed: dict[str, str] = {}
        for path in self.shard_paths():
            try:
                with np.load(path, allow_pickle=False) as z:
                    done.update(z["sha"].tolist())
                    failed.update(zip(z["bad_sha"].tolist(), z["bad_reason"].tolist()))
            except Exception as e:  # a shard damaged after it was written: encode its items again
                log.warning("ignoring unreadable shard %s (%s)", path, e)
                path.unlink(missing_ok=True)
        return done, {k: v for k, v in failed.items() if k not in done}

    def next_number(self) -> int:
        existing = self.shard_paths()
        return int(SHARD_RE.match(existing[-1].name).group(1)) + 1 if existing else 1

    def write(self, shas: Sequence[str], vectors: np.ndarray, bad: dict[str, str], number: int | None = None) -> Path:
        """Write one shard atomically; `number` (default: the next one) lets several writers
        (`index_builder.ray_encode`) each take their own."""
        vectors = np.asarray(vectors, np.float32).reshape(len(shas), self.dim)
        if len(shas) and not is_unit_norm(vectors):
            raise RetrievalError("the model returned vectors that are not unit norm; refusing to store them")
        number = self.next_number() if number is None else number
        path = self.dir / f"shard-{number:06d}.npz"
        tmp = self.dir / f"shard-{number:06d}.tmp.npz"
        np.savez(
            tmp,
            sha=np.array(list(shas), dtype="U64"),
            vectors=vectors,
            bad_sha=np.array(list(bad), dtype="U64"),
            bad_reason=np.array(list(bad.values()), dtype=str),
        )
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(self.dir)
        return path

    def iter_vectors(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(sha (n,), vectors (n, D)) per shard, in shard order."""
        for path in self.shard_paths():
            with np.load(path, allow_pickle=False) as z:
                yield z["sha"], z["vectors"]


@dataclass
class EncodeStats:
    items: int = 0
    failed: int = 0
    seconds: float = 0.0
    streams: int = 1
    shards: list[str] = field(default_factory=list)

    @property
    def per_second(self) -> float:
        return self.items / self.seconds if self.seconds > 0 else 0.0


class _ShardWriter:
    """Accumulates (sha, vector) rows and flushes a shard every `shard_size` rows."""

    def __init__(self, store: ShardStore, shard_size: int, stats: EncodeStats):
        self.store, self.shard_size, self.stats = store, shard_size, stats
        self.shas: list[str] = []
        self.vecs: list[np.ndarray] = []
        self.bad: dict[str, str] = {}

    def add(self, shas: Sequence[str], vecs: np.ndarray, bad: dict[str, str]) -> None:
        self.shas += list(shas)
        self.vecs.append(vecs)
        self.bad.update(bad)
        if len(self.shas) + len(self.bad) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        if not self.shas and not self.bad:
            return
        vecs = np.concatenate(self.vecs) if self.vecs else np.zeros((0, self.store.dim), np.float32)
        path = self.store.write(self.shas, vecs, self.bad)
        self.stats.shards.append(path.name)
        log.debug("wrote %s (%d vectors, %d failures)", path.name, len(self.shas), len(self.bad))
        self.shas, self.vecs, self.bad = [], [], {}


def encode_pixels(
    model, shas: Sequence[str], pixels: torch.Tensor, errors: Sequence[str], dim: int
) -> tuple[list[str], np.ndarray, dict[str, str]]:
    """One batch through the image encoder: (shas of the good rows, their vectors (n, D), {sha:
    reason} of the rows that did not decode; their placeholders are not run through the model)."""
    ok = [j for j, e in enumerate(errors) if not e]
    vecs = np.zeros((0, dim), np.float32)
    if ok:
        vecs = model.encode_image(pixels if len(ok) == len(errors) else pixels[ok]).float().cpu().numpy()
    return [shas[j] for j in ok], vecs, {sha: e for sha, e in zip(shas, errors) if e}


def encode_images(
    model,
    preprocess: Callable,
    store: ShardStore,
    todo: Sequence[tuple[str, Path]],
    *,
    batch_size: int = IMAGE_BATCH,
    workers: int | None = None,
    streams: int | None = None,
    shard_size: int = 2048,
    progress: bool = True,
) -> EncodeStats:
    """Encode (sha, path) pairs into shards; a file that does not decode is recorded with its
    reason (never a crash) and its placeholder is not run through the model.
    `workers`: image-decoding processes (None: `default_workers()`); `streams`: threads that each
    decode (when `workers` is 0) and encode their own batches (None: `default_streams(workers)`)."""
    workers = default_workers() if workers is None else workers
    stats = EncodeStats(streams=default_streams(workers) if streams is None else streams)
    # a stream draws batches in its own thread: DataLoader processes are not to be forked from there
    assert stats.streams == 1 or workers == 0, "several encoder streams decode themselves: pass workers=0"
    if not todo:
        return stats
    log.info(
        "encoding %d images in batches of %d: %d decoding worker process(es), %d encoder stream(s)",
        len(todo),
        batch_size,
        workers,
        stats.streams,
    )
    size = input_size(model, preprocess)
    loader = image_loader([p for _, p in todo], preprocess, size, batch_size, workers)

    def encode(batch: tuple[torch.Tensor, torch.Tensor, list[str]]) -> tuple[list[str], np.ndarray, dict[str, str]]:
        idx, pixels, errors = batch
        return encode_pixels(model, [todo[r][0] for r in idx.tolist()], pixels, errors, store.dim)

    writer = _ShardWriter(store, shard_size, stats)
    start = time.perf_counter()
    with torch.inference_mode(), meter(len(todo), "encode images", "img", enabled=progress) as bar:
        for _, (shas, vecs, bad) in threaded_map(loader, encode, stats.streams):
            writer.add(shas, vecs, bad)
            stats.items += len(shas)
            stats.failed += len(bad)
            bar.update(len(shas) + len(bad))
    writer.flush()
    stats.seconds = time.perf_counter() - start
    return stats


def text_batches(texts: Sequence[str], tokenizer: Callable, batch_size: int) -> Iterator[tuple[int, torch.Tensor]]:
    """(first row, token ids (B, L)) per batch, tokenized in this process: the fast tokenizer takes
    a few percent of the time MiniLM takes to encode a batch, and on a small machine a worker
    process costs more in contention for the encoder's cores than it saves (bench/results/builder.md:
    builder/raw 0.85-0.88 with a tokenizing worker, 0.93-0.96 without, on 2 cores)."""
    for start in range(0, len(texts), batch_size):
        yield start, tokenizer(list(texts[start : start + batch_size]))


def encode_texts(
    model,
    tokenizer: Callable,
    store: ShardStore,
    todo: Sequence[tuple[str, str]],
    *,
    batch_size: int = 256,
    streams: int | None = None,
    shard_size: int = 2048,
    progress: bool = True,
) -> EncodeStats:
    """Encode (sha, caption) pairs into shards, batched by length (less padding). `streams`
    (None: `default_streams(0)`, 2 on 2 cores or more) threads each tokenize and encode their own
    batches on their share of torch's threads, as images are encoded. That also makes every batch
    run on one thread on 2 cores, as in a one-CPU Ray actor (`index_builder.ray_encode`): a matrix
    product's rounding can depend on the thread count, and a build must not depend on where it ran."""
    stats = EncodeStats(streams=default_streams(0) if streams is None else streams)
    if not todo:
        return stats
    order = sorted(range(len(todo)), key=lambda i: len(todo[i][1]))
    shas = [todo[i][0] for i in order]
    texts = [todo[i][1] for i in order]

    def encode(batch: tuple[int, torch.Tensor]) -> np.ndarray:
        return model.encode_text(batch[1]).float().numpy()

    writer = _ShardWriter(store, shard_size, stats)
    start = time.perf_counter()
    with torch.inference_mode(), meter(len(todo), "encode captions", "txt", enabled=progress) as bar:
        for (first, _), vecs in threaded_map(text_batches(texts, tokenizer, batch_size), encode, stats.streams):
            writer.add(shas[first : first + len(vecs)], vecs, {})
            stats.items += len(vecs)
            bar.update(len(vecs))
    writer.flush()
    stats.seconds = time.perf_counter() - start
    return stats
