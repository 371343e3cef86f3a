"""Contrastive training of the projection heads on cached frozen-tower features.

The towers are frozen, so each image view and caption goes through its tower once; the
features are cached on disk, and an epoch over the heads costs seconds on a CPU. Images get
several views (the center crop plus random resized crops); each epoch pairs every training
image with one random view and one random caption of its own. Loss: symmetric InfoNCE
(open_clip's ClipLoss) with a learnable temperature clamped at 100, or SigLIP's.
Model selection on the dev split (mean of the R@1s); checkpoints every epoch; resumable
(`retrieval.training.loop.Run`).
Last, the best heads get the inverted softmax's query banks (random training captions and
images) with its beta chosen on dev (`retrieval.embedding.querybank`), then the match-probability
calibrators fitted on dev (`retrieval.training.calibration`).
Outputs in OUT, safetensors checkpoints (`retrieval.embedding.checkpoint`): last.safetensors (resume
state), best.safetensors (best dev epoch), model.safetensors (best heads in float16, or int8 where
the model config says so: the file to ship as retrieval/embedding/weights/NAME.safetensors or to
pass to create_model).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from retrieval.embedding.checkpoint import round_heads
from retrieval.embedding.factory import image_preprocess, text_tokenizer
from retrieval.encoding.bulk import encode_image_files, encode_texts
from retrieval.encoding.datasets import CaptionDataset, load_caption_dataset
from retrieval.errors import ConfigError
from retrieval.progress import meter
from retrieval.sphere.recall import recall_at_k
from retrieval.training.calibration import calibrate_model
from retrieval.training.feature_cache import FeatureCache
from retrieval.training.loop import (
    LOSSES,
    Run,
    captions_of,
    decay_groups,
    epoch_batches,
    make_loss,
    optimizer_step,
    seed_everything,
    warmup_cosine,
)
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
    loss: str = "clip"  # "clip" (symmetric InfoNCE), "siglip" or "vsepp" (hardest-negative hinge)
    max_logit_scale: float = 100.0
    center: bool = True  # subtract each modality's training mean before normalizing
    querybank_size: int = 1000  # training queries per modality kept for the inverted softmax (0: none)
    seed: int = 0
    workers: int | None = None
    resume: bool = False
    train_split: str = "train"
    dev_split: str = "dev"

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ConfigError(f"--loss: unknown loss {self.loss!r} (choose one of {', '.join(LOSSES)})")


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


def train(cfg: TrainConfig, model, features: tuple[SplitFeatures, SplitFeatures] | None = None) -> dict:
    """Trains `model`'s heads in place; returns the summary written next to the checkpoints.
    `features` (train, dev) skips loading them from the cache (benchmarks slice them)."""
    seed_everything(cfg.seed)
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
    data_info = {
        "path": str(Path(cfg.data).resolve()),
        "train_split": cfg.train_split,
        "dev_split": cfg.dev_split,
        "train_images": n_img,
        "train_captions": len(tr.text),
        "views": cfg.views,
        "skipped": len(tr.dataset.skipped) + len(dev.dataset.skipped),
    }
    run = Run(out, model, opt, sched, data_info, asdict(cfg), t0)
    state = run.resume() if cfg.resume else None
    if state is not None and logit_bias is not None and state.get("logit_bias") is not None:
        logit_bias.data.fill_(state["logit_bias"])
    caps = captions_of(tr.dataset.caption_image, n_img)
    with meter(cfg.epochs, "epochs", "epoch", initial=run.start_epoch) as bar:
        for epoch in range(run.start_epoch, cfg.epochs):
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
            scale, bias = model.logit_scale.exp().item(), float(logit_bias) if logit_bias is not None else None
            bar.set_postfix(**run.end_epoch(epoch, losses, metrics, score, scale, logit_bias=bias))
            bar.update(1)
    # The deliverable: the best heads, float16 or int8 (`weights_dtype`), with their query banks,
    # no optimizer state: small enough to ship in the package.
    metrics = run.load_best()
    if cfg.querybank_size > 0:
        metrics["querybank"] = fit_querybank_on(model, tr, dev, cfg)
        round_heads(model)  # the banks too, as the file stores them
    metrics["calibration"] = calibrate_on(model, dev, cfg.dev_split)
    return run.finish(metrics, querybank=metrics.get("querybank"))
