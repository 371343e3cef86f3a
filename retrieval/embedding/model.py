"""SphereModel: two pretrained towers, two trainable projection heads, one unit hypersphere.

    image (B,3,H,W) -> image tower -> (B,Fi) -> image head -> (B,D) -> - center_i -> normalize
    text  (B,L)     -> text tower  -> (B,Ft) -> text head  -> (B,D) -> - center_t -> normalize

The centers are each modality's mean projection on the training set, subtracted before the
final normalization (a query-time correction of the modality gap). The query banks and their
beta drive the inverted softmax of `retrieval.embedding.querybank` (a correction of hubness). They all
live in the model, so the index builder and the server apply exactly what evaluation measured.
"""

from __future__ import annotations

import hashlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from retrieval.embedding.config import ModelConfig
from retrieval.errors import ModelError

QUERYBANK_KEYS = ("text_bank", "image_bank", "querybank_beta")
CALIBRATION_KEYS = ("calibration_t2i", "calibration_i2t")  # float64, stored at full precision


class ProjectionHead(nn.Module):
    """LayerNorm -> dropout -> linear, plus an optional residual MLP branch: (B, F) -> (B, D)."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int = 0, dropout: float = 0.0):
        super().__init__()
        self.norm = nn.LayerNorm(in_dim)
        self.drop = nn.Dropout(dropout)
        self.linear = nn.Linear(in_dim, out_dim)
        self.mlp = (
            nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, out_dim))
            if hidden > 0
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.norm(x))
        return self.linear(x) + (self.mlp(x) if self.mlp is not None else 0.0)


class SphereModel(nn.Module):
    """Dual encoder onto the unit sphere. `encode_*` take batches and return float32 unit vectors."""

    def __init__(self, name: str, config: ModelConfig, image_tower: nn.Module, text_tower: nn.Module):
        super().__init__()
        self.name, self.config = name, config
        head = config.head
        self.embed_dim = config.embed_dim
        self.image_tower, self.text_tower = image_tower, text_tower
        self.image_head = ProjectionHead(image_tower.out_dim, self.embed_dim, head.hidden, head.dropout)
        self.text_head = ProjectionHead(text_tower.out_dim, self.embed_dim, head.hidden, head.dropout)
        # CLIP's temperature: logits = exp(t) * cos, t learnable, exp(t) clamped at 100 in training.
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.register_buffer("image_center", torch.zeros(self.embed_dim))
        self.register_buffer("text_center", torch.zeros(self.embed_dim))
        # the inverted softmax's banks of projected training queries (B, D) and its beta (0: off)
        self.register_buffer("text_bank", torch.zeros(0, self.embed_dim))
        self.register_buffer("image_bank", torch.zeros(0, self.embed_dim))
        self.register_buffer("querybank_beta", torch.tensor(0.0))
        # match-probability calibrators per direction, packed (`retrieval.embedding.calibration`); empty: none
        for key in CALIBRATION_KEYS:
            self.register_buffer(key, torch.zeros(0, dtype=torch.float64))
        for p in list(self.image_tower.parameters()) + list(self.text_tower.parameters()):
            p.requires_grad_(False)

    @property
    def weights_dtype(self) -> str:
        """How a deliverable checkpoint stores the heads (`retrieval.embedding.checkpoint`)."""
        return self.config.weights_dtype

    # -- heads on tower features (what training on cached features uses) -------------------
    def project_image(self, features: torch.Tensor, center: bool = True) -> torch.Tensor:
        z = F.normalize(self.image_head(features), dim=-1)
        return F.normalize(z - self.image_center, dim=-1) if center else z

    def project_text(self, features: torch.Tensor, center: bool = True) -> torch.Tensor:
        z = F.normalize(self.text_head(features), dim=-1)
        return F.normalize(z - self.text_center, dim=-1) if center else z

    # -- the public encoders ------------------------------------------------------------------
    @torch.inference_mode()
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:  # (B,3,H,W) -> (B,D) float32
        # channels-last is the layout the CPU convolution kernels run fastest on (measured here:
        # EfficientNet-Lite0 1.2-1.5x faster than on NCHW tensors); a no-op for tensors already in it
        return self.project_image(self.image_tower(pixels.contiguous(memory_format=torch.channels_last))).float()

    @torch.inference_mode()
    def encode_text(self, token_ids: torch.Tensor) -> torch.Tensor:  # (B,L) -> (B,D) float32
        return self.project_text(self.text_tower(token_ids)).float()

    @torch.no_grad()
    def reset_heads(self) -> None:
        """Fresh initialization of everything trainable (from torch's global RNG: seed it first)."""
        for module in list(self.image_head.modules()) + list(self.text_head.modules()):
            if hasattr(module, "reset_parameters") and module is not self:
                module.reset_parameters()
        self.logit_scale.fill_(math.log(1 / 0.07))
        self.image_center.zero_()
        self.text_center.zero_()
        self.clear_querybank()
        self.set_calibration({})

    def clear_querybank(self) -> None:
        """No correction: empty banks, beta 0 (plain cosine ranking)."""
        self.set_querybank(torch.zeros(0, self.embed_dim), torch.zeros(0, self.embed_dim), 0.0)

    @torch.no_grad()
    def set_querybank(self, text_bank: torch.Tensor, image_bank: torch.Tensor, beta: float) -> None:
        """Banks of unit query rows (B, D) per modality and the inverted softmax's beta (0: off)."""
        for name, bank in (("text_bank", text_bank), ("image_bank", image_bank)):
            if bank.ndim != 2 or bank.shape[1] != self.embed_dim:
                raise ModelError(f"{name} must be (B, {self.embed_dim}) query rows, got {tuple(bank.shape)}")
            setattr(self, name, bank.detach().float().clone().to(self.text_center.device))
        self.querybank_beta.fill_(float(beta))

    @torch.no_grad()
    def set_calibration(self, packed: dict[str, torch.Tensor]) -> None:
        """Packed calibrators by direction ('t2i', 'i2t'); a direction left out has none."""
        for key in CALIBRATION_KEYS:
            value = packed.get(key.removeprefix("calibration_"))
            setattr(
                self,
                key,
                torch.zeros(0, dtype=torch.float64)
                if value is None
                else torch.as_tensor(value, dtype=torch.float64).reshape(-1).clone(),
            )

    def calibration(self) -> dict[str, torch.Tensor]:
        """The packed calibrators this model carries, by direction."""
        return {
            key.removeprefix("calibration_"): getattr(self, key) for key in CALIBRATION_KEYS if len(getattr(self, key))
        }

    def head_state_dict(self) -> dict[str, torch.Tensor]:
        """The trained part (heads, temperature, centers): what checkpoints and the package ship."""
        return {
            k: v.detach().clone()
            for k, v in self.state_dict().items()
            if not k.startswith(("image_tower.", "text_tower."))
        }

    def load_head_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load trained heads. Heads saved before query banks existed load with no bank (plain
        cosine ranking, the fingerprint they were saved with)."""
        if "text_bank" in state and "image_bank" in state:  # banks vary in size: take the checkpoint's
            self.set_querybank(state["text_bank"], state["image_bank"], float(state.get("querybank_beta", 0.0)))
        else:
            self.clear_querybank()
        self.set_calibration({key.removeprefix("calibration_"): state[key] for key in CALIBRATION_KEYS if key in state})
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing = [
            k
            for k in missing
            if not k.startswith(("image_tower.", "text_tower.")) and k not in QUERYBANK_KEYS + CALIBRATION_KEYS
        ]
        if missing or unexpected:
            raise ModelError(
                f"the trained heads do not fit model '{self.name}': missing {missing}, unexpected "
                f"{unexpected} (written by another version of this project? retrain them)"
            )

    def fingerprint(self) -> str:
        """sha256 over the name and every tensor (towers included): equal iff embeddings and
        rankings (and match probabilities) are equal. Without a query bank or a calibration, their
        empty buffers are left out, so heads from before they existed keep the fingerprint their
        checkpoints and indexes recorded."""
        state = self.state_dict()
        if float(self.querybank_beta) == 0 and not len(self.text_bank) and not len(self.image_bank):
            state = {k: v for k, v in state.items() if k not in QUERYBANK_KEYS}
        state = {k: v for k, v in state.items() if k not in CALIBRATION_KEYS or len(v)}
        return state_fingerprint(self.name, state)


def state_fingerprint(name: str, state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256(name.encode())
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(key.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]
