"""Batch encoding of image files and caption lists, streamed through a DataLoader (or encoder
streams).

`encode_image_files(..., project=False)` returns tower features (B, F) for training;
`project=True` returns the model's unit vectors (B, D).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from retrieval.encoding.images import ImageFileDataset, split_transform
from retrieval.progress import meter

log = logging.getLogger(__name__)


# Images per encoder forward pass in bulk encoding (training features, eval, the index builder).
# On a CPU, batch 8 is already at the encoder's peak: Lite0 on 2 cores does ~68 images/s at batch 1,
# 95 at 4, 105 at 8, 108 at 16 and 105 at 32 (with `retrieval.embedding.allocator`'s tuning; without it,
# large batches looked slower because their activations were page-faulted in anew every pass).
# On a GPU, pass a larger batch.
IMAGE_BATCH = 8


def default_workers() -> int:
    """Image-decoding worker processes for bulk encoding: one per core this process may run on
    beyond the encoder's first, at most 4; none with 2 cores or fewer. There the encoder's threads
    already fill every core, and a worker decoding beside them stalls both (each forward pass
    waits at its thread barriers for the preempted one), so decoding in this process is faster:
    Lite0 builder/raw 0.88-0.91 decoding between forward passes, 0.78-0.80 with a worker
    (before `default_streams`; bench/results/builder.md)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return 0 if cores <= 2 else min(4, cores - 1)


def default_streams(workers: int) -> int:
    """Encoder threads for bulk encoding on a CPU (`retrieval.encoding.streams.threaded_map`): 2 when this
    process decodes the images (`workers` 0) and torch may use 2 threads or more, else 1. Each of
    two streams decodes its next batch while the other runs its forward pass, on one thread each:
    Lite0 builder/raw 0.92 -> 0.99 on 2 cores (bench/results/builder.md). With decoding workers,
    the encoder already never waits for pixels."""
    return 2 if workers == 0 and torch.get_num_threads() >= 2 else 1


def image_loader(
    paths: Sequence[str | Path],
    transform: Callable,
    image_size: int,
    batch_size: int,
    workers: int | None,
    seed: int | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
    """(indices (B,), pixels (B, 3, S, S) float, errors (B strings, "" when fine)) per batch.
    With `workers` > 0, worker processes decode and preprocess while this process runs the
    encoder; with 0, this process decodes each batch as it is drawn (in the thread that draws it);
    None picks `default_workers()`. The transform's per-batch tail (`split_transform`) runs here,
    on whole batches.
    `seed`: per-item seeding of random transforms (see ImageFileDataset)."""
    dataset, per_batch = image_dataset(paths, transform, image_size, seed)
    workers = default_workers() if workers is None else workers
    for idx, pixels, errors in torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers):
        yield idx, per_batch(pixels), errors


def image_dataset(
    paths: Sequence[str | Path], transform: Callable, image_size: int, seed: int | None = None
) -> tuple[ImageFileDataset, Callable[[torch.Tensor], torch.Tensor]]:
    """(dataset of each file's per-image pixels, the transform's per-batch tail): `image_loader`'s
    decoding, for callers that batch and place the work themselves (`index_builder.ray_encode`)."""
    per_image, per_batch = split_transform(transform)
    with torch.random.fork_rng(devices=[]):  # a random transform draws here too (CPU RNG only)
        placeholder = torch.zeros_like(per_image(Image.new("RGB", (image_size, image_size))))
    return ImageFileDataset(paths, per_image, image_size, placeholder, seed), per_batch


def encode_image_files(
    model,
    paths: Sequence[str | Path],
    transform: Callable,
    *,
    project: bool = True,
    batch_size: int = IMAGE_BATCH,
    workers: int | None = None,
    seed: int = 0,
    desc: str = "images",
    progress: bool = True,
) -> tuple[np.ndarray, dict[int, str]]:
    """Returns (vectors (N, D or F) float32, {index: reason} of files that did not decode;
    their rows are zeros)."""
    size = input_size(model, transform)
    loader = image_loader(paths, transform, size, batch_size, workers, seed)
    out: np.ndarray | None = None
    bad: dict[int, str] = {}
    # Random crops reseed torch's RNG per item: in-process (workers=0) that is the global one, so
    # fork it: the caller's random stream is left untouched.
    with torch.random.fork_rng(), torch.inference_mode(), meter(len(paths), desc, "img", enabled=progress) as bar:
        for idx, pixels, errors in loader:
            # encode_image feeds its tower channels-last itself; the bare tower gets the same layout
            vecs = (
                model.encode_image(pixels)
                if project
                else model.image_tower(pixels.contiguous(memory_format=torch.channels_last))
            )
            vecs = vecs.float().numpy()
            if out is None:
                out = np.zeros((len(paths), vecs.shape[1]), np.float32)
            ok = np.array([not e for e in errors])
            out[idx.numpy()[ok]] = vecs[ok]
            bad.update({int(i): e for i, e in zip(idx, errors) if e})
            bar.update(len(idx))
    if bad:
        log.warning("%d of %d image(s) did not decode and were skipped", len(bad), len(paths))
    return (out if out is not None else np.zeros((0, 0), np.float32)), bad


def input_size(model, transform: Callable) -> int:
    """Side of the square image the encoder takes: the tower's, else the transform's crop."""
    return getattr(getattr(model, "image_tower", None), "image_size", None) or _transform_size(transform)


def _transform_size(transform: Callable) -> int:
    for t in getattr(transform, "transforms", []):
        size = getattr(t, "size", None)
        if size is not None:
            return size if isinstance(size, int) else size[0]
    raise ValueError("cannot infer the image size from the transform")


def encode_texts(
    model,
    tokenizer: Callable,
    texts: Sequence[str],
    *,
    project: bool = True,
    batch_size: int = 256,
    desc: str = "captions",
    progress: bool = True,
) -> np.ndarray:
    """(N, D or F) float32. Texts are batched by length (less padding), results in input order."""
    order = np.argsort([len(t) for t in texts], kind="stable")
    out: np.ndarray | None = None
    with torch.inference_mode(), meter(len(texts), desc, "txt", enabled=progress) as bar:
        for start in range(0, len(texts), batch_size):
            rows = order[start : start + batch_size]
            ids = tokenizer([texts[i] for i in rows])
            vecs = (model.encode_text(ids) if project else model.text_tower(ids)).float().numpy()
            if out is None:
                out = np.zeros((len(texts), vecs.shape[1]), np.float32)
            out[rows] = vecs
            bar.update(len(rows))
    return out if out is not None else np.zeros((0, 0), np.float32)
