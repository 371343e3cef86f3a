"""The server's typed configuration: `ServeConfig` (every `retrieval serve` setting, validated at
the edge with an error naming the flag) and the `Limits` the engine enforces, derived from it."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from retrieval.errors import ConfigError
from retrieval.serving.preflight import check_tls_pair

MiB = 1 << 20


@dataclass(frozen=True)
class Limits:
    """What one request may ask of the engine and how its encoders batch: derived from `ServeConfig`."""

    max_k: int = 1000
    max_text_chars: int = 2000
    max_batch: int = 32  # text encoder micro-batch size (1 = unbatched)
    max_image_batch: int = 4  # image encoder's (on CPU, large image batches are slower per image)
    text_concurrency: int = 1  # text-encoder batches that may run at once
    image_concurrency: int = 2  # image-encoder batches that may run at once
    max_wait_s: float = 0.002  # how long the oldest queued item may wait for others
    max_reply_bytes: int | None = None  # largest reply the server may send (None: unbounded)
    max_terms: int = 16  # terms of one composed query
    max_walk_steps: int = 64  # steps of one Walk (and steps * k <= max_k)
    rerank_pool: int = 200  # candidates MMR / dedup re-rank (at least k)


@dataclass
class ServeConfig:
    """Every setting of `retrieval serve` (flags or RETRIEVAL_* variables), validated at the edge."""

    index: str
    host: str = "127.0.0.1"
    port: int = 50051
    metrics_port: int = 9464
    model: str | None = None
    max_batch: int = 32
    max_image_batch: int = 4
    text_concurrency: int = 1
    image_concurrency: int = 2
    max_wait_ms: float = 2.0
    max_message_mb: float = 20.0
    max_k: int = 1000
    max_text_chars: int = 2000
    max_batch_queries: int = 256
    max_terms: int = 16
    max_walk_steps: int = 64
    rerank_pool: int = 200
    watch_interval_s: float = 1.0
    grace_s: float = 5.0
    workers: int = 4
    token: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    verify: bool = True
    device: str = "cpu"

    def validate(self) -> ServeConfig:
        """Raise a ConfigError naming the flag of the first setting the server cannot run with.
        Reads the TLS files (they must be a matching PEM pair) and loads nothing else."""

        def require(ok: bool, flag: str, rule: str) -> None:
            if not ok:
                raise ConfigError(f"--{flag.replace('_', '-')} {getattr(self, flag)!s}: {rule}")

        require(bool(self.index), "index", "must name the index root")
        require(bool(self.host), "host", "must name an address to listen on")
        require(0 <= self.port <= 65535, "port", "must be a port number from 0 to 65535 (0 picks a free one)")
        require(self.metrics_port <= 65535, "metrics_port", "must be a port number up to 65535 (negative disables)")
        for name in (
            "max_batch",
            "max_image_batch",
            "text_concurrency",
            "image_concurrency",
            "max_k",
            "max_text_chars",
            "max_batch_queries",
            "workers",
            "max_terms",
            "rerank_pool",
        ):
            require(getattr(self, name) >= 1, name, "must be at least 1")
        require(self.max_walk_steps >= 2, "max_walk_steps", "must be at least 2 (a walk has two ends)")
        for name in ("max_message_mb", "watch_interval_s"):
            require(math.isfinite(getattr(self, name)) and getattr(self, name) > 0, name, "must be a positive number")
        for name in ("max_wait_ms", "grace_s"):
            require(math.isfinite(getattr(self, name)) and getattr(self, name) >= 0, name, "must be 0 or more")
        require(self.max_message_mb * MiB < 2**31, "max_message_mb", "must be under 2048 (gRPC's limit)")
        try:
            torch.device(self.device)
        except RuntimeError:
            require(False, "device", "must be a torch device such as cpu, cuda or cuda:0")
        if self.tls_cert or self.tls_key:
            require(bool(self.tls_cert), "tls_key", "needs --tls-cert too (TLS takes both)")
            require(bool(self.tls_key), "tls_cert", "needs --tls-key too (TLS takes both)")
            check_tls_pair(self.tls_cert, self.tls_key)
        return self

    @property
    def limits(self) -> Limits:
        """The engine's share of the settings."""
        return Limits(
            max_k=self.max_k,
            max_text_chars=self.max_text_chars,
            max_batch=self.max_batch,
            max_image_batch=self.max_image_batch,
            text_concurrency=self.text_concurrency,
            image_concurrency=self.image_concurrency,
            max_wait_s=self.max_wait_ms / 1000.0,
            max_reply_bytes=int(self.max_message_mb * MiB),
            max_terms=self.max_terms,
            max_walk_steps=self.max_walk_steps,
            rerank_pool=self.rerank_pool,
        )
