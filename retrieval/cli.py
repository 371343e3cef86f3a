"""`retrieval`: train the heads, evaluate on a caption dataset, serve the index over gRPC,
query a server, or run the self-contained demo. `retrieval SUBCOMMAND --help` explains each."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Sequence

from retrieval.flags import add_dataclass_arguments, dataclass_from_args, run_command

TRAIN_HELP = {
    "data": "caption-dataset folder (images/, captions.csv, splits/) such as ../shared/datasets/flickr8k",
    "model": "registered model name to train (its towers and head shape) or a checkpoint to continue from",
    "out": "output folder for best.pt, last.pt and summary.json",
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
    "resume": "continue from OUT/last.pt when present",
    "train_split": "split to train on",
    "dev_split": "split for model selection",
}


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def cmd_train(args: argparse.Namespace) -> int:
    from retrieval.embedding.factory import create_model
    from retrieval.training.train import TrainConfig, train

    cfg = dataclass_from_args(TrainConfig, args)
    model, _, _ = create_model(cfg.model, load_weights=False)
    summary = train(cfg, model)
    print(json.dumps({k: v for k, v in summary.items() if k != "history"}, indent=2))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from retrieval.training.evaluate import evaluate_model, format_report
    from retrieval.embedding.factory import create_model

    model, preprocess, tokenizer = create_model(args.model)
    result = evaluate_model(model, preprocess, tokenizer, args.data, args.split, workers=args.workers,
                            progress=not args.json)
    print(json.dumps(result, indent=2) if args.json else format_report(result))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="retrieval", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress at INFO level")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train the projection heads on a caption dataset",
                       description="Contrastive training of the heads on cached frozen-tower features.")
    add_dataclass_arguments(p, __import__("retrieval.training.train", fromlist=["TrainConfig"]).TrainConfig, TRAIN_HELP)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="recall@K and sphere geometry on a caption dataset split",
                       description="The 1K-test protocol: R@1/5/10 both ways, alignment, uniformity, modality gap.")
    p.add_argument("--model", default="lite0-minilm", help="registered name, checkpoint path or open_clip:ARCH[@PRETRAINED]")
    p.add_argument("--data", required=True, help="caption-dataset folder")
    p.add_argument("--split", default="test", help="split to evaluate (default: %(default)s)")
    p.add_argument("--workers", type=int, default=None, help="image-decoding workers")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_eval)

    from retrieval.commands import demo, query, serve

    serve.add_parser(sub)
    query.add_parser(sub)
    demo.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # Offline by default: hub look-ups retry for a long time without network. Set HF_HUB_OFFLINE=0 to allow them.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    return run_command("retrieval", args)

if __name__ == "__main__":
    sys.exit(main())
