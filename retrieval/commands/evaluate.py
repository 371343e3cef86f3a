"""`retrieval eval`: recall@K both ways and the sphere's geometry of a model on a caption dataset split."""

from __future__ import annotations

import argparse
import json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="recall@K and sphere geometry on a caption dataset split",
        description="The 1K-test protocol: R@1/5/10 both ways, alignment, uniformity, modality gap.",
    )
    p.add_argument(
        "--model", default="lite0-minilm", help="registered name, checkpoint path or open_clip:ARCH[@PRETRAINED]"
    )
    p.add_argument("--data", required=True, help="caption-dataset folder")
    p.add_argument("--split", default="test", help="split to evaluate (default: %(default)s)")
    p.add_argument("--workers", type=int, default=None, help="image-decoding workers")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from retrieval.embedding.factory import create_model
    from retrieval.training.evaluate import evaluate_model, format_report

    model, preprocess, tokenizer = create_model(args.model)
    result = evaluate_model(
        model, preprocess, tokenizer, args.data, args.split, workers=args.workers, progress=not args.json
    )
    print(json.dumps(result, indent=2) if args.json else format_report(result))
    return 0
