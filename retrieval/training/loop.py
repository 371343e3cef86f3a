"""What head training (`train`) and open_clip fine-tuning (`finetune`) share: the loss, AdamW
groups, the warm-up cosine schedule, an epoch's random draws, the optimizer step, and `Run`, a
run's files in OUT with its epoch bookkeeping.

A run writes safetensors checkpoints (`retrieval.embedding.checkpoint`): last.safetensors after
every epoch (the resume state: weights, optimizer, scheduler, RNGs, history), best.safetensors
when dev improves (selection by the mean of the two R@1s), and at the end model.safetensors, the
best weights as the model stores them (`weights_dtype`: float16 or int8), with summary.json beside it.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from pathlib import Path

import numpy as np
import torch

from retrieval.embedding.checkpoint import SUFFIX, load_checkpoint, round_heads, save_checkpoint

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def captions_of(caption_image: np.ndarray, n_images: int) -> list[np.ndarray]:
    """For each image, the indices of its captions."""
    order = np.argsort(caption_image, kind="stable")
    return np.split(order, np.cumsum(np.bincount(caption_image, minlength=n_images))[:-1])


class HardestNegativeLoss(torch.nn.Module):
    """VSE++'s loss (Faghri et al., 2018): each pair's hinge against the hardest negative in the
    batch, both directions. Called like open_clip's ClipLoss; a hinge on cosines has no
    temperature, so `logit_scale` is unused. (open_clip has no such loss; VSE++'s is these lines.)"""

    def __init__(self, margin: float = 0.2):
        super().__init__()
        self.margin = margin

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale=None) -> torch.Tensor:
        sim = image_features @ text_features.T  # (B, B) cosines, pairs on the diagonal
        pos = sim.diagonal()
        eye = torch.eye(len(sim), dtype=torch.bool, device=sim.device)
        to_text = (self.margin + sim - pos[:, None]).clamp(min=0).masked_fill(eye, 0)  # image i vs caption j
        to_image = (self.margin + sim - pos[None, :]).clamp(min=0).masked_fill(eye, 0)  # caption j vs image i
        return to_text.max(1).values.mean() + to_image.max(0).values.mean()


LOSSES = ("clip", "siglip", "vsepp")


def make_loss(kind: str):
    from open_clip.loss import ClipLoss, SigLipLoss

    if kind == "clip":
        return ClipLoss(), None
    if kind == "siglip":
        return SigLipLoss(), torch.nn.Parameter(torch.tensor(-10.0))  # SigLIP's bias init
    if kind == "vsepp":
        return HardestNegativeLoss(), None
    raise ValueError(f"unknown loss '{kind}' (choose one of {', '.join(LOSSES)})")


def decay_groups(params: list[torch.nn.Parameter], weight_decay: float, **extra) -> list[dict]:
    """AdamW parameter groups: weight decay on matrices, none on biases, norms and scalars."""
    return [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay, **extra},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0, **extra},
    ]


def warmup_cosine(opt: torch.optim.Optimizer, total_steps: int, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then cosine decay to zero over `total_steps`."""
    return torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            min(1.0, (s + 1) / max(1, warmup_steps)) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / max(1, total_steps))))
        ),
    )


def epoch_batches(n_img: int, n_views: int, caps: list[np.ndarray], batch_size: int):
    """One epoch's draws: a permutation of the training images and, per image, one random view
    and one random caption of its own. Yields (image indices, their views, their captions) per batch."""
    perm = torch.randperm(n_img)
    view = torch.randint(0, n_views, (n_img,))
    cap = torch.tensor([c[np.random.randint(len(c))] for c in caps])
    for s in range(0, n_img, batch_size):
        idx = perm[s : s + batch_size]
        yield idx, view[idx], cap[idx]


def optimizer_step(model, loss: torch.Tensor, opt: torch.optim.Optimizer, sched, max_logit_scale: float) -> None:
    """Backward, AdamW and schedule step, then CLIP's clamp of the learnable temperature."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()
    model.logit_scale.data.clamp_(0.0, math.log(max_logit_scale))


class Run:
    """A training run's checkpoints in `out` and its bookkeeping across epochs. `model` is what
    `save_checkpoint` writes (its heads, or all its tuned weights); `data` and `config` go into
    every checkpoint; `started`: time.time() at the run's start."""

    def __init__(self, out: Path, model, opt, sched, data: dict, config: dict, started: float):
        self.out, self.model, self.opt, self.sched, self.data, self.config = out, model, opt, sched, data, config
        self.last, self.best_file, self.final = (out / f"{stem}{SUFFIX}" for stem in ("last", "best", "model"))
        self.start_epoch, self.best, self.history = 0, -1.0, []
        self.started = started  # time.time() when the run began, for the summary's seconds

    def resume(self) -> dict | None:
        """Back to the end of the last finished epoch, if last.safetensors is there; its state
        (for what the caller keeps of its own), else None."""
        if not self.last.is_file():
            return None
        state = load_checkpoint(self.last)
        self.model.load_head_state_dict(state["heads"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        np.random.set_state(state["numpy_rng"])
        self.start_epoch, self.best, self.history = state["epoch"] + 1, state["best"], state["history"]
        log.info("resumed from %s at epoch %d (best dev R@1 mean %.2f)", self.last, self.start_epoch, self.best)
        return state

    def end_epoch(self, epoch: int, losses: list[float], metrics: dict, score: float, logit_scale: float, **state):
        """Records the epoch, keeps best.safetensors if `score` (dev) improved, writes
        last.safetensors (with the caller's own `state`); returns the progress bar's postfix."""
        self.history.append(
            {"epoch": epoch, "loss": float(np.mean(losses)), "dev": metrics, "logit_scale": logit_scale}
        )
        postfix = {"loss": f"{np.mean(losses):.3f}", "dev_R1": f"{score:.2f}", "best": f"{max(self.best, score):.2f}"}
        if score > self.best:
            self.best = score
            save_checkpoint(
                self.best_file,
                self.model,
                data=self.data,
                metrics={"dev": metrics, "epoch": epoch},
                train_config=self.config,
            )
        save_checkpoint(
            self.last,
            self.model,
            data=self.data,
            train_config=self.config,
            epoch=epoch,
            best=self.best,
            history=self.history,
            optimizer=self.opt.state_dict(),
            scheduler=self.sched.state_dict(),
            **state,
            torch_rng=torch.get_rng_state(),
            numpy_rng=np.random.get_state(),
        )
        return postfix

    def load_best(self) -> dict:
        """The best epoch's weights into the model, rounded as the final file stores them
        (`round_heads`: so fingerprints agree); returns its metrics."""
        state = load_checkpoint(self.best_file)
        self.model.load_head_state_dict(state["heads"])
        round_heads(self.model)
        return dict(state["metrics"])

    def finish(self, metrics: dict, **summary) -> dict:
        """Writes model.safetensors (`weights_dtype`, no optimizer state) and summary.json; returns the summary."""
        save_checkpoint(self.final, self.model, compact=True, data=self.data, metrics=metrics, train_config=self.config)
        self.model.eval()
        summary = {
            "best_dev_R@1_mean": self.best,
            **summary,
            "epochs": self.config["epochs"],
            "seconds": round(time.time() - self.started, 1),
            "checkpoint": str(self.final),
            "history": self.history,
            "config": self.config,
        }
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary
