"""The model behind the server: loaded once per process (`cached_model`), with its preprocessing
split as bulk encoding splits it and one micro-batcher per modality (`Encoder`)."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import Executor

import numpy as np
import torch

from retrieval.embedding.calibration import calibrations_of
from retrieval.encoding.bulk import input_size
from retrieval.encoding.images import load_image, split_transform
from retrieval.serving.batcher import Alive, MicroBatcher, ensure_alive
from retrieval.serving.config import Limits


@functools.lru_cache(maxsize=2)
def cached_model(name: str, device: str = "cpu"):
    """(model, preprocess, tokenizer) for a model name or checkpoint on a torch device, loaded
    once per process."""
    from retrieval.embedding.factory import create_model

    return create_model(name, device=device)


class Encoder:
    """One model with its preprocessing and one micro-batcher per modality."""

    def __init__(
        self,
        name: str,
        bundle: tuple,
        limits: Limits,
        executor: Executor | None,
        on_batch: Callable[[str, int], None] | None = None,
    ):
        self.name = name
        self.model, self.preprocess, self.tokenizer = bundle
        # as bulk encoding does: per-image steps in the request's thread, scaling and normalization
        # per batch on the model's device (uint8 pixels are a quarter of the bytes to move there)
        self.prepare_pixels, self.finish_batch = split_transform(self.preprocess)
        self.fingerprint = self.model.fingerprint()
        self.calibrations = calibrations_of(self.model)  # match probabilities by direction ('t2i', 'i2t')
        self.dim = int(self.model.embed_dim)
        self.device = next(self.model.parameters()).device  # inputs go there, vectors come back to the CPU
        self.image_size = input_size(self.model, self.preprocess)
        self.executor = executor
        hook = (lambda kind: lambda n: on_batch(kind, n)) if on_batch else (lambda kind: None)
        self.text_batcher = MicroBatcher(
            self._encode_texts,
            limits.max_batch,
            limits.max_wait_s,
            executor,
            hook("text"),
            concurrency=limits.text_concurrency,
        )
        self.image_batcher = MicroBatcher(
            self._encode_images,
            limits.max_image_batch,
            limits.max_wait_s,
            executor,
            hook("image"),
            concurrency=limits.image_concurrency,
        )

    def _encode_texts(self, texts: list[str]) -> list[np.ndarray]:
        return list(self.model.encode_text(self.tokenizer(texts).to(self.device)).cpu().numpy())

    def _encode_images(self, pixels: list[torch.Tensor]) -> list[np.ndarray]:
        return list(self.model.encode_image(self.finish_batch(torch.stack(pixels).to(self.device))).cpu().numpy())

    def _prepare_image(self, data: bytes) -> torch.Tensor:
        # InvalidInputError when the bytes do not decode; decoded as the index builder does
        return self.prepare_pixels(load_image(data, min_side=self.image_size))

    async def embed_text(self, text: str, alive: Alive | None = None) -> np.ndarray:
        return await self.text_batcher.submit(text, alive)

    async def embed_image(self, data: bytes, alive: Alive | None = None) -> np.ndarray:
        ensure_alive(alive)  # before decoding; the batcher asks again before encoding
        pixels = await asyncio.get_running_loop().run_in_executor(self.executor, self._prepare_image, data)
        return await self.image_batcher.submit(pixels, alive)
