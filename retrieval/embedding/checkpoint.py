"""Self-describing checkpoints: the model config, the trained head tensors, the model's
fingerprint, what data trained it and how it scored, plus optimizer state for resuming."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from retrieval.errors import ModelError

FORMAT = "retrieval-sphere-checkpoint/1"


def save_checkpoint(path: str | Path, model, half: bool = False, **extra: Any) -> Path:
    """Write atomically (temp file + rename), so a killed run never leaves half a checkpoint.
    `half` stores the head tensors as float16 (half the size; see `round_heads_to_half`)."""
    path = Path(path)
    heads = model.head_state_dict()
    if half:
        heads = {k: v.half() if v.is_floating_point() else v for k, v in heads.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT,
        "name": model.name,
        "config": model.config,
        "heads": heads,
        "fingerprint": model.fingerprint(),
        **extra,
    }
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; the file is read by other users (containers)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by `save_checkpoint`, with a clear error for anything else."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"checkpoint '{path}' does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises many types for a corrupt file
        raise ModelError(f"checkpoint '{path}' cannot be read: {e}") from e
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ModelError(f"'{path}' is not a {FORMAT} checkpoint")
    return payload


@torch.no_grad()
def round_heads_to_half(model) -> None:
    """Round the trained tensors to float16 precision in place, so the model in memory equals
    what a `half=True` checkpoint loads back (and their fingerprints agree)."""
    for key, value in model.head_state_dict().items():
        if value.is_floating_point():
            model.state_dict()[key].copy_(value.half().float())
