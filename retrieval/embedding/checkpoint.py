"""Self-describing checkpoints in one safetensors file: the trained head tensors under their
state-dict names, and in the file's metadata header one JSON document with the model config, the
model's fingerprint, what data trained it and how it scored. A resume file also carries the
optimizer, scheduler and RNG state: their tensors lie beside the heads under `state/...`, the
rest in the JSON.

A deliverable stores its trained tensors at the precision its model asks for (`model.weights_dtype`):
float16, or int8 matrices with one float32 scale per row under `scale/...` (symmetric, max-abs /
127, half the bytes of float16 again: `lite0-mpnet`'s heads fit the repository's 5 MiB limit so).
Loading gives float32 either way; `round_heads` puts the same values into a model in memory, so a
model and the file it writes share one fingerprint.

Reading never unpickles: safetensors parses a JSON header and raw tensor bytes, and the metadata
goes through `json.loads`, so a checkpoint is data and cannot run code. Pickled `.pt`
checkpoints of earlier versions are refused for that reason.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from safetensors import SafetensorError, safe_open

from retrieval.embedding.config import WEIGHT_DTYPES
from retrieval.embedding.model import CALIBRATION_KEYS
from retrieval.errors import ModelError

FORMAT = "retrieval-sphere-checkpoint/2"  # /2: safetensors + JSON (/1 was a torch pickle)
SUFFIX = ".safetensors"
_METADATA_KEY = "retrieval"  # the one metadata entry (one key keeps the header's bytes deterministic)
_STATE = "state/"  # prefix of the tensors that are not heads (optimizer, RNG)
_SCALE = "scale/"  # prefix of an int8 tensor's per-row scales


def save_checkpoint(path: str | Path, model, compact: bool = False, **extra: Any) -> Path:
    """Write atomically (temp file + rename), so a killed run never leaves half a checkpoint.
    `compact` rounds the model's head tensors in place (`round_heads`) and stores them as
    `model.weights_dtype`, so the fingerprint recorded is the one the file loads back with; else
    they are stored as they are (float32: a resume file). `extra` may nest dicts, lists, tuples,
    scalars, tensors and numpy arrays (an optimizer's state dict). The bytes depend only on the
    model and `extra` (no timestamps): training reruns reproduce them."""
    path = Path(path)
    heads = model.head_state_dict()
    tensors = _compact(heads, model.weights_dtype) if compact else heads
    if compact:
        _take_rounded(model, heads, tensors)
    tensors = {k: v.contiguous() for k, v in tensors.items()}
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
        heads = _expand(tensors)
    except (KeyError, TypeError, ValueError) as e:
        raise ModelError(f"'{path}' is not a {FORMAT} checkpoint ({e})") from None
    payload["heads"] = heads
    return payload


def round_heads(model) -> None:
    """Round the trained tensors in place to what a `compact` checkpoint of the model stores
    (`model.weights_dtype`), so the model in memory equals what the file loads back and their
    fingerprints agree."""
    heads = model.head_state_dict()
    _take_rounded(model, heads, _compact(heads, model.weights_dtype))


def _compact(heads: dict[str, torch.Tensor], weights_dtype: str) -> dict[str, torch.Tensor]:
    """The tensors a compact checkpoint stores for `heads`: each as `_stored_as` says, an int8
    one with its row scales beside it under `scale/`."""
    tensors: dict[str, torch.Tensor] = {}
    for key, value in heads.items():
        kind = _stored_as(key, value, weights_dtype)
        if kind == "int8":
            tensors[key], tensors[f"{_SCALE}{key}"] = _to_int8(value)
        else:
            tensors[key] = value.half() if kind == "float16" else value
    return tensors


def _expand(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The head tensors a checkpoint's tensors load as: int8 ones times their row scales; the
    resume state (`state/`) and the scales left out."""
    heads = {k: v for k, v in tensors.items() if not k.startswith((_STATE, _SCALE))}
    for key, value in heads.items():
        if value.dtype == torch.int8:
            heads[key] = _from_int8(value, tensors[f"{_SCALE}{key}"])
    return heads


@torch.no_grad()
def _take_rounded(model, heads: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor]) -> None:
    """Into the model, what `tensors` (`_compact(heads, ...)`) load back as, where they are not
    `heads`' own tensors kept as they were."""
    state = model.state_dict()
    for key, value in _expand(tensors).items():
        if value is not heads[key]:
            state[key].copy_(value)


def _stored_as(key: str, value: torch.Tensor, weights_dtype: str) -> str | None:
    """How a compact checkpoint stores this tensor: None (as it is) for the calibrations, whose
    coefficients keep full precision (a few dozen numbers), and for anything not floating;
    int8 for the matrices (weights, query banks) of an int8 model; else float16."""
    assert weights_dtype in WEIGHT_DTYPES, f"weights_dtype {weights_dtype!r} is not one of {WEIGHT_DTYPES}"
    if not value.is_floating_point() or key in CALIBRATION_KEYS:
        return None
    return "int8" if weights_dtype == "int8" and value.dim() == 2 else "float16"


# Hand-written rather than torch.quantize_per_channel: safetensors stores no quantized tensors
# (their int_repr and scales would be taken apart anyway), and dequantizing is one multiply.
def _to_int8(value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, C) float -> int8 (R, C) and float32 scales (R,): row r is q[r] * scale[r]. Idempotent:
    quantizing what `_from_int8` returned gives the same q and scales back, so rounding a model
    twice (`round_heads`) changes nothing. For that each scale is a fixed point of
    s -> fl(fl(127 s) / 127) (the scale computed back from the row's largest value, 127 s); about
    1% of float32 scales are not, and the next float up is (it still maps the largest value to 127)."""
    if not torch.isfinite(value).all():  # float16 would keep a NaN visible; int8 cannot hold one
        raise ModelError("refusing to store non-finite weights as int8 (the training diverged?)")
    amax = value.detach().float().abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax))  # an all-zero row: any scale
    for _ in range(16):
        moved = (scale * 127) / 127 != scale
        if not moved.any():
            break
        scale = torch.where(moved, torch.nextafter(scale, torch.full_like(scale, math.inf)), scale)
    assert ((scale * 127) / 127 == scale).all(), "no fixed-point int8 scale within 16 steps"
    q = torch.round(value.detach().float() / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scale.contiguous()


def _from_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    if q.dim() != 2 or scale.shape != (q.shape[0],):
        raise ValueError(f"int8 tensor {tuple(q.shape)} with scales {tuple(scale.shape)}")
    return q.float() * scale.float()[:, None]


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
