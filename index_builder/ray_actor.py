"""What runs on the Ray workers of `index-builder build --ray` (`index_builder.ray_encode` drives
them): `decode_units`, the tasks that decode and preprocess images, and `ShardEncoder`, the actors
that hold one model each, encode units of one forward pass and write each call's units as one
shard into the build's work directory on the shared filesystem.

Imported by `ray_encode` only, after it checked that Ray is installed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import ray

from index_builder.encode import ShardStore, encode_pixels
from retrieval.errors import DatasetError, FingerprintMismatchError, RetrievalError


def decode_units(batch: dict, transform: Callable, size: int) -> dict:
    """Ray task: each unit's files decoded and preprocessed as the single-machine builder does
    (`bulk.image_dataset`: a file that does not decode gives a placeholder and its reason), stacked
    into uint8 pixels (n, H, W, C)."""
    import torch

    from retrieval.encoding.bulk import image_dataset

    out: dict[str, list] = {"unit": [], "sha": [], "pixels": [], "error": []}
    for unit, shas, paths in zip(batch["unit"], batch["sha"], batch["path"]):
        paths = [str(p) for p in paths]
        require_visible(Path(p).parent for p in paths)
        dataset, _ = image_dataset(paths, transform, size)
        items = [dataset[i] for i in range(len(dataset))]
        out["unit"].append(int(unit))
        out["sha"].append([str(s) for s in shas])
        out["pixels"].append(torch.stack([pixels for _, pixels, _ in items]).numpy())
        out["error"].append([error for _, _, error in items])
    return out


def require_visible(folders: Iterable[Path]) -> None:
    for folder in set(folders):
        if not folder.is_dir():
            raise DatasetError(
                f"folder '{folder}' is not visible on Ray node {ray.util.get_node_ip_address()}: "
                "--ray needs the images and the index root on a filesystem every node shares"
            )


class ShardEncoder:
    """Ray actor: one model. Each call encodes its units (one forward pass each) and writes them as
    one shard, numbered `first` + its first unit's index: calls never share a unit, so never a
    number, and a retried call rewrites its own shard. Returns one row: {shard, items, failed, node}."""

    def __init__(self, model: str, fingerprint: str, modality: str, directory: str, first: int):
        self.node, self.modality, self.first = ray.util.get_node_ip_address(), modality, first
        self.problem: RetrievalError | None = None
        try:
            self._load(model, fingerprint, Path(directory))
        except RetrievalError as e:  # raised by the first call: Ray reports a call's error, not a constructor's
            self.problem = e

    def _load(self, model: str, fingerprint: str, directory: Path) -> None:
        import torch

        from retrieval.embedding.factory import create_model
        from retrieval.encoding.images import split_transform

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cpu":  # the CPUs Ray gave this actor (one: as the builder's streams on 2 cores)
            torch.set_num_threads(max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))))
        self.model, preprocess, self.tokenizer = create_model(model)
        if self.model.fingerprint() != fingerprint:
            raise FingerprintMismatchError(
                f"model '{model}' on Ray node {self.node} has fingerprint {self.model.fingerprint()}, not the "
                f"driver's {fingerprint}: every node needs the same model"
            )
        self.model.to(self.device)
        self.per_batch = split_transform(preprocess)[1]
        self.dim = int(self.model.embed_dim)
        require_visible([directory])  # never shards into a node-local folder the driver cannot see
        self.store = ShardStore(directory, self.dim)

    def __call__(self, batch: dict) -> dict:
        import torch

        if self.problem is not None:
            raise self.problem
        shas: list[str] = []
        vectors: list[np.ndarray] = []
        bad: dict[str, str] = {}
        with torch.inference_mode():
            for row in range(len(batch["unit"])):
                unit = [str(s) for s in batch["sha"][row]]
                if self.modality == "image":
                    pixels = torch.from_numpy(np.ascontiguousarray(batch["pixels"][row])).to(self.device)
                    good, vecs, failed = encode_pixels(
                        self.model, unit, self.per_batch(pixels), [str(e) for e in batch["error"][row]], self.dim
                    )
                else:
                    tokens = self.tokenizer([str(t) for t in batch["text"][row]]).to(self.device)
                    good, vecs, failed = unit, self.model.encode_text(tokens).float().cpu().numpy(), {}
                shas += good
                vectors.append(vecs)
                bad.update(failed)
        path = self.store.write(shas, np.concatenate(vectors), bad, number=self.first + int(min(batch["unit"])))
        return {"shard": [path.name], "items": [len(shas)], "failed": [len(bad)], "node": [self.node]}
