"""The LiT lever: tune the top layers of the text tower together with the projection heads
(Zhai et al. 2022 lock the image tower and tune the text side), against heads alone.

The frozen part of MiniLM runs once: the hidden states that enter its top k layers are cached
per caption, so an epoch runs only k transformer layers and the heads. Both arms (k = 0: heads
only, k >= 1) go through this same loop, schedule and centering, so their difference is the
lever alone. Used by `bench_levers.py --section lit`.
"""

from __future__ import annotations

import copy
import math
import time

import numpy as np
import torch
import torch.nn as nn
from open_clip.loss import ClipLoss
from tqdm import tqdm
from transformers.masking_utils import create_bidirectional_mask

from retrieval.sphere.recall import recall_at_k
from retrieval.training.loop import captions_of, decay_groups, epoch_batches, optimizer_step, warmup_cosine
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
    batch_size: int = 512,
    lr: float = 2e-3,
    top_lr: float = 2e-5,
    weight_decay: float = 0.5,
    seed: int = 0,
) -> dict:
    """Fresh heads (+ top k text layers), selected on dev R@1 mean with centering; scored on test."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    model.reset_heads()
    top = TopLayers(model.text_tower, k)
    states = {
        name: token_states(model.text_tower, tokenizer, f.dataset.captions, k)
        for name, f in (("train", tr), ("dev", dev), ("test", test))
    }
    heads = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(
        decay_groups(heads, weight_decay, lr=lr) + decay_groups(list(top.parameters()), 0.01, lr=top_lr)
    )
    n_img = tr.image.shape[1]
    steps = math.ceil(n_img / batch_size)
    sched = warmup_cosine(opt, epochs * steps, 2 * steps)
    loss_fn = ClipLoss()
    caps = captions_of(tr.dataset.caption_image, n_img)
    first_caption = torch.tensor([c[0] for c in caps])

    def text_features(split: str, rows: torch.Tensor | None = None, chunk: int = 1024) -> torch.Tensor:
        s, m = states[split]
        rows = torch.arange(len(s)) if rows is None else rows
        return torch.cat([top(s[rows[i : i + chunk]], m[rows[i : i + chunk]]) for i in range(0, len(rows), chunk)])

    @torch.no_grad()
    def recall(split: str, f: SplitFeatures) -> dict:
        return recall_at_k(
            model.project_image(f.image[0]).numpy(),
            model.project_text(text_features(split)).numpy(),
            f.dataset.caption_image,
        )

    best, best_state, history, started = -1.0, None, [], time.time()
    for _epoch in tqdm(range(epochs), desc=f"LiT top {k}", unit="epoch"):
        model.train()
        top.train()
        for idx, view, cap in epoch_batches(n_img, tr.image.shape[0], caps, batch_size):
            zi = model.project_image(tr.image[view, idx], center=False)  # (B, D)
            zt = model.project_text(text_features("train", cap), center=False)  # (B, D)
            optimizer_step(model, loss_fn(zi, zt, model.logit_scale.exp()), opt, sched, 100.0)
        model.eval()
        top.eval()
        with torch.no_grad():  # centers as the shipped model fits them (one caption per image here)
            model.image_center.copy_(model.project_image(tr.image[0], center=False).mean(0))
            model.text_center.copy_(model.project_text(text_features("train", first_caption), center=False).mean(0))
        d = recall("dev", dev)
        score = (d["t2i_R@1"] + d["i2t_R@1"]) / 2
        history.append(round(score, 2))
        if score > best:
            best, best_state = score, (copy.deepcopy(model.head_state_dict()), copy.deepcopy(top.state_dict()))
    model.load_head_state_dict(best_state[0])
    top.load_state_dict(best_state[1])
    top.eval()
    return {
        "dev_R@1_mean": round(best, 2),
        "dev_history": history,
        "train_seconds": round(time.time() - started, 1),
        "test": {key: round(v, 2) for key, v in recall("test", test).items()},
    }
