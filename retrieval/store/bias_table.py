"""Each gallery item's inverted-softmax bias by id, in two memory-mapped arrays beside an index
whose vectors cannot be read back by id cheaply (the on-disk IVF indexes of
`index_builder.ivf_ondisk`: a direct map from ids to list positions would cost RAM per item).

    {stem}.ids.npy    int64 (N,), sorted ascending
    {stem}.bias.npy   float32 (N,), the bias of ids[i]

A lookup is a binary search of the mapped ids (a few pages per hit); the files cost 12 bytes an item
on disk and only the pages touched in RAM.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from retrieval.errors import IndexCorruptError


def table_files(stem: str) -> tuple[str, str]:
    return f"{stem}.ids.npy", f"{stem}.bias.npy"


def write_bias_table(directory: Path, stem: str, ids: np.ndarray, bias: np.ndarray) -> list[str]:
    """Write the table for (ids, bias) in any order; returns the two file names."""
    order = np.argsort(ids, kind="stable")
    names = table_files(stem)
    np.save(directory / names[0], np.ascontiguousarray(ids[order], np.int64))
    np.save(directory / names[1], np.ascontiguousarray(bias[order], np.float32))
    return list(names)


class BiasTable:
    def __init__(self, directory: Path, stem: str):
        ids_name, bias_name = table_files(stem)
        try:
            self.ids = np.load(directory / ids_name, mmap_mode="r")
            self.bias = np.load(directory / bias_name, mmap_mode="r")
        except (OSError, ValueError) as e:
            raise IndexCorruptError(f"cannot read the bias table {directory / ids_name}: {e}") from e
        if self.ids.shape != self.bias.shape or self.ids.ndim != 1:
            raise IndexCorruptError(f"the bias table {directory / ids_name} has mismatched arrays")

    def lookup(self, ids: np.ndarray) -> np.ndarray:
        """(M,) biases of `ids`, every one of which must be in the table."""
        pos = np.minimum(np.searchsorted(self.ids, ids), len(self.ids) - 1)
        if len(ids) and not np.array_equal(self.ids[pos], ids):
            raise IndexCorruptError("an index returned an id that its bias table does not have")
        return np.asarray(self.bias[pos])
