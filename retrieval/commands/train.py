"""`retrieval train`: contrastive training of the projection heads on a caption dataset."""

from __future__ import annotations

import argparse
import dataclasses
import json

from retrieval.errors import ConfigError
from retrieval.flags import add_dataclass_arguments, dataclass_from_args
from retrieval.training.finetune import MODES, FinetuneConfig
from retrieval.training.train import TrainConfig

TRAIN_HELP = {
    "data": "caption-dataset folder (images/, captions.csv, splits/) such as ../shared/datasets/flickr8k",
    "model": "registered model name to train (its towers and head shape), a checkpoint to continue from, or "
    "open_clip:ARCH[@PRETRAINED] to fine-tune an open_clip model (see --finetune)",
    "out": "output folder for model.safetensors (the trained model), best.safetensors, last.safetensors and "
    "summary.json",
    "cache_dir": "where frozen-tower features are cached (reused across runs)",
    "views": "image views cached per training image: 1 center crop + (views-1) random crops",
    "crop_scale_min": "smallest area fraction of a random crop",
    "epochs": "passes over the training images (each pairs an image with one random caption)",
    "batch_size": "pairs per contrastive batch",
    "lr": "peak AdamW learning rate (warmup, then cosine decay)",
    "weight_decay": "AdamW weight decay on matrices",
    "warmup_epochs": "linear warmup length in epochs",
    "loss": "clip (symmetric InfoNCE), siglip, or vsepp (VSE++'s hinge on the hardest negative, margin 0.2)",
    "max_logit_scale": "clamp of the learnable inverse temperature exp(t)",
    "center": "subtract each modality's training mean before normalizing (modality-gap correction)",
    "querybank_size": "training queries per modality kept in the model for the inverted softmax, a query-time "
    "correction of hubness whose beta is chosen on dev (0: none)",
    "seed": "random seed (crops, batches, init)",
    "workers": "image-decoding worker processes (default: cores - 1, at most 4; none on 2 cores or fewer)",
    "resume": "continue from OUT/last.safetensors when present",
    "train_split": "split to train on",
    "dev_split": "split for model selection",
}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train the projection heads on a caption dataset",
        description="Contrastive training of the heads on cached frozen-tower features.",
    )
    add_dataclass_arguments(p, TrainConfig, TRAIN_HELP)
    g = p.add_argument_group("open_clip fine-tuning (with --model open_clip:ARCH[@PRETRAINED])")
    g.add_argument(
        "--finetune",
        choices=MODES,
        default="lit",
        help="lit: lock the image tower, tune the text tower; full: tune every weight",
    )
    g.add_argument("--device", default="cpu", help="torch device to fine-tune on (cpu, cuda, cuda:1)")
    p.set_defaults(func=run)


def finetune_config(args: argparse.Namespace) -> FinetuneConfig:
    """The fine-tuning config the flags describe. A shared flag left at the head trainer's default
    takes fine-tuning's own default (e.g. --lr 1e-5, not 2e-3; --epochs 5, not 60)."""
    heads = dataclass_from_args(TrainConfig, args)
    head_defaults = TrainConfig(data="")
    shared = {f.name for f in dataclasses.fields(FinetuneConfig)} & {f.name for f in dataclasses.fields(TrainConfig)}
    ignored = [
        f"--{f.name.replace('_', '-')}"
        for f in dataclasses.fields(TrainConfig)
        if f.name not in shared and getattr(heads, f.name) != getattr(head_defaults, f.name)
    ]
    if ignored:  # e.g. --loss: fine-tuning trains with CLIP's loss, so a silent ignore would mislead
        raise ConfigError(f"{', '.join(ignored)}: head training only, not open_clip fine-tuning")
    values = {k: getattr(heads, k) for k in shared if getattr(heads, k) != getattr(head_defaults, k)}
    return FinetuneConfig(
        **{**values, "data": heads.data, "model": heads.model, "finetune": args.finetune, "device": args.device}
    )


def run(args: argparse.Namespace) -> int:
    from retrieval.embedding.factory import create_model
    from retrieval.training.train import train

    if args.model.startswith("open_clip:"):
        from retrieval.training.finetune import finetune

        ft = finetune_config(args)
        model, _, _ = create_model(ft.model, device=ft.device)
        summary = finetune(ft, model)
    else:
        cfg = dataclass_from_args(TrainConfig, args)
        model, _, _ = create_model(cfg.model, load_weights=False)
        summary = train(cfg, model)
    print(json.dumps({k: v for k, v in summary.items() if k != "history"}, indent=2))
    return 0
