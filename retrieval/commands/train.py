"""`retrieval train`: contrastive training of the projection heads on a caption dataset."""
from __future__ import annotations

import argparse
import json

from retrieval.flags import add_dataclass_arguments, dataclass_from_args
from retrieval.training.train import TrainConfig

TRAIN_HELP = {
    "data": "caption-dataset folder (images/, captions.csv, splits/) such as ../shared/datasets/flickr8k",
    "model": "registered model name to train (its towers and head shape) or a checkpoint to continue from",
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
    "loss": "clip (symmetric InfoNCE) or siglip",
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
    p = sub.add_parser("train", help="train the projection heads on a caption dataset",
                       description="Contrastive training of the heads on cached frozen-tower features.")
    add_dataclass_arguments(p, TrainConfig, TRAIN_HELP)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from retrieval.embedding.factory import create_model
    from retrieval.training.train import train

    cfg = dataclass_from_args(TrainConfig, args)
    model, _, _ = create_model(cfg.model, load_weights=False)
    summary = train(cfg, model)
    print(json.dumps({k: v for k, v in summary.items() if k != "history"}, indent=2))
    return 0
