"""Self-describing checkpoints in one safetensors file: the trained head tensors under their
state-dict names, and in the file's metadata header one JSON document with the model config, the
model's fingerprint, what data trained it and how it scored. A resume file also carries the
optimizer, scheduler and RNG state: their tensors lie beside the heads under `state/...`, the
rest in the JSON.

Reading never unpickles: safetensors parses a JSON header and raw tensor bytes, and the metadata
goes through `json.loads`, so a checkpoint is data and cannot run code. Pickled `.pt`
checkpoints of earlier versions are refused for that reason.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from safetensors import SafetensorError, safe_open

from retrieval.embedding.model import CALIBRATION_KEYS
from retrieval.errors import ModelError

FORMAT = "retrieval-sphere-checkpoint/2"  # /2: safetensors + JSON (/1 was a torch pickle)
SUFFIX = ".safetensors"
_METADATA_KEY = "retrieval"  # the one metadata entry (one key keeps the header's bytes deterministic)
_STATE = "state/"  # prefix of the tensors that are not heads (optimizer, RNG)


def save_checkpoint(path: str | Path, model, half: bool = False, **extra: Any) -> Path:
    """Write atomically (temp file + rename), so a killed run never leaves half a checkpoint.
    `half` stores the head tensors as float16 (half the size; see `round_heads_to_half`). `extra`
    may nest dicts, lists, tuples, scalars, tensors and numpy arrays (an optimizer's state dict).
    The bytes depend only on the model and `extra` (no timestamps): training reruns reproduce them."""
    path = Path(path)
    heads = model.head_state_dict()
    if half:
        heads = {k: v.half() if _halved(k, v) else v for k, v in heads.items()}
    tensors = {k: v.contiguous() for k, v in heads.items()}
    document = {
        "format": FORMAT,
        "name": model.name,
        "config": _config_dict(model.config),
        "fingerprint": model.fingerprint(),
        **{k: _pack(v, tensors, f"{_STATE}{k}") for k, v in extra.items()},
    }
    blob = safetensors.torch.save(tensors, metadata={_METADATA_KEY: json.dumps(document)})
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; the file is read by other users (containers)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _config_dict(config: Any) -> dict[str, Any]:
    """A SphereModel's typed ModelConfig, or an open_clip model's plain dict."""
    return config if isinstance(config, dict) else config.to_dict()


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by `save_checkpoint`: {"format", "name", "config", "fingerprint",
    "heads": {name: tensor}, and whatever extras it was saved with}. Anything else is a ModelError."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"checkpoint '{path}' does not exist")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ModelError(
            f"'{path}' is not a {FORMAT} checkpoint: it cannot be read as safetensors ({e}); "
            f"pickled .pt checkpoints of earlier versions are not read, since loading one can run "
            f"code"
        ) from None
    try:
        document = json.loads(header[_METADATA_KEY])
        if not isinstance(document, dict) or document.get("format") != FORMAT:
            raise ValueError(f"format {document.get('format') if isinstance(document, dict) else None!r}")
        for key, kind in (("name", str), ("config", dict), ("fingerprint", str)):
            if not isinstance(document.get(key), kind):
                raise ValueError(f"'{key}' is missing or not a {kind.__name__}")
        payload = {k: _unpack(v, tensors) for k, v in document.items()}
    except (KeyError, TypeError, ValueError) as e:
        raise ModelError(f"'{path}' is not a {FORMAT} checkpoint ({e})") from None
    payload["heads"] = {k: v for k, v in tensors.items() if not k.startswith(_STATE)}
    return payload


@torch.no_grad()
def round_heads_to_half(model) -> None:
    """Round the trained tensors to float16 precision in place, so the model in memory equals
    what a `half=True` checkpoint loads back (and their fingerprints agree)."""
    for key, value in model.head_state_dict().items():
        if _halved(key, value):
            model.state_dict()[key].copy_(value.half().float())


def _halved(key: str, value: torch.Tensor) -> bool:
    """Whether a `half` checkpoint stores this tensor in float16: every floating tensor but the
    calibrations, whose coefficients keep full precision (a few dozen numbers)."""
    return value.is_floating_point() and key not in CALIBRATION_KEYS


# Nested state as JSON plus named tensors. Hand-written: safetensors stores flat {name: tensor}
# maps only, and torch's own flattening of nested state dicts (torch.distributed.checkpoint) is
# private API that pickles what is not a tensor. Tagged objects keep what JSON would lose: the
# optimizer's integer keys ("$items"), tuples (AdamW's betas, numpy's RNG state) and arrays.
def _pack(obj: Any, tensors: dict[str, torch.Tensor], key: str) -> Any:
    if isinstance(obj, torch.Tensor):
        tensors[key] = obj.detach().cpu().contiguous()
        return {"$tensor": key}
    if isinstance(obj, np.ndarray):
        tensors[key] = torch.from_numpy(np.ascontiguousarray(obj).reshape(-1).view(np.uint8).copy())
        return {"$ndarray": key, "dtype": obj.dtype.str, "shape": list(obj.shape)}
    if isinstance(obj, (list, tuple)):
        items = [_pack(v, tensors, f"{key}.{i}") for i, v in enumerate(obj)]
        return {"$tuple": items} if isinstance(obj, tuple) else items
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("$") for k in obj):
            return {k: _pack(v, tensors, f"{key}.{k}") for k, v in obj.items()}
        return {"$items": [[k, _pack(v, tensors, f"{key}.{i}")] for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} ({key}) in a checkpoint")


def _unpack(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_unpack(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if obj.keys() == {"$tensor"}:
        return tensors[obj["$tensor"]]
    if obj.keys() == {"$ndarray", "dtype", "shape"}:
        dtype = np.dtype(obj["dtype"])
        if dtype.kind not in "biuf":  # plain numbers only (an object array would need pickle)
            raise ValueError(f"array dtype {obj['dtype']!r}")
        return np.frombuffer(tensors[obj["$ndarray"]].numpy().tobytes(), dtype=dtype).reshape(obj["shape"]).copy()
    if obj.keys() == {"$tuple"}:
        return tuple(_unpack(v, tensors) for v in obj["$tuple"])
    if obj.keys() == {"$items"}:
        return {k: _unpack(v, tensors) for k, v in obj["$items"]}
    return {k: _unpack(v, tensors) for k, v in obj.items()}
