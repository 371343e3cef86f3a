"""Any open_clip architecture as a dual encoder onto the sphere, with `pretrained=` a local
checkpoint file (or a hub tag where the machine has network), or the tuned weights of a
fine-tuned checkpoint (`retrieval.training.finetune`).

A fine-tuned checkpoint is data: its JSON names an architecture, which must be one in open_clip's
own registry (`open_clip.list_models()`: the configs open_clip ships, plus any the process itself
added with `open_clip.add_model_config`), and its tensors are the whole tuned state dict, loaded
strictly. It names no module, no folder and no other file, so it is self-contained: the index
builder copies it into a version like any other checkpoint.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from retrieval.embedding.model import state_fingerprint
from retrieval.errors import ModelError


class OpenClipEncoder(nn.Module):
    """Wraps an open_clip model so it has SphereModel's public surface. Its "heads", for the
    checkpoint format, are the whole open_clip state: fine-tuning may change any of it."""

    def __init__(self, arch: str, pretrained: str | None = None):
        super().__init__()
        import open_clip

        if arch not in open_clip.list_models():
            raise ModelError(f"open_clip has no architecture '{arch}'")
        try:
            self.net, _, self.preprocess = open_clip.create_model_and_transforms(arch, pretrained=pretrained or None)
        except (RuntimeError, OSError, ValueError, KeyError) as e:
            raise ModelError(f"cannot load open_clip '{arch}' with pretrained='{pretrained}': {e}") from e
        self.tokenizer = open_clip.get_tokenizer(arch)
        self.arch = arch
        self.name = f"open_clip:{arch}" + (f"@{pretrained}" if pretrained else "")
        self.embed_dim = int(open_clip.get_model_config(arch)["embed_dim"])
        self.config = {"open_clip": arch, "pretrained": pretrained, "embed_dim": self.embed_dim}
        self.eval()

    # Inputs go to the model's device and the unit vectors come back on the inputs' device, so bulk
    # encoding (CPU batches) works for a model on a GPU too.
    @torch.inference_mode()
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        device = self.net.logit_scale.device
        return F.normalize(self.net.encode_image(pixels.to(device)).float(), dim=-1).to(pixels.device)

    @torch.inference_mode()
    def encode_text(self, token_ids: torch.Tensor) -> torch.Tensor:
        device = self.net.logit_scale.device
        return F.normalize(self.net.encode_text(token_ids.to(device)).float(), dim=-1).to(token_ids.device)

    def fingerprint(self) -> str:
        return state_fingerprint(f"open_clip:{self.arch}", self.net.state_dict())

    # the checkpoint format's surface (`retrieval.embedding.checkpoint`); a tuned transformer's
    # weights are not stored as int8 here: that needs per-layer care the heads do not
    weights_dtype = "float16"

    def head_state_dict(self) -> dict[str, torch.Tensor]:
        return self.state_dict()

    def load_head_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.load_state_dict(state, strict=True)

    def tuned(self, finetune: str) -> OpenClipEncoder:
        """Marks this model as fine-tuned (`finetune` names how): its config then names the
        architecture only, no pretrained file, since the checkpoint carries every weight."""
        self.name = f"open_clip:{self.arch}"
        self.config = {"open_clip": self.arch, "embed_dim": self.embed_dim, "finetune": finetune}
        return self


def is_open_clip_checkpoint(config: dict[str, Any]) -> bool:
    return isinstance(config, dict) and "open_clip" in config


def open_clip_checkpoint_model(path: str, ckpt: dict[str, Any]) -> OpenClipEncoder:
    """The fine-tuned open_clip model a checkpoint describes (its architecture built from open_clip's
    registry with random weights, then the checkpoint's state loaded strictly and fingerprint-checked)."""
    config = ckpt["config"]
    arch, finetune = config.get("open_clip"), config.get("finetune")
    if not isinstance(arch, str) or not isinstance(finetune, str):
        raise ModelError(f"checkpoint '{path}': an open_clip config needs string fields 'open_clip' and 'finetune'")
    model = OpenClipEncoder(arch).tuned(finetune)
    try:
        model.load_head_state_dict(ckpt["heads"])
    except RuntimeError as e:  # missing, unexpected or mis-shaped tensors
        raise ModelError(f"the weights in '{path}' do not fit open_clip '{arch}': {str(e).splitlines()[0]}") from None
    if model.fingerprint() != ckpt["fingerprint"]:
        raise ModelError(f"checkpoint '{path}': its weights do not match its fingerprint {ckpt['fingerprint']}")
    return model.eval()
