"""`retrieval calibrate`: fit a model's match-probability calibrators on a caption-dataset split and
write the model with them (`retrieval.training.calibration`). `retrieval train` fits them itself;
this is for a model trained before, or on another collection's held-out captions."""

from __future__ import annotations

import argparse
import json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "calibrate",
        help="fit a model's match probabilities on held-out captions",
        description="Fits the text->image and image->text calibrators on a split's pairs and writes "
        "the model (heads and banks unchanged) with them to OUT.",
    )
    p.add_argument("--model", default="lite0-minilm", help="registered name or checkpoint path")
    p.add_argument("--data", required=True, help="caption-dataset folder")
    p.add_argument(
        "--split",
        default="dev",
        help="held-out split to fit on (never the test split you report on; default: %(default)s)",
    )
    p.add_argument("--out", required=True, help="the calibrated checkpoint to write (.safetensors)")
    p.add_argument("--cache-dir", default=".feature-cache", help="frozen-tower feature cache (as train's)")
    p.add_argument("--workers", type=int, default=None, help="image-decoding workers")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from retrieval.embedding.checkpoint import load_checkpoint, save_checkpoint
    from retrieval.embedding.factory import create_model, get_model_config, shipped_weights_path
    from retrieval.errors import ModelError
    from retrieval.training.train import TrainConfig, calibrate_on, split_features

    if args.model.startswith("open_clip:"):
        raise ModelError(
            "retrieval calibrate takes a registered model or a checkpoint of this project; open_clip "
            "models have no checkpoint to carry the calibration"
        )
    source = Path(args.model) if Path(args.model).is_file() else shipped_weights_path(get_model_config(args.model))
    document = load_checkpoint(source) if source is not None else {}
    model, _, _ = create_model(args.model)
    trained = document.get("train_config") or {}
    cfg = TrainConfig(
        data=args.data,
        model=args.model,
        cache_dir=args.cache_dir,
        workers=args.workers,
        seed=int(trained.get("seed", 0)),
    )
    report = calibrate_on(model, split_features(model, args.split, cfg, 1), args.split)
    # the source's records in train's order, the calibration's report added to its metrics: a model
    # trained by `retrieval train` and calibrated here on its dev split is the file train writes
    extras = {"data": document["data"]} if "data" in document else {}
    extras["metrics"] = {**(document.get("metrics") or {}), "calibration": report}
    if trained:
        extras["train_config"] = trained
    save_checkpoint(args.out, model, compact=True, **extras)
    print(json.dumps({"out": args.out, "fingerprint": model.fingerprint(), "calibration": report}, indent=2))
    return 0
