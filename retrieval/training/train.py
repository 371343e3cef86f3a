"""Contrastive training of the projection heads on cached frozen-tower features.

The towers are frozen, so each image view and caption goes through its tower once; the
features are cached on disk, and an epoch over the heads costs seconds on a CPU. Images get
several views (the center crop plus random resized crops); each epoch pairs every training
image with one random view and one random caption of its own. Loss: symmetric InfoNCE
(open_clip's ClipLoss) with a learnable temperature clamped at 100, or SigLIP's.
Model selection on the dev split (mean of the R@1s); checkpoints every epoch; resumable.
Last, the best heads get the inverted softmax's query banks (random training captions and
images) with its beta chosen on dev (`retrieval.embedding.querybank`), then the match-probability
calibrators fitted on dev (`retrieval.training.calibration`).
Outputs in OUT, safetensors checkpoints (`retrieval.embedding.checkpoint`): last.safetensors (resume
state), best.safetensors (best dev epoch), model.safetensors (best heads in float16: the file to
ship as retrieval/embedding/weights/NAME.safetensors or to pass to create_model).
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from retrieval.embedding.checkpoint import SUFFIX, load_checkpoint, round_heads_to_half, save_checkpoint
from retrieval.embedding.factory import image_preprocess, text_tokenizer
from retrieval.encoding.bulk import encode_image_files, encode_texts
from retrieval.encoding.datasets import CaptionDataset, load_caption_dataset
from retrieval.progress import meter
from retrieval.sphere.recall import recall_at_k
from retrieval.training.calibration import calibrate_model
from retrieval.training.feature_cache import FeatureCache
from retrieval.training.querybank_fit import fit_querybank

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    data: str
    model: str = "lite0-minilm"
    out: str = "runs/lite0-minilm"
    cache_dir: str = ".feature-cache"
    views: int = 4  # image views cached per training image: 1 center + (views-1) random crops
    crop_scale_min: float = 0.5
    epochs: int = 60
    batch_size: int = 512
    lr: float = 2e-3
    weight_decay: float = 0.5
    warmup_epochs: float = 2.0
    loss: str = "clip"  # "clip" (symmetric InfoNCE) or "siglip"
    max_logit_scale: float = 100.0
    center: bool = True  # subtract each modality's training mean before normalizing
    querybank_size: int = 1000  # training queries per modality kept for the inverted softmax (0: none)
    seed: int = 0
    workers: int | None = None
    resume: bool = False
    train_split: str = "train"
    dev_split: str = "dev"


@dataclass
class SplitFeatures:
    dataset: CaptionDataset
    image: torch.Tensor  # (V, N, Fi) tower features, V views
    text: torch.Tensor  # (C, Ft)


def split_features(model, split: str, cfg: TrainConfig, views: int) -> SplitFeatures:
    """Tower features of one split, from the cache when present. Images that do not decode are
    dropped (with their captions) and reported."""
    ds = load_caption_dataset(cfg.data, split)
    cache = FeatureCache(cfg.cache_dir)
    paths = [str(p) for p in ds.image_paths()]
    per_view, bad = [], {}
    for v in range(views):
        transform = image_preprocess(model, train=v > 0, crop_scale=(cfg.crop_scale_min, 1.0))
        key = cache.key(
            model.image_tower,
            paths,
            f"{model.config.to_dict()['image_tower']}|{transform}|view={v}|seed={cfg.seed}|crops seeded per item",
        )
        feats, bad_v = cache.get_or_compute(
            key,
            lambda transform=transform, v=v: encode_image_files(
                model,
                paths,
                transform,
                project=False,
                workers=cfg.workers,
                seed=cfg.seed * 1000 + v,
                desc=f"{split} images, view {v + 1}/{views}",
            ),
        )
        per_view.append(feats)
        bad.update(bad_v)
    tkey = cache.key(model.text_tower, ds.captions, f"text|{model.config.to_dict()['text_tower']}")
    text, _ = cache.get_or_compute(
        tkey,
        lambda: (encode_texts(model, text_tokenizer(model), ds.captions, project=False, desc=f"{split} captions"), {}),
    )
    keep_img = np.array([i not in bad for i in range(len(paths))])
    keep_cap = keep_img[ds.caption_image]
    ds = ds.drop_images(bad)
    for item, reason in ds.skipped:
        log.warning("skipped %s: %s", item, reason)
    image = torch.from_numpy(np.stack([f[keep_img] for f in per_view]))
    return SplitFeatures(ds, image, torch.from_numpy(text[keep_cap]))


def _captions_of(caption_image: np.ndarray, n_images: int) -> list[np.ndarray]:
    order = np.argsort(caption_image, kind="stable")
    return np.split(order, np.cumsum(np.bincount(caption_image, minlength=n_images))[:-1])


@torch.no_grad()
def fit_centers(model, feats: SplitFeatures) -> None:
    """Each modality's mean unit projection on the training set (center view, all captions)."""
    model.eval()
    model.image_center.copy_(model.project_image(feats.image[0], center=False).mean(0))
    model.text_center.copy_(model.project_text(feats.text, center=False).mean(0))


@torch.no_grad()
def dev_metrics(model, dev: SplitFeatures) -> dict[str, float]:
    """Dev recall with the centering correction, and (for the record) without it."""
    model.eval()
    ds = dev.dataset
    out = recall_at_k(model.project_image(dev.image[0]).numpy(), model.project_text(dev.text).numpy(), ds.caption_image)
    raw = recall_at_k(
        model.project_image(dev.image[0], center=False).numpy(),
        model.project_text(dev.text, center=False).numpy(),
        ds.caption_image,
    )
    out["R@1_mean"] = (out["t2i_R@1"] + out["i2t_R@1"]) / 2
    out["R@1_mean_uncentered"] = (raw["t2i_R@1"] + raw["i2t_R@1"]) / 2
    return out


@torch.no_grad()
def fit_querybank_on(model, tr: SplitFeatures, dev: SplitFeatures, cfg: TrainConfig) -> dict:
    """The inverted softmax's banks from the training split (center views, all captions) and
    its beta from dev, both through the model's final (centered) projections."""
    model.eval()
    bank, report = fit_querybank(
        model.project_text(tr.text).numpy(),
        model.project_image(tr.image[0]).numpy(),
        model.project_image(dev.image[0]).numpy(),
        model.project_text(dev.text).numpy(),
        dev.dataset.caption_image,
        cfg.querybank_size,
        cfg.seed,
    )
    model.set_querybank(torch.from_numpy(bank.text), torch.from_numpy(bank.image), bank.beta)
    return report


@torch.no_grad()
def calibrate_on(model, dev: SplitFeatures, split: str) -> dict:
    """The match-probability calibrators fitted on a held-out split through the model's final
    projections and query bank (what `retrieval calibrate` also runs, so both write the same)."""
    model.eval()
    report = calibrate_model(
        model,
        model.project_image(dev.image[0]).numpy(),
        model.project_text(dev.text).numpy(),
        dev.dataset.caption_image,
    )
    return {"split": split, **report}


def make_loss(kind: str):
    from open_clip.loss import ClipLoss, SigLipLoss

    if kind == "clip":
        return ClipLoss(), None
    if kind == "siglip":
        return SigLipLoss(), torch.nn.Parameter(torch.tensor(-10.0))  # SigLIP's bias init
    raise ValueError(f"unknown loss '{kind}' (choose clip or siglip)")


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


def train(cfg: TrainConfig, model, features: tuple[SplitFeatures, SplitFeatures] | None = None) -> dict:
    """Trains `model`'s heads in place; returns the summary written next to the checkpoints.
    `features` (train, dev) skips loading them from the cache (benchmarks slice them)."""
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    if not Path(cfg.model).is_file():  # a registered name: start from seeded fresh heads
        model.reset_heads()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    tr, dev = features or (
        split_features(model, cfg.train_split, cfg, cfg.views),
        split_features(model, cfg.dev_split, cfg, 1),
    )
    log.info(
        "features ready in %.0fs: train %s images x %d views, %d captions; dev %d images",
        time.time() - t0,
        tr.image.shape[1],
        tr.image.shape[0],
        len(tr.text),
        dev.image.shape[1],
    )
    loss_fn, logit_bias = make_loss(cfg.loss)
    if cfg.loss == "siglip":
        model.logit_scale.data.fill_(math.log(10.0))
    params = [p for p in model.parameters() if p.requires_grad] + ([logit_bias] if logit_bias is not None else [])
    opt = torch.optim.AdamW(decay_groups(params, cfg.weight_decay), lr=cfg.lr)
    n_img = tr.image.shape[1]
    steps_per_epoch = math.ceil(n_img / cfg.batch_size)
    sched = warmup_cosine(opt, cfg.epochs * steps_per_epoch, int(cfg.warmup_epochs * steps_per_epoch))
    start_epoch, best, history = 0, -1.0, []
    last, best_file, final = (out / f"{stem}{SUFFIX}" for stem in ("last", "best", "model"))
    if cfg.resume and last.is_file():
        state = load_checkpoint(last)
        model.load_head_state_dict(state["heads"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        if logit_bias is not None and state.get("logit_bias") is not None:
            logit_bias.data.fill_(state["logit_bias"])
        torch.set_rng_state(state["torch_rng"])
        np.random.set_state(state["numpy_rng"])
        start_epoch, best, history = state["epoch"] + 1, state["best"], state["history"]
        log.info("resumed from %s at epoch %d (best dev R@1 mean %.2f)", last, start_epoch, best)
    caps = _captions_of(tr.dataset.caption_image, n_img)
    data_info = {
        "path": str(Path(cfg.data).resolve()),
        "train_split": cfg.train_split,
        "dev_split": cfg.dev_split,
        "train_images": n_img,
        "train_captions": len(tr.text),
        "views": cfg.views,
        "skipped": len(tr.dataset.skipped) + len(dev.dataset.skipped),
    }
    with meter(cfg.epochs, "epochs", "epoch", initial=start_epoch) as bar:
        for epoch in range(start_epoch, cfg.epochs):
            model.train()
            losses = []
            for idx, view, cap in epoch_batches(n_img, tr.image.shape[0], caps, cfg.batch_size):
                zi = model.project_image(tr.image[view, idx], center=False)  # (B, D)
                zt = model.project_text(tr.text[cap], center=False)  # (B, D)
                if logit_bias is None:
                    loss = loss_fn(zi, zt, model.logit_scale.exp())
                else:
                    loss = loss_fn(zi, zt, model.logit_scale.exp(), logit_bias)
                optimizer_step(model, loss, opt, sched, cfg.max_logit_scale)
                losses.append(loss.item())
            if cfg.center:
                fit_centers(model, tr)
            metrics = dev_metrics(model, dev)
            score = metrics["R@1_mean"] if cfg.center else metrics["R@1_mean_uncentered"]
            history.append(
                {
                    "epoch": epoch,
                    "loss": float(np.mean(losses)),
                    "dev": metrics,
                    "logit_scale": model.logit_scale.exp().item(),
                }
            )
            bar.set_postfix(loss=f"{np.mean(losses):.3f}", dev_R1=f"{score:.2f}", best=f"{max(best, score):.2f}")
            if score > best:
                best = score
                save_checkpoint(
                    best_file, model, data=data_info, metrics={"dev": metrics, "epoch": epoch}, train_config=asdict(cfg)
                )
            save_checkpoint(
                last,
                model,
                data=data_info,
                train_config=asdict(cfg),
                epoch=epoch,
                best=best,
                history=history,
                optimizer=opt.state_dict(),
                scheduler=sched.state_dict(),
                logit_bias=float(logit_bias) if logit_bias is not None else None,
                torch_rng=torch.get_rng_state(),
                numpy_rng=np.random.get_state(),
            )
            bar.update(1)
    # The deliverable: the best heads, float16, with their query banks, no optimizer state: small
    # enough to ship in the package.
    best_state = load_checkpoint(best_file)
    model.load_head_state_dict(best_state["heads"])
    round_heads_to_half(model)
    metrics = dict(best_state["metrics"])
    if cfg.querybank_size > 0:
        metrics["querybank"] = fit_querybank_on(model, tr, dev, cfg)
        round_heads_to_half(model)  # the banks too, as the float16 file stores them
    metrics["calibration"] = calibrate_on(model, dev, cfg.dev_split)
    save_checkpoint(final, model, half=True, data=data_info, metrics=metrics, train_config=asdict(cfg))
    model.eval()
    summary = {
        "best_dev_R@1_mean": best,
        "querybank": metrics.get("querybank"),
        "epochs": cfg.epochs,
        "seconds": round(time.time() - t0, 1),
        "checkpoint": str(final),
        "history": history,
        "config": asdict(cfg),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
