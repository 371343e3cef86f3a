"""The model registry (named JSON configs in `model_configs/`) and the one factory:

model, preprocess, tokenizer = create_model("lite0-minilm")
model, preprocess, tokenizer = create_model("runs/x/model.safetensors")     # our checkpoint
model, preprocess, tokenizer = create_model("open_clip:ViT-B-32@/ckpt.pt")  # any open_clip arch
"""

from __future__ import annotations

import json
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from open_clip.tokenizer import HFTokenizer
from open_clip.transform import AugmentationCfg, image_transform

from retrieval.embedding.allocator import retain_freed_memory
from retrieval.embedding.checkpoint import SUFFIX, load_checkpoint
from retrieval.embedding.config import ModelConfig
from retrieval.embedding.model import SphereModel
from retrieval.embedding.towers import EfficientNetLiteTower, HFTextTower
from retrieval.errors import ModelError

DEFAULT_MODEL = "lite0-minilm"
_CONFIG_DIR = resources.files("retrieval.embedding") / "model_configs"
_WEIGHTS_DIR = resources.files("retrieval.embedding") / "weights"


def list_models() -> list[str]:
    """Names of the registered configs."""
    return sorted(p.name[: -len(".json")] for p in _CONFIG_DIR.iterdir() if p.name.endswith(".json"))


def get_model_config(name: str) -> ModelConfig:
    path = _CONFIG_DIR / f"{name}.json"
    if not path.is_file():
        raise ModelError(
            f"unknown model '{name}'; registered: {list_models()}, or pass a checkpoint path or open_clip:ARCH"
        )
    return ModelConfig.from_dict(json.loads(path.read_text()), source=f"model config '{name}'")


def shipped_weights_path(config: ModelConfig) -> Path | None:
    """The trained heads that ship inside the package for a registered config, if present."""
    name = config.weights
    path = Path(str(_WEIGHTS_DIR / name)) if name else None
    return path if path is not None and path.is_file() else None


def build_sphere_model(name: str, config: ModelConfig) -> SphereModel:
    """Towers from their packages plus freshly initialized heads (no trained weights)."""
    it, tt = config.image_tower, config.text_tower
    if it.type != "efficientnet_lite" or tt.type != "hf":
        raise ModelError(f"model '{name}': unsupported tower types {it.type!r}/{tt.type!r}")
    image_tower = EfficientNetLiteTower(it.variant, list(it.taps))
    text_tower = HFTextTower(tt.model, list(tt.layers))
    return SphereModel(name, config, image_tower, text_tower).eval()


def image_preprocess(model: SphereModel, train: bool = False, crop_scale: tuple[float, float] = (0.5, 1.0)) -> Callable:
    """open_clip's transform at the tower's native size with the tower's normalization;
    `train=True` gives random resized crops (the augmented views cached for training)."""
    tower = model.image_tower
    aug = AugmentationCfg(scale=crop_scale) if train else None
    return image_transform(tower.image_size, is_train=train, mean=tower.mean, std=tower.std, aug_cfg=aug)


def text_tokenizer(model: SphereModel) -> HFTokenizer:
    return HFTokenizer(model.text_tower.model_path, context_length=model.config.text_tower.context_length)


def create_model(
    name_or_checkpoint: str = DEFAULT_MODEL,
    pretrained: str | None = None,
    load_weights: bool = True,
    device: str | torch.device = "cpu",
):
    """Returns (model, preprocess, tokenizer); the model is in eval mode on `device`.

    - a registered name loads the trained heads shipped in the package (unless `load_weights`
      is False, which gives untrained heads: what training starts from);
    - a path loads a checkpoint written by `retrieval train`;
    - `open_clip:ARCH[@PRETRAINED]` (or `pretrained=`) builds any open_clip architecture.
    """
    if name_or_checkpoint.startswith("open_clip:"):
        from retrieval.embedding.open_clip_model import OpenClipEncoder

        arch, _, tag = name_or_checkpoint[len("open_clip:") :].partition("@")
        model = to_device(OpenClipEncoder(arch, pretrained or tag or None), device)
        return model, model.preprocess, model.tokenizer

    if name_or_checkpoint.endswith((".pt", ".pth", SUFFIX)) or Path(name_or_checkpoint).is_file():
        model = checkpoint_model(name_or_checkpoint)
        if not isinstance(model, SphereModel):  # a fine-tuned open_clip model
            model = to_device(model, device).eval()
            return model, model.preprocess, model.tokenizer
    else:
        config = get_model_config(name_or_checkpoint)
        model = build_sphere_model(name_or_checkpoint, config)
        if load_weights:
            path = shipped_weights_path(config)
            if path is None:
                raise ModelError(
                    f"model '{name_or_checkpoint}' ships no trained heads; train them with "
                    f"`retrieval train --model {name_or_checkpoint} --data DIR` and pass the checkpoint"
                )
            load_trained_heads(model, load_checkpoint(path), path)
    model = to_device(model, device).eval()
    return model, image_preprocess(model), text_tokenizer(model)


def checkpoint_model(path: str | Path) -> torch.nn.Module:
    """The model a checkpoint file describes, with its trained heads. Its text model must be one a
    registered config uses: a checkpoint is data, and a free-form spec would import a module or
    read a folder that the file chose (the image tower's variant is checked against the packaged
    ones when it is built). A fine-tuned open_clip checkpoint names an architecture of open_clip's
    own registry (`retrieval.embedding.open_clip_model.open_clip_checkpoint_model`)."""
    ckpt = load_checkpoint(path)
    from retrieval.embedding.open_clip_model import is_open_clip_checkpoint, open_clip_checkpoint_model

    if is_open_clip_checkpoint(ckpt["config"]):
        return open_clip_checkpoint_model(str(path), ckpt)
    config = ModelConfig.from_dict(ckpt["config"], source=f"checkpoint '{path}': config")
    text_model = config.text_tower.model
    registered = {get_model_config(name).text_tower.model for name in list_models()}
    if text_model not in registered:
        raise ModelError(
            f"checkpoint '{path}' names the text model {text_model!r}, which no registered model "
            f"uses (registered: {sorted(registered)})"
        )
    try:
        model = build_sphere_model(ckpt["name"], config)
    except (KeyError, TypeError, ValueError, AttributeError) as e:  # a config that does not fit
        raise ModelError(f"checkpoint '{path}' has a model config this version cannot build: {e!r}") from None
    load_trained_heads(model, ckpt, path)
    return model


def load_trained_heads(model: SphereModel, ckpt: dict[str, Any], path: str | Path) -> None:
    """Load a checkpoint's heads into `model`; the result must have the fingerprint it was saved with."""
    try:
        model.load_head_state_dict(ckpt["heads"])
    except RuntimeError as e:  # a tensor of another shape
        raise ModelError(
            f"the trained heads in '{path}' do not fit model '{model.name}': {str(e).splitlines()[0]}"
        ) from None
    if model.fingerprint() != ckpt["fingerprint"]:
        raise ModelError(
            f"checkpoint '{path}' was made with different tower weights (fingerprint "
            f"{ckpt['fingerprint']} != {model.fingerprint()}); reinstall the packages it names"
        )


def to_device(model: torch.nn.Module, device: str | torch.device) -> torch.nn.Module:
    """The model moved to `device`, or one clear error naming the device (torch's own is long).
    A model that runs on the CPU also tunes the process's allocator for it (`retrieval.embedding.allocator`:
    ~1.7x faster image encoding at batch 8)."""
    try:
        device = torch.device(device)
        model = model.to(device)
    except (RuntimeError, AssertionError, ValueError) as e:  # unknown name, CUDA absent or not compiled in
        available = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        raise ModelError(
            f"cannot run the model on device '{device}' ({str(e).splitlines()[0]}); "
            f"available here: {', '.join(available)}"
        ) from e
    if device.type == "cpu":
        retain_freed_memory()
    return model
