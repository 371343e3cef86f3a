"""`index-builder`: build a new index version from images and captions, list the versions under
an index root, or garbage-collect old ones. `index-builder COMMAND --help` explains each.

    index-builder build --out indexes --dataset ../shared/datasets/flickr8k
    index-builder build --out indexes --images photos/ --captions captions.jsonl --incremental
    index-builder list indexes
    index-builder gc indexes --keep 2
    index-builder audit indexes                  # near duplicates, mismatched captions, outliers
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence

from retrieval.flags import add_dataclass_arguments, dataclass_from_args, run_command

BUILD_HELP = {
    "out": "index root: versions go to OUT/vNNNN, OUT/CURRENT names the live one",
    "images": "folder of images, searched recursively (JPEG, PNG, WebP, GIF first frame, BMP)",
    "captions": "captions file: CSV/TSV with a header or JSONL; columns text|caption, optional image, optional id",
    "attributes": "per-image attributes file (CSV/TSV or JSONL): an image column (its path as the collection names "
    "it) and attribute columns a search may filter on; the captions file's extra columns are "
    "attributes too (README: Filters)",
    "dataset": "caption-dataset folder (images/, captions.csv, splits/) such as ../shared/datasets/flickr8k",
    "split": "with --dataset: index only this split's images; all images when absent",
    "uri_prefix": "what results call an image: this prefix + its path relative to the image folder (the "
    "dataset's images/, or the captions file's folder), e.g. https://cdn.example/photos/",
    "model": "registered model name or checkpoint path (what `retrieval` create_model accepts)",
    "index_factory": "FAISS factory string for both indexes, e.g. Flat, HNSW32,Flat, IVF1024,Flat "
    "(when absent: Flat up to 100k vectors, then HNSW, then IVF)",
    "on_disk": "build IVF indexes in blocks merged on disk (images.ivfdata beside images.faiss) and serve them "
    "memory-mapped; automatic above 2M items. Without --index-factory, picks IVF at any size",
    "incremental": "encode only new or changed items on top of the current version, drop deleted ones; "
    "when nothing changed, publish nothing",
    "keep": "versions to keep after publishing (the current one is never removed)",
    "shard_size": "encoded vectors per resumable shard in the work directory",
    "batch_size": "images per forward pass",
    "text_batch_size": "captions per forward pass",
    "workers": "DataLoader worker processes that decode and preprocess images beside the encoder; with 0, "
    "two encoder threads (when torch has 2 or more) take turns, one decoding its next batch while "
    "the other runs the model. When absent: cores - 1, at most 4, and 0 on 2 cores or fewer "
    "(faster there than a worker contending with the encoder's threads)",
    "recall_queries": "held-out queries for measuring recall@10 against exact search",
    "progress": "show progress: a bar on a terminal, else a log line (count, rate, ETA) every 10 s",
}


RAY_HELP = (
    "encode on a Ray cluster (pip install '.[ray]'), run on one of its nodes: ADDRESS 'auto' (RAY_ADDRESS "
    "or the cluster this machine belongs to) or the head's host:port; without ADDRESS a local Ray instance "
    "started here. The index root, images and a --model checkpoint must be on a filesystem every node shares"
)


def _setup_logging(quiet: bool, verbose: bool) -> None:
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("faiss").setLevel(max(level, logging.WARNING))  # per-block chatter of the contrib search


def format_summary(m: dict) -> str:
    if m.get("up_to_date"):
        return (
            f"the index is up to date: {m['version']} already holds these {m['num_images']} images and "
            f"{m['num_texts']} captions; nothing published"
        )
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
    from retrieval.progress import quiet_library_progress_bars

    quiet_library_progress_bars()  # transformers' 'Loading weights' frames: the build's own meters say enough

    manifest = build(dataclass_from_args(BuildConfig, args))
    print(json.dumps(manifest, indent=2) if args.json else format_summary(manifest))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from index_builder.publish import incomplete_dirs, list_index, work_dirs

    rows = [v.row() for v in list_index(args.root)]
    if args.json:
        print(
            json.dumps(
                {"versions": rows, "work_dirs": work_dirs(args.root), "incomplete_dirs": incomplete_dirs(args.root)},
                indent=2,
            )
        )
        return 0
    if not rows:
        print(f"no versions under {args.root}")
    for row in rows:
        print(
            f"{'*' if row['current'] else ' '} {row['version']}  {row['created_at']}  {row['model']}  "
            f"images {row['num_images']}  texts {row['num_texts']}  "
            + " ".join(f"{k}:{v}" for k, v in (row["index_factory"] or {}).items())
            + (f"  (incremental from {row['incremental_from']})" if row["incremental_from"] else "")
        )
    for name in work_dirs(args.root):
        print(f"  {name}: encoded shards of an unfinished build (a rerun resumes from them)")
    for name in incomplete_dirs(args.root):
        print(f"  {name}: not a version (no manifest.json; not made by index-builder)")
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    from index_builder.publish import gc

    result = gc(args.root, args.keep, work=args.work)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(
            f"removed {len(result['removed_versions'])} version(s) {result['removed_versions']} and "
            f"{len(result['removed_dirs'])} leftover dir(s); kept {result['versions']}, CURRENT {result['current']}"
        )
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    from pathlib import Path

    from index_builder.audit import AuditConfig, audit, render
    from retrieval.store.reader import IndexVersion

    cfg = AuditConfig(near_duplicate_angle=args.near_duplicate_angle)
    cfg.validate()
    version = IndexVersion.open(args.root, args.version)
    try:
        report = audit(version, cfg)
    finally:
        version.close()
    # a version is immutable and checksummed: its audit goes beside it, under ROOT/audits/
    default = Path(args.root) / "audits" / report["version"]
    json_path = Path(args.json) if args.json else default.with_suffix(".json")
    report_path = Path(args.report) if args.report else default.with_suffix(".md")
    for path, text in ((json_path, json.dumps(report, indent=2) + "\n"), (report_path, render(report))):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    c = report["counts"]
    print(
        f"audited {report['version']}: {c['near_duplicate_groups']} near-duplicate group(s), "
        f"{c['mismatched_captions']} mismatched caption(s), {c['outlier_images']} outlier image(s); "
        f"evidence in {json_path}, report in {report_path}"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    from index_builder.build import BuildConfig

    parser = argparse.ArgumentParser(
        prog="index-builder", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "build",
        help="build and publish a new index version",
        conflict_handler="resolve",
        description="Encode images and captions, build FAISS indexes, publish a version atomically.",
    )
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

    from index_builder.audit import DEFAULT_NEAR_DUPLICATE_ANGLE

    p = sub.add_parser(
        "audit",
        help="flag near-duplicate images, captions that do not fit their image and outlier "
        "images of a published version, with the evidence",
    )
    p.add_argument("root", help="index root")
    p.add_argument("--version", help="version to audit (default: the current one)")
    p.add_argument(
        "--near-duplicate-angle",
        type=float,
        default=DEFAULT_NEAR_DUPLICATE_ANGLE,
        metavar="DEG",
        help="images within this angle of each other are near duplicates (default: %(default)s, measured "
        "on Flickr8k: bench/results/audit.md)",
    )
    p.add_argument("--json", metavar="FILE", help="where the JSON evidence goes (default: ROOT/audits/VERSION.json)")
    p.add_argument("--report", metavar="FILE", help="where the readable report goes (default: ROOT/audits/VERSION.md)")
    p.set_defaults(func=cmd_audit)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # hub look-ups retry for minutes without network
    args = build_parser().parse_args(argv)
    _setup_logging(args.quiet, args.verbose)
    return run_command("index-builder", args, " (a rerun resumes from the encoded shards)")


if __name__ == "__main__":
    sys.exit(main())
