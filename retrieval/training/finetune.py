"""Contrastive fine-tuning of an open_clip model on a caption dataset (`retrieval train --model
open_clip:ARCH@FILE --finetune lit|full`).

- `lit` (Locked-image Tuning, Zhai et al. 2022): the image tower is frozen (open_clip's
  `lock_image_tower`, batch-norm statistics too), so each training image's views are encoded once
  at the start and kept in memory; every epoch tunes the text tower and the temperature against them.
- `full`: every weight is tuned; each batch decodes its images with a fresh random resized crop.
Both pair every training image with one random caption of its own per epoch (`loop.epoch_batches`),
use open_clip's ClipLoss with the learnable temperature clamped (`loop.optimizer_step`), AdamW
without decay on biases and norms, linear warm-up then cosine decay, and select on dev by the mean
of the two R@1s (`retrieval.sphere.recall`). Outputs in OUT as for head training (`loop.Run`): last.safetensors
(resume state: weights, optimizer, scheduler, RNG), best.safetensors (best dev epoch) and
model.safetensors (the best weights in float16, the file to pass to `create_model`, the index
builder or the server). The checkpoints hold the whole tuned state and name only the architecture
(`retrieval.embedding.open_clip_model`): no pickle, no reference to the pretrained file.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from retrieval.embedding.open_clip_model import OpenClipEncoder
from retrieval.encoding.bulk import encode_image_files, encode_texts, image_loader, input_size
from retrieval.encoding.datasets import CaptionDataset, load_caption_dataset
from retrieval.errors import ConfigError
from retrieval.progress import meter
from retrieval.sphere.recall import recall_at_k
from retrieval.training.loop import (
    Run,
    captions_of,
    decay_groups,
    epoch_batches,
    make_loss,
    optimizer_step,
    seed_everything,
    warmup_cosine,
)

log = logging.getLogger(__name__)
MODES = ("lit", "full")


@dataclass
class FinetuneConfig:
    data: str
    model: str  # open_clip:ARCH[@PRETRAINED]
    out: str = "runs/finetune"
    finetune: str = "lit"  # "lit" (locked image tower, tuned text tower) or "full"
    views: int = 2  # lit: image views encoded once per training image (1 center + random crops)
    crop_scale_min: float = 0.5
    epochs: int = 5
    batch_size: int = 64
    lr: float = 1e-5
    weight_decay: float = 0.1
    warmup_epochs: float = 0.5
    max_logit_scale: float = 100.0
    seed: int = 0
    workers: int | None = None
    device: str = "cpu"
    resume: bool = False
    train_split: str = "train"
    dev_split: str = "dev"

    def __post_init__(self):
        if self.finetune not in MODES:
            raise ConfigError(f"--finetune must be one of {', '.join(MODES)}, not {self.finetune!r}")
        if not self.model.startswith("open_clip:"):
            raise ConfigError(f"fine-tuning takes an open_clip:ARCH[@PRETRAINED] model, not {self.model!r}")
        if self.views < 1 or self.epochs < 1 or self.batch_size < 2:
            raise ConfigError("--views and --epochs must be >= 1 and --batch-size >= 2")


def _transforms(model: OpenClipEncoder, cfg: FinetuneConfig):
    from open_clip.transform import AugmentationCfg, image_transform

    pp = model.net.visual.preprocess_cfg  # what open_clip's own transforms were made from
    train = image_transform(
        pp["size"],
        is_train=True,
        mean=pp["mean"],
        std=pp["std"],
        aug_cfg=AugmentationCfg(scale=(cfg.crop_scale_min, 1.0)),
    )
    return model.preprocess, train


def _encode_split(
    model: OpenClipEncoder, ds: CaptionDataset, transform, cfg: FinetuneConfig, seed: int, desc: str
) -> tuple[torch.Tensor, dict[int, str]]:
    vecs, bad = encode_image_files(
        model, [str(p) for p in ds.image_paths()], transform, workers=cfg.workers, seed=seed, desc=desc
    )
    return torch.from_numpy(vecs), bad


@torch.no_grad()
def dev_metrics(model: OpenClipEncoder, dev: CaptionDataset, cfg: FinetuneConfig) -> dict[str, float]:
    model.eval()
    img, _ = _encode_split(model, dev, model.preprocess, cfg, cfg.seed, "dev images")
    txt = encode_texts(model, model.tokenizer, dev.captions, batch_size=128, progress=False)
    out = recall_at_k(img.numpy(), txt, dev.caption_image)
    out["R@1_mean"] = (out["t2i_R@1"] + out["i2t_R@1"]) / 2
    return out


def _batch_pixels(
    paths: list[str], idx: torch.Tensor, transform, size: int, seed: int
) -> tuple[torch.Tensor, np.ndarray]:
    """A batch's images with fresh random crops (seeded per epoch and item); the mask of those that decoded."""
    with torch.random.fork_rng(devices=[]):  # the loader reseeds torch's RNG per item in this process
        _, pixels, errors = next(image_loader([paths[i] for i in idx.tolist()], transform, size, len(idx), 0, seed))
    return pixels, np.array([not e for e in errors])


def finetune(cfg: FinetuneConfig, model: OpenClipEncoder) -> dict:
    """Fine-tunes `model` in place; returns the summary written next to the checkpoints."""
    seed_everything(cfg.seed)
    device = torch.device(cfg.device)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    source = {"model": cfg.model, "finetune": cfg.finetune}
    model.tuned(cfg.finetune)
    tr = load_caption_dataset(cfg.data, cfg.train_split)
    dev = load_caption_dataset(cfg.data, cfg.dev_split)
    center, train_tf = _transforms(model, cfg)
    paths = [str(p) for p in tr.image_paths()]
    views = None
    if cfg.finetune == "lit":
        model.net.lock_image_tower(unlocked_groups=0, freeze_bn_stats=True)
        per_view, bad = [], {}
        for v in range(cfg.views):
            vecs, bad_v = _encode_split(
                model,
                tr,
                train_tf if v else center,
                cfg,
                cfg.seed * 1000 + v,
                f"train images, view {v + 1}/{cfg.views}",
            )
            per_view.append(vecs)
            bad.update(bad_v)
    else:
        bad = {}
    keep = np.array([i not in bad for i in range(len(paths))])
    tr = tr.drop_images(bad)
    paths = [p for p, k in zip(paths, keep) if k]
    if cfg.finetune == "lit":
        views = torch.stack([v[torch.from_numpy(keep)] for v in per_view]).to(device)  # (V, N, D)
    loss_fn, _ = make_loss("clip")
    params = [p for p in model.net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(decay_groups(params, cfg.weight_decay), lr=cfg.lr)
    n_img = len(paths)
    steps_per_epoch = math.ceil(n_img / cfg.batch_size)
    sched = warmup_cosine(opt, cfg.epochs * steps_per_epoch, int(cfg.warmup_epochs * steps_per_epoch))
    caps = captions_of(tr.caption_image, n_img)
    data_info = {
        "path": str(Path(cfg.data).resolve()),
        "train_split": cfg.train_split,
        "dev_split": cfg.dev_split,
        "train_images": n_img,
        "train_captions": len(tr.captions),
        "source": source,
        "skipped": len(bad) + len(dev.skipped),
    }
    run = Run(out, model, opt, sched, data_info, asdict(cfg), t0)
    if cfg.resume:
        run.resume()
    size = input_size(model, center)
    with meter(cfg.epochs, "epochs", "epoch", initial=run.start_epoch) as bar:
        for epoch in range(run.start_epoch, cfg.epochs):
            model.net.train()
            if cfg.finetune == "lit":
                model.net.visual.eval()  # locked: its norms and dropout stay in inference mode
            losses = []
            for b, (idx, view, cap) in enumerate(epoch_batches(n_img, cfg.views, caps, cfg.batch_size)):
                ids = model.tokenizer([tr.captions[i] for i in cap.tolist()]).to(device)
                if views is not None:
                    zi, ok = views[view, idx], np.ones(len(idx), bool)
                else:
                    pixels, ok = _batch_pixels(paths, idx, train_tf, size, cfg.seed + 7919 * epoch + b)
                    zi = F.normalize(model.net.encode_image(pixels[ok].to(device)), dim=-1)
                zt = F.normalize(model.net.encode_text(ids[torch.from_numpy(ok).to(device)]), dim=-1)
                loss = loss_fn(zi, zt, model.net.logit_scale.exp())
                optimizer_step(model.net, loss, opt, sched, cfg.max_logit_scale)
                losses.append(loss.item())
            metrics = dev_metrics(model, dev, cfg)
            scale = model.net.logit_scale.exp().item()
            bar.set_postfix(**run.end_epoch(epoch, losses, metrics, metrics["R@1_mean"], scale))
            bar.update(1)
    return run.finish(run.load_best())
