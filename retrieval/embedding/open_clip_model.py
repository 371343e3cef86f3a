"""Any open_clip architecture as a dual encoder onto the sphere, with `pretrained=` a local
checkpoint file (or a hub tag where the machine has network)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from retrieval.errors import ModelError
from retrieval.embedding.model import state_fingerprint


class OpenClipEncoder(nn.Module):
    """Wraps an open_clip model so it has SphereModel's public surface."""

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
        self.name = f"open_clip:{arch}" + (f"@{pretrained}" if pretrained else "")
        self.embed_dim = int(open_clip.get_model_config(arch)["embed_dim"])
        self.config = {"open_clip": arch, "pretrained": pretrained, "embed_dim": self.embed_dim}
        self.eval()

    @torch.inference_mode()
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net.encode_image(pixels).float(), dim=-1)

    @torch.inference_mode()
    def encode_text(self, token_ids: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net.encode_text(token_ids).float(), dim=-1)

    def fingerprint(self) -> str:
        return state_fingerprint(self.name.split("@")[0], self.net.state_dict())
