"""The loop that the tower-top levers share (`lit_lever.py` tunes the text tower's top layers,
`image_top_lever.py` the image tower's top stage and its pooling): fresh heads plus a trainable
`top` module, one AdamW with a group per part, the warm-up cosine schedule, the centering the
shipped model fits, selection on dev R@1 mean and a score on test. A lever supplies how each
split's tower features are made; with nothing to train in `top` the loop trains heads alone, so
both arms of a lever differ by the lever only.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn as nn
from open_clip.loss import ClipLoss
from tqdm import tqdm

from retrieval.sphere.recall import recall_at_k
from retrieval.training.loop import captions_of, decay_groups, epoch_batches, optimizer_step, warmup_cosine
from retrieval.training.train import SplitFeatures

# (split name, rows or None for all, views: an index per row or one int) -> (B, F) tower features
ImageFeatures = Callable[[str, torch.Tensor | None, torch.Tensor | int], torch.Tensor]
TextFeatures = Callable[[str, torch.Tensor | None], torch.Tensor]


def in_chunks(fn: Callable[[torch.Tensor], torch.Tensor], rows: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """fn over `rows` a chunk at a time, concatenated (bounds the memory of a whole split's pass)."""
    return torch.cat([fn(rows[i : i + chunk]) for i in range(0, len(rows), chunk)])


def train_heads_and_top(
    model,
    top: nn.Module,
    splits: dict[str, SplitFeatures],
    image_features: ImageFeatures,
    text_features: TextFeatures,
    *,
    desc: str,
    epochs: int = 30,
    batch_size: int = 512,
    lr: float = 2e-3,
    top_lr: float = 2e-5,
    weight_decay: float = 0.5,
    top_weight_decay: float = 0.01,
    seed: int = 0,
) -> dict:
    """Fresh heads + `top`, selected on dev R@1 mean with centering; scored on test. `splits`
    has "train" (V views), "dev" and "test"; the feature callables read them by name."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    model.reset_heads()
    tr = splits["train"]
    heads = [p for p in model.parameters() if p.requires_grad]
    tuned = [p for p in top.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(decay_groups(heads, weight_decay, lr=lr) + decay_groups(tuned, top_weight_decay, lr=top_lr))
    n_img = tr.image.shape[1]
    steps = math.ceil(n_img / batch_size)
    sched = warmup_cosine(opt, epochs * steps, 2 * steps)
    loss_fn = ClipLoss()
    caps = captions_of(tr.dataset.caption_image, n_img)
    first_caption = torch.tensor([c[0] for c in caps])

    @torch.no_grad()
    def recall(split: str) -> dict:
        return recall_at_k(
            model.project_image(image_features(split, None, 0)).numpy(),
            model.project_text(text_features(split, None)).numpy(),
            splits[split].dataset.caption_image,
        )

    best, best_state, history, started = -1.0, None, [], time.time()
    for _epoch in tqdm(range(epochs), desc=desc, unit="epoch"):
        model.train()
        top.train()
        for idx, view, cap in epoch_batches(n_img, tr.image.shape[0], caps, batch_size):
            zi = model.project_image(image_features("train", idx, view), center=False)  # (B, D)
            zt = model.project_text(text_features("train", cap), center=False)  # (B, D)
            optimizer_step(model, loss_fn(zi, zt, model.logit_scale.exp()), opt, sched, 100.0)
        model.eval()
        top.eval()
        with torch.no_grad():  # centers as the shipped model fits them (one caption per image here)
            model.image_center.copy_(model.project_image(image_features("train", None, 0), center=False).mean(0))
            model.text_center.copy_(model.project_text(text_features("train", first_caption), center=False).mean(0))
        d = recall("dev")
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
        "test": {key: round(v, 2) for key, v in recall("test").items()},
    }
