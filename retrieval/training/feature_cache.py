"""An on-disk cache of frozen-tower features: what makes training epochs cheap on a CPU. Entries are
keyed by the tower's weights, the inputs and the transform, and written atomically."""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from retrieval.embedding.model import state_fingerprint

log = logging.getLogger(__name__)


class FeatureCache:
    """Tower features on disk, keyed by the tower's weights, the inputs and the transform."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @staticmethod
    def key(tower: torch.nn.Module, items: Sequence[str], recipe: str) -> str:
        h = hashlib.sha256(state_fingerprint(type(tower).__name__, tower.state_dict()).encode())
        h.update(recipe.encode())
        for item in items:
            h.update(item.encode() + b"\0")
        return h.hexdigest()[:20]

    def get_or_compute(self, key: str, compute: Callable[[], tuple[np.ndarray, dict[int, str]]]):
        path = self.root / f"{key}.npz"
        if path.is_file():
            with np.load(path, allow_pickle=False) as z:
                bad = {int(i): str(r) for i, r in zip(z["bad_idx"], z["bad_reason"])}
                log.info("feature cache hit %s", path.name)
                return z["features"], bad
        features, bad = compute()
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(
            tmp,
            features=features,
            bad_idx=np.array(sorted(bad), np.int64),
            bad_reason=np.array([bad[i] for i in sorted(bad)], dtype=str),
        )
        os.replace(tmp, path)
        return features, bad
