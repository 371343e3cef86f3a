"""Distributed encoding on Ray Data: the encode stage of `index-builder build ... --ray [ADDRESS]`.

What `index_builder.encode` does on one machine, as a Ray Data pipeline:

    units of --batch-size sources (content sha256, path)       ray.data.from_items
      -> decoding and per-image preprocessing to uint8 pixels  map_batches tasks
      -> the encoder, one model per actor (one GPU each where  map_batches, ActorPoolStrategy
         the cluster has GPUs, else one CPU each), which
         writes each call's units as one shard
      -> one row per shard written, read by the driver         iter_rows: the builder's log

Captions take the same path without the decoding step, in length-sorted units of
--text-batch-size. The shards are the single-machine builder's (`encode.ShardStore`) in the same
work directory, so resume, incremental builds, bad-file reports and the manifest do not change.

- A row is a unit of one forward pass, not an image: the encoder's output for an image depends on
  the images it is batched with (oneDNN picks its kernels by shape; Lite0 rows differ by up to
  2e-7 between batch 8 and batch 5), so the Ray build keeps the single-machine builder's batches,
  and on a CPU, where both run each forward pass on one thread (2 cores), its vectors are the
  same bit for bit.
- Placement: on a CPU-only cluster every actor takes one CPU, and Ray fuses the decoding into the
  actors (same resources), which decode a unit, then encode it; on a GPU cluster, decoding runs in
  CPU tasks beside the GPU actors.
- Shards: each actor call takes about a shard's worth of units (--shard-size items) and writes
  them as one shard (temporary name, fsync, rename) before it returns, so a killed worker or
  driver leaves only complete shards, which the rerun reuses. The actors write them rather than a
  separate write stage: no vectors cross the cluster, and no write task waits for a CPU the actors
  hold.
- Captions are encoded on the cluster too, not in the driver: on 2 one-CPU nodes their stage took
  65 s against the driver's 74 s (bench/results/ray.md), and on a real cluster the driver's cores
  would cap it while the actors scale with the nodes and their GPUs.
- The index root (its work directory), the images and a checkpoint given by path must be on a
  filesystem every node sees at the same path (NFS, or an object store mounted with s3fs or
  gcsfuse): a folder of images or the work directory that a node cannot see fails the build with
  a message saying so, rather than marking every image as unreadable or losing shards.

Importing this module without Ray installed raises one DatasetError (what `--ray` reports).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from retrieval.errors import DatasetError, RetrievalError

try:
    import ray
    import ray.data
    from ray.data import ActorPoolStrategy
except ImportError as e:  # the one clear error of `--ray` without Ray, before any work is done
    raise DatasetError(
        f"--ray needs Ray Data, which is not installed ({e}); "
        "install it with pip install 'ray[data]>=2.10' (the project's [ray] extra)"
    ) from None

from index_builder.encode import EncodeStats, ShardStore
from index_builder.ray_actor import ShardEncoder, decode_units

log = logging.getLogger(__name__)

LOCAL = "local"  # `--ray` without an address: a Ray instance started in this process, stopped after the build
JOIN_TIMEOUT_S = 300  # how long a cluster without CPUs or GPUs gets for a worker node to join


class RayEncoder:
    """A build's connection to a Ray cluster. `images` and `texts` take the arguments of
    `encode.encode_images` and `encode.encode_texts` and leave the same shards; `close` disconnects
    (and stops a local instance)."""

    def __init__(self, address: str, model: str, fingerprint: str, *, progress: bool = True):
        self.address, self.model, self.fingerprint = address, model, fingerprint
        if (os.environ.get("RAY_ADDRESS", "") if address == "auto" else address).startswith("ray://"):
            # measured with Ray 2.60: the executor needs a core worker, which a Ray Client driver has not
            raise DatasetError(
                f"--ray {address}: Ray Data's executor cannot run over Ray Client (ray://); run "
                "the build on a node of the cluster (the head, say) with --ray auto"
            )
        try:
            if address == LOCAL:
                ray.init(address=LOCAL, include_dashboard=False)
            else:
                ray.init(address=address)
        except (ConnectionError, RuntimeError, ValueError) as e:  # the first line: Ray may append a traceback
            raise DatasetError(f"--ray {address}: cannot connect to a Ray cluster: {_first_line(e)}") from None
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = progress
        context.raise_original_map_exception = True  # a task's own error reaches the driver (see _user_error)
        self.gpus, self.cpus = self._compute(address)
        nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
        log.info("ray: connected to %s: %d node(s), %d CPU(s), %d GPU(s)", address, nodes, self.cpus, self.gpus)

    @staticmethod
    def _compute(address: str) -> tuple[int, int]:
        """(GPUs, CPUs) of the cluster, once it has any: a head that only coordinates (no CPUs,
        as in docker-compose.yml) may be up before its first worker node has joined."""
        deadline = time.monotonic() + JOIN_TIMEOUT_S
        while True:
            resources = ray.cluster_resources()
            gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 0))
            if gpus or cpus:
                return gpus, cpus
            if time.monotonic() > deadline:
                raise DatasetError(
                    f"--ray {address}: the cluster has no CPU or GPU to encode on "
                    f"(no worker node joined in {JOIN_TIMEOUT_S} s)"
                )
            log.info("ray: the cluster has no CPU or GPU yet; waiting for a worker node to join")
            time.sleep(5)

    def close(self) -> None:
        ray.shutdown()

    @property
    def actors(self) -> int:
        """Encoder actors: one per GPU, else one per CPU."""
        return self.gpus or max(1, self.cpus)

    def images(
        self,
        model,
        preprocess: Callable,
        store: ShardStore,
        todo: Sequence[tuple[str, Path]],
        *,
        batch_size: int,
        shard_size: int,
        workers: int | None = None,
        progress: bool = True,
    ) -> EncodeStats:
        """`encode.encode_images` on the cluster; `workers` is not used (Ray places the decoding)."""
        from retrieval.encoding.bulk import input_size

        units = [
            {"unit": i, "sha": [sha for sha, _ in unit], "path": [str(p) for _, p in unit]}
            for i, unit in enumerate(_units(todo, batch_size))
        ]
        decode = {"transform": preprocess, "size": input_size(model, preprocess)}
        return self._encode(units, "image", store, batch_size, shard_size, len(todo), decode)

    def texts(
        self,
        model,
        tokenizer: Callable,
        store: ShardStore,
        todo: Sequence[tuple[str, str]],
        *,
        batch_size: int,
        shard_size: int,
        progress: bool = True,
    ) -> EncodeStats:
        """`encode.encode_texts` on the cluster: the same length-sorted batches."""
        ordered = sorted(todo, key=lambda item: len(item[1]))  # stable: encode_texts' order
        units = [
            {"unit": i, "sha": [sha for sha, _ in unit], "text": [text for _, text in unit]}
            for i, unit in enumerate(_units(ordered, batch_size))
        ]
        return self._encode(units, "text", store, batch_size, shard_size, len(todo))

    def _encode(
        self,
        units: list[dict],
        modality: str,
        store: ShardStore,
        batch_size: int,
        shard_size: int,
        total: int,
        decode: dict | None = None,
    ) -> EncodeStats:
        """Run the pipeline over `units`; `decode`: the keyword arguments of `decode_units` (images)."""
        per_shard = max(1, shard_size // batch_size)  # units an actor call takes and writes as one shard
        blocks = math.ceil(len(units) / per_shard)  # a block is one call's input
        actors = min(self.actors, blocks)
        stats = EncodeStats(streams=actors)
        if not total:
            return stats
        data = ray.data.from_items(units, override_num_blocks=blocks)
        if decode is not None:
            data = data.map_batches(decode_units, batch_size=1, fn_kwargs=decode, num_cpus=1)
        actor_args = {"num_gpus": 1, "num_cpus": 1} if self.gpus else {"num_cpus": 1}
        data = data.map_batches(
            ShardEncoder,
            batch_size=per_shard,
            compute=ActorPoolStrategy(size=actors),
            fn_constructor_kwargs={
                "model": self.model,
                "fingerprint": self.fingerprint,
                "modality": modality,
                "directory": str(store.dir),
                "first": store.next_number(),
            },
            **actor_args,
        )
        log.info(
            "ray: encoding %d %s(s) on %d actor(s) with %s each, shards of up to %d, into %s",
            total,
            modality,
            actors,
            "1 GPU" if self.gpus else "1 CPU",
            shard_size,
            store.dir,
        )
        start = time.perf_counter()
        try:
            for shard in data.iter_rows():  # one row per shard an actor wrote, as they are written
                if not (store.dir / shard["shard"]).is_file():
                    raise DatasetError(
                        f"{shard['shard']}, written by Ray node {shard['node']} into {store.dir}, is "
                        "not visible here: --ray needs the index root on a filesystem every node shares"
                    )
                stats.items += int(shard["items"])
                stats.failed += int(shard["failed"])
                stats.shards.append(str(shard["shard"]))
                log.info(
                    "ray: %s from %s: %d %s(s), %d failed; %d of %d done",
                    shard["shard"],
                    shard["node"],
                    shard["items"],
                    modality,
                    shard["failed"],
                    stats.items + stats.failed,
                    total,
                )
        except Exception as e:  # a failure anywhere in the cluster: the typed error a task raised, or one line
            raise _user_error(e) from None
        stats.seconds = time.perf_counter() - start
        log.info(
            "ray: encoded %d %s(s) (%d failed) into %d shard(s) in %.1fs (%.1f/s)",
            stats.items,
            modality,
            stats.failed,
            len(stats.shards),
            stats.seconds,
            stats.per_second,
        )
        return stats


def _units(todo: Sequence, size: int) -> list[Sequence]:
    return [todo[i : i + size] for i in range(0, len(todo), size)]


def _user_error(error: BaseException) -> RetrievalError:
    """The RetrievalError raised here or by a task, as one line (Ray wraps a task's error in a
    RayTaskError that is also an instance of it, with the remote traceback as its message, and Ray
    Data appends advice to the original's), else one line saying what failed."""
    seen: BaseException | None = error
    for _ in range(10):
        if seen is None:
            break
        if isinstance(seen, RetrievalError) and not isinstance(seen, ray.exceptions.RayError):
            return type(seen)(_first_line(seen))
        seen = getattr(seen, "cause", None) or seen.__cause__
    return RetrievalError(f"encoding on Ray failed: {_first_line(error)} (finished shards are kept: a rerun resumes)")


def _first_line(error: BaseException) -> str:
    return next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
