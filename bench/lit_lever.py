"""The LiT lever: tune the top layers of the text tower together with the projection heads
(Zhai et al. 2022 lock the image tower and tune the text side), against heads alone.

The frozen part of MiniLM runs once: the hidden states that enter its top k layers are cached
per caption, so an epoch runs only k transformer layers and the heads. Both arms (k = 0: heads
only, k >= 1) go through this same loop, schedule and centering, so their difference is the
lever alone. Used by `bench_levers.py --section lit`.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
from top_tuning import in_chunks, train_heads_and_top
from tqdm import tqdm
from transformers.masking_utils import create_bidirectional_mask

from retrieval.training.train import SplitFeatures


@torch.no_grad()
def token_states(
    tower, tokenizer, texts: list[str], k: int, batch_size: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """States entering the top k layers of `tower` (an HFTextTower): (C, L, H) float16 and the
    token mask (C, L), L the longest caption; k = 0 gives the last layer's output."""
    net = tower.net
    ids = tokenizer(texts)  # (C, context)
    mask = ids != tower.pad_id
    length = int(mask.sum(1).max())
    ids, mask = ids[:, :length], mask[:, :length]
    out = torch.zeros(len(texts), length, net.config.hidden_size, dtype=torch.float16)
    order = torch.argsort(mask.sum(1))
    for s in tqdm(range(0, len(texts), batch_size), desc=f"token states (top {k})", unit="batch"):
        rows = order[s : s + batch_size]
        n = int(mask[rows].sum(1).max())
        hidden = net(
            input_ids=ids[rows, :n], attention_mask=mask[rows, :n].long(), output_hidden_states=True
        ).hidden_states
        out[rows, :n] = hidden[-(k + 1)].half()
    return out, mask


class TopLayers(nn.Module):
    """Trainable copies of the tower's top k layers, then its mean pooling: (B, L, H) -> (B, H)."""

    def __init__(self, tower, k: int):
        super().__init__()
        self.config = tower.net.config
        self.layers = (
            copy.deepcopy(tower.net.encoder.layer[len(tower.net.encoder.layer) - k :]) if k else nn.ModuleList()
        )
        for p in self.layers.parameters():
            p.requires_grad_(True)

    def forward(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        n = int(mask.sum(1).max())
        h, mask = states[:, :n].float(), mask[:, :n]
        if len(self.layers):
            attn = create_bidirectional_mask(config=self.config, inputs_embeds=h, attention_mask=mask.long())
            for layer in self.layers:
                h = layer(h, attention_mask=attn)
                h = h[0] if isinstance(h, tuple) else h
        m = mask.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1).clamp(min=1.0)


def check_top_matches_tower(tower, tokenizer, texts: list[str], k: int) -> float:
    """Largest difference between the frozen tower's output and cached states + untrained top."""
    states, mask = token_states(tower, tokenizer, texts, k)
    with torch.no_grad():
        diff = (TopLayers(tower, k).eval()(states, mask) - tower(tokenizer(texts))).abs().max().item()
    assert diff < 2e-2, f"cached states + top {k} layers differ from the tower by {diff}"
    return diff


def train_lit(
    model,
    k: int,
    tr: SplitFeatures,
    dev: SplitFeatures,
    test: SplitFeatures,
    tokenizer,
    *,
    epochs: int = 30,
    top_lr: float = 2e-5,
    seed: int = 0,
) -> dict:
    """Fresh heads (+ top k text layers), selected on dev R@1 mean with centering; scored on test."""
    top = TopLayers(model.text_tower, k)
    splits = {"train": tr, "dev": dev, "test": test}
    states = {name: token_states(model.text_tower, tokenizer, f.dataset.captions, k) for name, f in splits.items()}

    def image_features(split: str, rows: torch.Tensor | None, view: torch.Tensor | int) -> torch.Tensor:
        image = splits[split].image
        return image[view] if rows is None else image[view, rows]

    def text_features(split: str, rows: torch.Tensor | None) -> torch.Tensor:
        s, m = states[split]
        return in_chunks(lambda r: top(s[r], m[r]), torch.arange(len(s)) if rows is None else rows)

    return train_heads_and_top(
        model, top, splits, image_features, text_features, desc=f"LiT top {k}", epochs=epochs, top_lr=top_lr, seed=seed
    )
