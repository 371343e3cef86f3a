"""`retrieval serve`: the gRPC server over an index root (flags or RETRIEVAL_* environment variables)."""

from __future__ import annotations

import argparse
import logging

from retrieval.flags import add_dataclass_arguments, dataclass_from_args
from retrieval.progress import quiet_library_progress_bars
from retrieval.serving.server import ServeConfig, serve

SERVE_HELP = {
    "index": "index root: serves the version ROOT/CURRENT names and swaps to each newly published one",
    "host": "address to listen on (0.0.0.0 for every interface)",
    "port": "gRPC port (0 picks a free one)",
    "metrics_port": "Prometheus /metrics HTTP port (0 picks a free one, negative disables)",
    "model": "model to load instead of the one the index manifest names (its fingerprint must match)",
    "max_batch": "most text queries per text-encoder forward pass (1 disables micro-batching)",
    "max_image_batch": "most image queries per image-encoder forward pass (Lite0 alone encodes faster per "
    "image in bigger batches, but on 2 CPU cores shared with gRPC, caps of 16 or 32 served "
    "no more image queries per second than 4 and had a longer p99: bench/results/server*.json)",
    "text_concurrency": "text-encoder batches that may run at once",
    "image_concurrency": "image-encoder batches that may run at once (on 2 CPU cores, two batch-1 forward passes "
    "side by side serve ~1.4x the images per second of one: bench/results/server.md)",
    "max_wait_ms": "longest a queued query waits for others to fill its batch",
    "max_message_mb": "largest request or response in MiB (image queries travel whole)",
    "max_k": "largest k a query may ask for",
    "max_text_chars": "longest text query in characters",
    "max_batch_queries": "most queries in one BatchSearch call",
    "max_terms": "most terms in one composed query",
    "max_walk_steps": "most steps in one Walk (steps x k must also stay within --max-k)",
    "rerank_pool": "candidates that diversity (MMR) and dedup re-rank (at least k)",
    "watch_interval_s": "how often ROOT/CURRENT is checked for a new version, in seconds",
    "grace_s": "on SIGTERM, how long in-flight calls may take to finish, in seconds",
    "workers": "threads for decoding, encoding and FAISS search (off the event loop)",
    "token": "require 'authorization: Bearer TOKEN' metadata (health and reflection stay open)",
    "tls_cert": "PEM certificate chain: serve over TLS (with --tls-key)",
    "tls_key": "PEM private key for --tls-cert",
    "verify": "check every index file's sha256 against its manifest before serving it",
    "device": "torch device the encoders run on: cpu, cuda or cuda:N (FAISS search stays on the CPU)",
}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve an index over gRPC (health, reflection, metrics, hot swap)",
        description="gRPC retrieval server. Loads ROOT/CURRENT and the model its manifest names, "
        "refuses to start on a fingerprint mismatch, swaps to newly published versions "
        "without failing requests, and stops gracefully on SIGTERM.",
    )
    add_dataclass_arguments(p, ServeConfig, SERVE_HELP, env_prefix="RETRIEVAL_")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    config = dataclass_from_args(ServeConfig, args).validate()  # a ConfigError is one line, exit 2
    # A server says where it listens, what it serves and when it swaps, even without --verbose (the
    # serving package logs nothing else at INFO); no progress bars.
    logging.getLogger("retrieval.serving").setLevel(logging.INFO)
    quiet_library_progress_bars()
    serve(config)
    return 0
