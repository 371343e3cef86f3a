"""Builder encode throughput against the raw model forward pass, on the same batches, in one run.

    python bench/bench_builder.py                       # 1,024 Flickr8k images, 2,560 captions, 5 repeats
    python bench/bench_builder.py --full                # plus one full Flickr8k build and the eval check

`builder`: the builder's own encode stage (`index_builder.encode.encode_images/encode_texts`:
a DataLoader decodes images in worker processes while the main process runs the model or, on
2 cores or fewer, two encoder streams each decode a batch and run the model on it; captions are
tokenized batch by batch, in two streams there too; vectors go to shards on disk). Both are also
timed in one stream, decoding or tokenizing between forward passes (the builder before streams).
`raw`: the model's `encode_image`/`encode_text` alone on the very same batches, decoded and
tokenized beforehand and held in memory; both one batch at a time on all of torch's threads
(the goal's yardstick) and, stricter, in two streams of one thread. Each is timed
`--repeats` times, alternating, and the median is reported; the goal is builder/raw >= 0.9.

`--full` builds all of Flickr8k (`index-builder build --dataset DIR`, no split) into a temporary
root, records time and counts, then checks the index against the model on the test split
(`index_builder.verify.index_recall`) and against `retrieval eval --json` run as a subprocess.
Results go to bench/results/builder.json (sections updated in place) and builder.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from index_builder.encode import ShardStore, encode_images, encode_texts, text_batches  # noqa: E402
from index_builder.sources import from_dataset  # noqa: E402
from retrieval.embedding.factory import create_model  # noqa: E402
from retrieval.encoding.bulk import IMAGE_BATCH, default_streams, default_workers, image_loader  # noqa: E402
from retrieval.encoding.streams import threaded_map  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "datasets" / "flickr8k"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="caption-dataset folder (default: %(default)s)")
    p.add_argument("--model", default="lite0-minilm")
    p.add_argument("--images", type=int, default=1024, help="images in the throughput subset")
    p.add_argument("--captions", type=int, default=2560, help="captions in the throughput subset")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument(
        "--batch-size",
        type=int,
        default=IMAGE_BATCH,
        help="images per forward pass (default: the builder's, %(default)s)",
    )
    p.add_argument("--text-batch-size", type=int, default=256)
    p.add_argument(
        "--workers", type=int, default=None, help="image-decoding DataLoader workers (default: the builder's default)"
    )
    p.add_argument("--full", action="store_true", help="also build all of Flickr8k once and check it against eval")
    p.add_argument("--skip-throughput", action="store_true", help="only the --full part")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    return p.parse_args(argv)


def machine() -> dict:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": list(os.getloadavg()),
        "platform": platform.platform(),
    }


def throughput(args, loaded) -> dict:
    model, preprocess, tokenizer = loaded
    workers = default_workers() if args.workers is None else args.workers
    coll = from_dataset(args.data, None, progress=False)
    images = coll.images[: args.images]
    keys = {it.key for it in images}
    texts = [t for t in coll.texts if t.image_key in keys][: args.captions]
    img_todo = [(it.sha256, it.path) for it in images]
    txt_todo = [(t.sha256 + f"-{i}", t.caption) for i, t in enumerate(texts)]  # every caption encoded, duplicates too

    # the raw side's inputs: the builder's batches, decoded / tokenized once, held in memory
    size = model.image_tower.image_size
    pixel_batches = [
        px for _, px, _ in image_loader([p for _, p in img_todo], preprocess, size, args.batch_size, workers)
    ]
    order = sorted(range(len(txt_todo)), key=lambda i: len(txt_todo[i][1]))
    token_batches = [ids for _, ids in text_batches([txt_todo[i][1] for i in order], tokenizer, args.text_batch_size)]

    def raw_images(streams: int) -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            for _ in threaded_map(pixel_batches, model.encode_image, streams):
                pass
        return len(img_todo) / (time.perf_counter() - start)

    def raw_texts(streams: int) -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            for _ in threaded_map(token_batches, model.encode_text, streams):
                pass
        return len(txt_todo) / (time.perf_counter() - start)

    def builder_images(streams: int | None) -> float:
        with tempfile.TemporaryDirectory() as d:
            stats = encode_images(
                model,
                preprocess,
                ShardStore(Path(d), model.embed_dim),
                img_todo,
                batch_size=args.batch_size,
                workers=workers,
                streams=streams,
                shard_size=4096,
                progress=False,
            )
        assert stats.items == len(img_todo)
        return stats.items / stats.seconds

    def builder_texts(streams: int | None) -> float:
        with tempfile.TemporaryDirectory() as d:
            stats = encode_texts(
                model,
                tokenizer,
                ShardStore(Path(d), model.embed_dim),
                txt_todo,
                batch_size=args.text_batch_size,
                streams=streams,
                shard_size=4096,
                progress=False,
            )
        assert stats.items == len(txt_todo)
        return stats.items / stats.seconds

    streams = default_streams(workers)
    variants = {
        "builder_images": lambda: builder_images(None),  # what the builder does by default
        "builder_images_1_stream": lambda: builder_images(1),  # decoding between passes in one stream
        "raw_images": lambda: raw_images(1),  # torch's threads on one forward pass
        "raw_images_2_streams": lambda: raw_images(2),  # two forward passes at once, a thread each
        "builder_texts": lambda: builder_texts(None),
        "builder_texts_1_stream": lambda: builder_texts(1),  # one batch at a time on all threads
        "raw_texts": lambda: raw_texts(1),
        "raw_texts_2_streams": lambda: raw_texts(2),
    }
    raw_images(1)  # warm-up (allocator, kernels)
    runs: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(args.repeats):
        for name, fn in variants.items():
            runs[name].append(round(fn(), 2))
            print(f"repeat {r + 1}/{args.repeats} {name}: {runs[name][-1]:.1f}/s", file=sys.stderr)
    med = {k: statistics.median(v) for k, v in runs.items()}

    def summary(builder: str, raw: str) -> dict:
        pairs = [round(b / r, 3) for b, r in zip(runs[builder], runs[raw])]
        return {
            "builder_run": builder,
            "raw_run": raw,
            "builder": med[builder],
            "raw": med[raw],
            "ratio": round(med[builder] / med[raw], 3),
            "paired_ratios": pairs,
            "paired_ratio_median": statistics.median(pairs),
        }

    return {
        "images": len(img_todo),
        "captions": len(txt_todo),
        "repeats": args.repeats,
        "workers": workers,
        "streams": streams,
        "text_streams": default_streams(0),
        "batch_size": args.batch_size,
        "text_batch_size": args.text_batch_size,
        "images_per_second": summary("builder_images", "raw_images"),
        "images_per_second_vs_raw_2_streams": summary("builder_images", "raw_images_2_streams"),
        "images_per_second_1_stream": summary("builder_images_1_stream", "raw_images"),
        "captions_per_second": summary("builder_texts", "raw_texts"),
        "captions_per_second_vs_raw_2_streams": summary("builder_texts", "raw_texts_2_streams"),
        "captions_per_second_1_stream": summary("builder_texts_1_stream", "raw_texts"),
        "medians": med,
        "runs": runs,
        "goal_ratio": 0.9,
    }


def full_build(args, loaded) -> dict:
    from index_builder.build import BuildConfig, build
    from index_builder.verify import index_recall

    with tempfile.TemporaryDirectory(prefix="bench-index-") as d:
        root = Path(d) / "index"
        started = time.perf_counter()
        m = build(
            BuildConfig(out=str(root), dataset=str(args.data), model=args.model, workers=args.workers), loaded=loaded
        )
        wall = time.perf_counter() - started
        check = index_recall(root, args.data, "test", loaded, workers=args.workers, progress=True)
        size = sum(p.stat().st_size for p in (root / m["version"]).iterdir())
    cmd = [
        sys.executable,
        "-m",
        "retrieval.cli",
        "eval",
        "--model",
        args.model,
        "--data",
        str(args.data),
        "--split",
        "test",
        "--json",
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    if proc.returncode != 0:
        raise SystemExit(f"retrieval eval failed: {proc.stderr[-2000:]}")
    evaluated = json.loads(proc.stdout)["recall"]
    diff = {k: round(check["index"][k] - evaluated[k], 4) for k in evaluated}
    return {
        "num_images": m["num_images"],
        "num_texts": m["num_texts"],
        "index_factory": m["index_factory"],
        "recall_at_10": m["recall_at_10"],
        "build_seconds": m["build_seconds"],
        "wall_seconds": round(wall, 1),
        "encode": m["report"]["encode"],
        "skipped": len(m["report"]["skipped"]),
        "version_bytes": size,
        "test_split_through_index": check["index"],
        "retrieval_eval": evaluated,
        "index_minus_eval": diff,
        "max_abs_diff": max(abs(v) for v in diff.values()),
        "eval_command": " ".join(shlex.quote(c) for c in cmd[1:]),
    }


def write_markdown(path: Path, result: dict) -> None:
    def run_line(section: dict) -> str:
        mach = section["machine"]
        return (
            f"`{section['command']}` on {section['date']}: {mach['cpus']} CPUs, torch {mach['torch']} with "
            f"{mach['torch_threads']} threads, load average at start {mach['load_average_at_start']} "
            "(the CPUs were shared with other work)."
        )

    lines = ["# Index builder benchmark", "", f"Model: {result['model']} ({result['fingerprint']})", ""]
    t = result.get("throughput")
    if t:
        lines += [
            "## Encode throughput: builder vs raw forward pass (same batches, same run)",
            "",
            run_line(t),
            "",
            f"{t['images']} Flickr8k images (batch {t['batch_size']}), {t['captions']} captions (batch {t['text_batch_size']}), "
            f"{t['workers']} DataLoader worker(s), median of {t['repeats']} alternating repeats.",
            "",
            "Raw: the model alone on the same batches, decoded beforehand, one forward pass at a time on all of "
            "torch's threads (`raw forward`, the goal's yardstick) and, as a stricter yardstick for the builder's "
            "streams, two forward passes at once on one thread each (`raw, 2 streams`).",
            "",
            "| builder | raw | builder (/s, median) | raw (/s, median) | ratio of medians | median of paired ratios | paired ratios |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        names = {
            "builder_images": f"images, {t['streams']} stream(s) (default)",
            "raw_images": "raw forward",
            "builder_images_1_stream": "images, 1 stream (decoding between passes)",
            "raw_images_2_streams": "raw, 2 streams",
            "builder_texts": f"captions, {t['text_streams']} stream(s) (default)",
            "builder_texts_1_stream": "captions, 1 stream (tokenizing between passes)",
            "raw_texts": "raw forward",
            "raw_texts_2_streams": "raw, 2 streams",
        }
        for key in (
            "images_per_second",
            "images_per_second_vs_raw_2_streams",
            "images_per_second_1_stream",
            "captions_per_second",
            "captions_per_second_vs_raw_2_streams",
            "captions_per_second_1_stream",
        ):
            x = t[key]
            lines.append(
                f"| {names[x['builder_run']]} | {names[x['raw_run']]} | {x['builder']:.1f} | {x['raw']:.1f} | "
                f"{x['ratio']:.3f} | {x['paired_ratio_median']:.3f} | {x['paired_ratios']} |"
            )
        lines += [
            "",
            f"Goal: builder / raw forward >= {t['goal_ratio']}. Each paired ratio is one builder run over the raw run "
            "of the same repeat; on a shared CPU the paired median is the steadier figure.",
            "",
        ]
    f = result.get("full_build")
    if f:
        lines += [
            "## Full Flickr8k build (`index-builder build --dataset ../shared/datasets/flickr8k`)",
            "",
            run_line(f),
            "",
            f"{f['num_images']} images, {f['num_texts']} captions, {f['skipped']} skipped; indexes {f['index_factory']}, "
            f"recall@10 vs exact {f['recall_at_10']}; {f['version_bytes'] / 1e6:.1f} MB on disk.  ",
            f"Build time {f['build_seconds']:.0f} s (images {f['encode']['images_per_second']:.1f}/s, "
            f"captions {f['encode']['captions_per_second']:.1f}/s, {f['encode']['workers']} worker(s)).",
            "",
            "Test split searched through the full exact index (restricted to the split's ids) vs "
            f"`{f['eval_command']}`:",
            "",
            "| | " + " | ".join(f["retrieval_eval"]) + " |",
            "| --- |" + " --- |" * len(f["retrieval_eval"]),
            "| index | " + " | ".join(f"{f['test_split_through_index'][k]:.2f}" for k in f["retrieval_eval"]) + " |",
            "| retrieval eval | " + " | ".join(f"{v:.2f}" for v in f["retrieval_eval"].values()) + " |",
            "",
            f"Largest difference: {f['max_abs_diff']:.3f} points (goal: within 0.1).",
            "",
        ]
    path.write_text("\n".join(lines))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not (args.data / "captions.csv").is_file():
        print(f"bench_builder: error: no caption dataset at {args.data}", file=sys.stderr)
        return 2
    loaded = create_model(args.model)
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.out / "builder.json"
    result = json.loads(json_path.read_text()) if json_path.is_file() else {}
    run = {
        "command": "python bench/bench_builder.py "
        + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
    }
    result.update(run, model=args.model, fingerprint=loaded[0].fingerprint())
    if not args.skip_throughput:
        result["throughput"] = {**throughput(args, loaded), **run}
    if args.full:
        result["full_build"] = {**full_build(args, loaded), **run}
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    write_markdown(args.out / "builder.md", result)
    print((args.out / "builder.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
