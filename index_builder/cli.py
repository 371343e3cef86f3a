"""`index-builder`: build a new index version from images and captions, list the versions under
an index root, or garbage-collect old ones. `index-builder COMMAND --help` explains each.

    index-builder build --out indexes --dataset ../shared/datasets/flickr8k
    index-builder build --out indexes --images photos/ --captions captions.jsonl --incremental
    index-builder list indexes
    index-builder gc indexes --keep 2
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Sequence

from retrieval.flags import add_dataclass_arguments, dataclass_from_args, run_command

BUILD_HELP = {
    "out": "index root: versions go to OUT/vNNNN, OUT/CURRENT names the live one",
    "images": "folder of images, searched recursively (JPEG, PNG, WebP, GIF first frame, BMP)",
    "captions": "captions file: CSV/TSV with a header or JSONL; columns text|caption, optional image, optional id",
    "dataset": "caption-dataset folder (images/, captions.csv, splits/) such as ../shared/datasets/flickr8k",
    "split": "with --dataset: index only this split's images; all images when absent",
    "model": "registered model name or checkpoint path (what `retrieval` create_model accepts)",
    "index_factory": "FAISS factory string for both indexes, e.g. Flat, HNSW32,Flat, IVF1024,Flat "
                     "(when absent: Flat up to 100k vectors, then HNSW, then IVF)",
    "incremental": "encode only new or changed items on top of the current version, drop deleted ones",
    "keep": "versions to keep after publishing (the current one is never removed)",
    "shard_size": "encoded vectors per resumable shard in the work directory",
    "batch_size": "images per forward pass",
    "text_batch_size": "captions per forward pass",
    "workers": "DataLoader worker processes that decode and preprocess images beside the encoder; with 0, "
               "two encoder threads (when torch has 2 or more) take turns, one decoding its next batch while "
               "the other runs the model. When absent: cores - 1, at most 4, and 0 on 2 cores or fewer "
               "(faster there than a worker contending with the encoder's threads)",
    "recall_queries": "held-out queries for measuring recall@10 against exact search",
    "progress": "show progress bars",
}


RAY_HELP = ("encode on a Ray cluster (pip install '.[ray]'), run on one of its nodes: ADDRESS 'auto' (RAY_ADDRESS "
            "or the cluster this machine belongs to) or the head's host:port; without ADDRESS a local Ray instance "
            "started here. The index root, images and a --model checkpoint must be on a filesystem every node shares")


def _setup_logging(quiet: bool, verbose: bool) -> None:
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("faiss").setLevel(max(level, logging.WARNING))  # per-block chatter of the contrib search


def format_summary(m: dict) -> str:
    r, c = m["report"], m["report"]["counts"]
    lines = [
        f"published {m['version']}: {m['num_images']} images, {m['num_texts']} captions, model {m['model']} "
        f"({m['fingerprint']}), dim {m['dim']}, in {m['build_seconds']:.1f}s",
        f"  index image {m['index_factory']['image']} (recall@10 {m['recall_at_10']['image']}), "
        f"text {m['index_factory']['text']} (recall@10 {m['recall_at_10']['text']})",
        f"  encoded {c['images_encoded']} images ({r['encode']['images_per_second']:.1f}/s), "
        f"{c['texts_encoded']} captions ({r['encode']['captions_per_second']:.1f}/s); "
        f"resumed {c['images_resumed']}+{c['texts_resumed']}, reused {c['images_reused']}+{c['texts_reused']}",
        f"  skipped {len(r['skipped'])} item(s)",
    ]
    lines += [f"    {s['item']}: {s['reason']}" for s in r["skipped"][:50]]
    if len(r["skipped"]) > 50:
        lines.append(f"    ... {len(r['skipped']) - 50} more in {m['version']}/manifest.json")
    return "\n".join(lines)


def cmd_build(args: argparse.Namespace) -> int:
    from index_builder.build import BuildConfig, build

    manifest = build(dataclass_from_args(BuildConfig, args))
    print(json.dumps(manifest, indent=2) if args.json else format_summary(manifest))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from index_builder.publish import list_index, work_dirs

    rows = [v.row() for v in list_index(args.root)]
    if args.json:
        print(json.dumps({"versions": rows, "work_dirs": work_dirs(args.root)}, indent=2))
        return 0
    if not rows:
        print(f"no versions under {args.root}")
    for row in rows:
        print(f"{'*' if row['current'] else ' '} {row['version']}  {row['created_at']}  {row['model']}  "
              f"images {row['num_images']}  texts {row['num_texts']}  "
              + " ".join(f"{k}:{v}" for k, v in (row["index_factory"] or {}).items())
              + (f"  (incremental from {row['incremental_from']})" if row["incremental_from"] else ""))
    for name in work_dirs(args.root):
        print(f"  {name}: encoded shards of an unfinished build (a rerun resumes from them)")
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    from index_builder.publish import gc

    result = gc(args.root, args.keep, work=args.work)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"removed {len(result['removed_versions'])} version(s) {result['removed_versions']} and "
              f"{len(result['removed_dirs'])} leftover dir(s); kept {result['versions']}, CURRENT {result['current']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from index_builder.build import BuildConfig

    parser = argparse.ArgumentParser(prog="index-builder", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("build", help="build and publish a new index version", conflict_handler="resolve",
                       description="Encode images and captions, build FAISS indexes, publish a version atomically.")
    add_dataclass_arguments(p, BuildConfig, BUILD_HELP)
    # replaces the generated --ray: its value is optional (conflict_handler="resolve")
    p.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS", help=RAY_HELP)
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("list", help="list the versions under an index root")
    p.add_argument("root", help="index root")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("gc", help="remove old versions (never the current one) and leftovers of killed builds")
    p.add_argument("root", help="index root")
    p.add_argument("--keep", type=int, required=True, help="newest versions to keep")
    p.add_argument("--work", action="store_true", help="also remove encoded shards of unfinished builds")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_gc)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # hub look-ups retry for minutes without network
    args = build_parser().parse_args(argv)
    _setup_logging(args.quiet, args.verbose)
    return run_command("index-builder", args, " (a rerun resumes from the encoded shards)")

if __name__ == "__main__":
    sys.exit(main())
