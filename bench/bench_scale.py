"""Index choices measured at millions of items, for the queries that matter (text->image across the
modality gap, image->image within a modality), plus metadata lookups at 10M rows.

    python bench/bench_scale.py choices --n 1000000                  # every index choice at 1M
    python bench/bench_scale.py choices --n 1000000 --only hnsw32 ivf4096
    python bench/bench_scale.py ondisk --n 10000000                  # IVF built in blocks, merged on disk, mmapped
    python bench/bench_scale.py memory-limited --n 10000000          # that index served inside a 1,000 MB cgroup (root)
    python bench/bench_scale.py metadata --rows 10000000             # SQLite id lookups, k = 10 and 1000
    python bench/bench_scale.py report                               # bench/results/scale.md from scale.json

Data (bench/scale_data.py): synthetic galleries sampled around the real Flickr8k image embeddings of
the shipped model with the real nearest-neighbour angles, each row [x, b_x] as the builder stores
it; queries are held out and real: test captions as [q, 1], test images as [q, 0]. Vectors,
galleries, ground truth and built indexes are cached under bench/.cache (git-ignored).

For each choice: build time (2 threads), bytes per vector on disk, serving RSS (a fresh process
opens the index as the server does and runs the timed queries; /proc/self/status), recall@10
against exact search for both query kinds (all queries), and QPS one query per call on one thread
(faiss.omp_set_num_threads(1)) over the first --qps-queries text queries, against exact search
(IndexFlatIP) timed in the same run. At 10M, exact search
is timed over the first 1M rows and scaled by 1/10 (brute force is linear in n). Exact search is
timed right beside each setting (the load of a shared machine drifts), on the first --exact-qps-queries.
Results are merged into bench/results/scale.json (each entry with the command that made it).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import faiss  # noqa: E402
import numpy as np  # noqa: E402
import scale_data  # noqa: E402
import scale_measure as measure  # noqa: E402

from index_builder import faiss_index, ivf_ondisk  # noqa: E402
from retrieval.store.layout import STORAGE_MEMORY, STORAGE_MMAP  # noqa: E402
from retrieval.store.reader import read_index_file  # noqa: E402

log = logging.getLogger("bench_scale")
RESULTS = REPO / "bench" / "results"
MB = 1 << 20
DEFAULT_DATA = REPO.parent / "shared" / "datasets" / "flickr8k"


@dataclass
class Choice:
    factory: str
    settings: list[dict]
    note: str = ""
    ef_construction: int | None = None
    text_train: bool = False  # train the IVF quantizer on image rows plus training captions
    on_disk: bool = False
    build: dict = field(default_factory=dict)


def _nprobe(*values: int, **extra) -> list[dict]:
    return [{"nprobe": v, **extra} for v in values]


CHOICES = {
    "flat": Choice("Flat", [{}], "exact search"),
    "hnsw32": Choice(
        "HNSW32,Flat",
        [{"efSearch": e} for e in (64, 128, 256, 512, 768)],
        "efConstruction 80 (the builder's default from 100k to 2M items before these numbers)",
    ),
    "hnsw32-efc200": Choice(
        "HNSW32,Flat", [{"efSearch": e} for e in (128, 256, 384, 512)], "efConstruction 200", ef_construction=200
    ),
    "hnsw64": Choice("HNSW64,Flat", [{"efSearch": e} for e in (128, 256, 384, 512)], "efConstruction 80"),
    "ivf4096": Choice(
        "IVF4096,Flat",
        _nprobe(16, 32, 48, 64, 96, 128),
        "quantizer trained on image rows; the builder's default at 1M (nprobe 32)",
    ),
    "ivf4096-text": Choice(
        "IVF4096,Flat",
        _nprobe(16, 32, 48, 64, 96, 128),
        "quantizer trained on image rows plus 35k training captions",
        text_train=True,
    ),
    "ivf4096-sq8-rflat": Choice(
        "IVF4096,SQ8,RFlat",
        _nprobe(32, 64, 96, 128, 192, k_factor=4),
        "8-bit scalar codes, exact re-rank of the top 40",
    ),
    "ivf1024-pq-rflat": Choice(
        "OPQ64_256,IVF1024,PQ64x4fs,RFlat",
        _nprobe(16, 32, 64, k_factor=10) + _nprobe(32, 64, k_factor=20),
        "4-bit fast-scan PQ (32 B/vector) after an OPQ rotation, exact re-rank",
    ),
    "ivf4096-ondisk": Choice(
        "IVF4096,Flat", _nprobe(16, 32, 64, 128), "built in blocks, merged on disk, memory-mapped", on_disk=True
    ),
}


def machine() -> dict:
    return {
        "python": platform.python_version(),
        "faiss": faiss.__version__,
        "cpus": os.cpu_count(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "platform": platform.platform(),
    }


# -- data -------------------------------------------------------------------------------------------


def load(args, n: int):
    real = scale_data.real_vectors(args.data)
    gallery = scale_data.make_gallery(real, n)
    queries = scale_data.queries(real, args.text_queries, args.image_queries)
    gt_path = scale_data.CACHE / f"gt-{n}-{args.text_queries}-{args.image_queries}.npz"
    if not gt_path.is_file():
        log.info("exact top-%d of %d queries over %d rows", measure.K, sum(map(len, queries.values())), n)
        start = time.perf_counter()
        out = {}
        for kind, rows in queries.items():
            out[f"{kind}_scores"], out[f"{kind}_ids"] = measure.ground_truth(rows, gallery.blocks())
        np.savez(gt_path, seconds=time.perf_counter() - start, **out)
    z = np.load(gt_path)
    exact = {kind: z[f"{kind}_ids"] for kind in queries}
    return real, gallery, queries, exact, z


def geometry(real, z) -> dict:
    """How the synthetic gallery compares with the real one, seen from the same queries."""
    seeds = real.seeds
    texts = real.text[real.text_split == "test"]
    real_t = np.max(texts @ seeds.T + real.bank.bias(seeds, "image")[None, :], axis=1)
    return {
        "seeds": len(seeds),
        "median_nn_angle_deg_seeds": round(float(np.degrees(np.median(scale_data.nn_angles(seeds)))), 2),
        "text_top1_score_real_seeds_median": round(float(np.median(real_t)), 4),
        "text_top1_score_synthetic_median": round(float(np.median(z["text_to_image_scores"][:, 0])), 4),
        "text_top10_score_synthetic_median": round(float(np.median(z["text_to_image_scores"][:, -1])), 4),
    }


# -- building ------------------------------------------------------------------------------------------


def text_train_rows(real) -> np.ndarray:
    """Training captions as rows shaped like the gallery's: [t, mean image bias]."""
    texts = real.text[real.text_split != "test"]
    bias = float(np.mean(real.bank.bias(real.seeds, "image")))
    return np.hstack([texts, np.full((len(texts), 1), bias, np.float32)]).astype(np.float32)


def build(name: str, choice: Choice, real, gallery, n: int) -> tuple[faiss.Index, dict]:
    """Build (or read back from the cache) one choice; returns the index and its build record."""
    dim = gallery.rows.shape[1]
    where = scale_data.CACHE / f"idx-{n}-{name}"
    record_path = where / "build.json"
    index_path = where / "images.faiss"
    storage = STORAGE_MMAP if choice.on_disk else STORAGE_MEMORY
    if not record_path.is_file():
        where.mkdir(parents=True, exist_ok=True)
        faiss.omp_set_num_threads(2)
        start = time.perf_counter()
        blocks = gallery.blocks
        if choice.on_disk:
            built = ivf_ondisk.build(blocks, n, dim, choice.factory, where, "images", where / "work")
            files, phases = built.files, built.seconds
            del built
        else:
            files, phases = ["images.faiss"], {}
            index = faiss_index.make_index(dim, choice.factory)
            if choice.ef_construction:
                faiss.downcast_index(index.index).hnsw.efConstruction = choice.ef_construction
            if not index.is_trained:
                sample = faiss_index.sample(blocks, n, faiss_index.train_rows(choice.factory, dim))
                if choice.text_train:
                    sample = np.vstack([sample, text_train_rows(real)])
                faiss_index.train(index, sample, choice.factory)
            for i, (ids, rows) in enumerate(blocks()):
                index.add_with_ids(rows, ids)
                if i % 16 == 0:
                    log.info("%s: %d / %d added (%.0fs)", name, ids[-1] + 1, n, time.perf_counter() - start)
            faiss.write_index(index, str(index_path))
            del index
        seconds = time.perf_counter() - start
        size = sum((where / f).stat().st_size for f in files)
        record = {
            "build_seconds": round(seconds, 1),
            "build_phases": phases,
            "files": {f: (where / f).stat().st_size for f in files},
            "bytes_per_vector": round(size / n, 1),
            "build_threads": 2,
        }
        record_path.write_text(json.dumps(record, indent=2))
    return read_index_file(index_path, storage), json.loads(record_path.read_text())


# -- measuring -----------------------------------------------------------------------------------------


def exact_index(gallery, limit: int) -> tuple[faiss.Index, float]:
    """IndexFlatIP over at most `limit` rows of the gallery, and the factor that scales its QPS to all
    n rows (brute force is linear in n)."""
    m = min(limit, gallery.n)
    flat = faiss.IndexFlatIP(gallery.rows.shape[1])
    for _, block in gallery.blocks():
        if flat.ntotal >= m:
            break
        flat.add(block[: m - flat.ntotal])
    return flat, m / gallery.n


def measure_choice(name: str, choice: Choice, args, real, gallery, queries, exact) -> dict:
    n = gallery.n
    index, record = build(name, choice, real, gallery, n)
    timed = queries["text_to_image"][: args.qps_queries]
    flat, scale = exact_index(gallery, args.exact_rows)
    rows = []
    for setting in choice.settings:
        measure.apply_setting(index, setting)
        faiss.omp_set_num_threads(2)
        found = {kind: index.search(q, measure.K)[1] for kind, q in queries.items()}
        rec = {kind: round(measure.recall(found[kind], exact[kind]), 4) for kind in queries}
        # exact search timed right beside each setting: on a shared machine the load drifts
        exact_q = measure.qps(flat, timed[: args.exact_qps_queries], repeats=2) * scale
        q = measure.qps(index, timed, repeats=2)
        rows.append(
            {
                "setting": setting,
                "recall_text_to_image": rec["text_to_image"],
                "recall_image_to_image": rec["image_to_image"],
                "qps": round(q, 1),
                "exact_qps": round(exact_q, 2),
                "qps_vs_exact": round(q / exact_q, 1),
            }
        )
        log.info(
            "%s %s: recall t2i %.4f i2i %.4f, %.1f q/s, %.1fx exact",
            name,
            setting,
            rec["text_to_image"],
            rec["image_to_image"],
            q,
            q / exact_q,
        )
    del index, flat
    where = scale_data.CACHE / f"idx-{n}-{name}"
    np.save(where / "rss_queries.npy", timed)
    mid = choice.settings[len(choice.settings) // 2]
    rss = measure.serving_rss(
        where / "images.faiss", STORAGE_MMAP if choice.on_disk else STORAGE_MEMORY, where / "rss_queries.npy", mid
    )
    size = sum(record["files"].values())
    growth = rss["after_queries"]["VmRSS"] - rss["before_open"]["VmRSS"]
    return {
        "factory": choice.factory,
        "note": choice.note,
        "storage": "mmap" if choice.on_disk else "memory",
        **record,
        "index_bytes": size,
        "exact_rows_timed": int(scale * n),
        "settings": rows,
        "rss": {**rss, "setting": mid, "growth_bytes": growth, "growth_over_index": round(growth / size, 4)},
    }


def run_choices(args, names: list[str]) -> dict:
    real, gallery, queries, exact, z = load(args, args.n)
    out = {
        "gallery": {
            "n": args.n,
            "text_queries": len(queries["text_to_image"]),
            "image_queries": len(queries["image_to_image"]),
            **geometry(real, z),
        },
        "choices": {},
    }
    for name in names:
        out["choices"][name] = {
            **measure_choice(name, CHOICES[name], args, real, gallery, queries, exact),
            **stamp(args),
        }
        save(args, {f"choices-{args.n}": out}, merge_key="choices")
    return out


# -- serving under a memory limit --------------------------------------------------------------------


def memory_cgroup(name: str, limit_bytes: int) -> Path:
    """A child of this process's memory cgroup (v1 or v2) limited to `limit_bytes`; needs root."""
    lines = Path("/proc/self/cgroup").read_text().splitlines()
    v1 = next((line.split(":", 2)[2] for line in lines if line.split(":")[1] == "memory"), None)
    if v1 is not None:
        group, limit_file = Path("/sys/fs/cgroup/memory") / v1.lstrip("/") / name, "memory.limit_in_bytes"
    else:
        v2 = next(line.split(":", 2)[2] for line in lines if line.startswith("0::"))
        group, limit_file = Path("/sys/fs/cgroup") / v2.lstrip("/") / name, "memory.max"
    group.mkdir(exist_ok=True)
    (group / limit_file).write_text(str(limit_bytes))
    return group


def run_memory_limited(args) -> dict:
    """The on-disk index's serving probe (`scale_measure.py`: open as the server does, 200 text
    queries, one thread) from a cold page cache, once in a memory cgroup of --limit-mb and once
    without a limit, side by side: the RSS the kernel keeps and what the limit costs in QPS."""
    import subprocess

    where = scale_data.CACHE / f"idx-{args.n}-ivf4096-ondisk"
    index, queries = where / "images.faiss", where / "rss_queries.npy"
    assert index.is_file() and queries.is_file(), f"run `bench_scale.py ondisk --n {args.n}` first"
    size = sum(f.stat().st_size for f in where.iterdir() if f.is_file() and f.suffix != ".npy")
    limit = args.limit_mb * MB
    group = memory_cgroup("bench-scale-rss", limit)
    out = {"n": args.n, "index_bytes": size, "limit_bytes": limit, "setting": {"nprobe": args.nprobe}, "runs": {}}
    probe = [sys.executable, str(REPO / "bench" / "scale_measure.py"), str(index), STORAGE_MMAP, str(queries)]
    probe.append(json.dumps(out["setting"]))
    for mode in ("limited", "unlimited"):
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("1\n")  # cold: the index's pages come from disk
        enter = f"echo $$ > {group / 'cgroup.procs'}; " if mode == "limited" else ""
        shell = enter + 'exec "$@"'
        done = subprocess.run(["sh", "-c", shell, "sh", *probe], capture_output=True, text=True, check=True)
        r = json.loads(done.stdout.strip().splitlines()[-1])
        out["runs"][mode] = {
            "qps": round(r["queries"] / r["query_seconds"], 2),
            "vmrss_after_bytes": r["after_queries"]["VmRSS"],
            "rss_growth_bytes": r["after_queries"]["VmRSS"] - r["before_open"]["VmRSS"],
            "rss_anon_after_bytes": r["after_queries"]["RssAnon"],
            "rss_file_after_bytes": r["after_queries"]["RssFile"],
        }
        log.info("%s: %s", mode, out["runs"][mode])
    group.rmdir()
    return out


# -- metadata ------------------------------------------------------------------------------------------


def run_metadata(args) -> dict:
    import sqlite3
    from collections import namedtuple

    from retrieval.store.schema import select_rows, write_metadata

    where = scale_data.CACHE / f"meta-{args.rows}"
    db = where / "meta.sqlite"
    rng = np.random.default_rng(7)
    ids = np.unique(rng.integers(1, 2**63 - 1, int(args.rows * 1.001), dtype=np.int64))[: args.rows]
    rng.shuffle(ids)
    write_seconds = None
    if not db.is_file():
        where.mkdir(parents=True, exist_ok=True)
        Item = namedtuple("Item", "id uri sha256")
        start = time.perf_counter()
        write_metadata(
            db,
            (
                Item(int(i), f"/data/collection/part-{int(i) % 997:03d}/{int(i):019d}.jpg", f"{int(i):064x}")
                for i in ids
            ),
            iter(()),
            chunk=50_000,
        )
        write_seconds = round(time.perf_counter() - start, 1)
    db_ro = sqlite3.connect(f"file:{db}?mode=ro", uri=True)  # as IndexVersion.metadata reads it
    out = {"rows": args.rows, "file_bytes": db.stat().st_size, "write_seconds": write_seconds, "lookups": {}}
    for k in (10, 1000):
        times = []
        for _ in range(args.lookup_repeats):
            batch = ids[rng.integers(0, len(ids), k)]
            start = time.perf_counter()
            rows = select_rows(db_ro, "image", [int(i) for i in batch])
            times.append(time.perf_counter() - start)
            assert len(rows) == len(set(batch.tolist()))
        out["lookups"][str(k)] = {
            "first_ms": round(times[0] * 1e3, 3),
            "median_ms": round(statistics.median(times) * 1e3, 3),
            "p99_ms": round(float(np.percentile(times, 99)) * 1e3, 3),
            "repeats": len(times),
        }
        log.info("k=%d: median %.3f ms", k, statistics.median(times) * 1e3)
    db_ro.close()
    return out


# -- results ---------------------------------------------------------------------------------------------


def stamp(args) -> dict:
    return {
        "command": "python bench/bench_scale.py " + " ".join(shlex.quote(a) for a in args.argv),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
    }


def save(args, section: dict, merge_key: str | None = None) -> None:
    path = RESULTS / "scale.json"
    result = json.loads(path.read_text()) if path.is_file() else {}
    for key, value in section.items():
        if merge_key and key in result:
            value = {**result[key], **value, merge_key: {**result[key].get(merge_key, {}), **value[merge_key]}}
        result[key] = value
    path.write_text(json.dumps(result, indent=2) + "\n")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("section", choices=["choices", "ondisk", "memory-limited", "metadata", "report"])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--n", type=int, default=1_000_000, help="gallery rows")
    p.add_argument("--only", nargs="*", choices=sorted(CHOICES), help="choices to run (default: all)")
    p.add_argument("--text-queries", type=int, default=1000)
    p.add_argument("--image-queries", type=int, default=1000)
    p.add_argument("--qps-queries", type=int, default=200, help="text queries timed one by one per setting")
    p.add_argument("--exact-qps-queries", type=int, default=30, help="of those, how many time exact search")
    p.add_argument("--exact-rows", type=int, default=1_000_000, help="rows exact search is timed over")
    p.add_argument("--rows", type=int, default=10_000_000, help="metadata rows")
    p.add_argument("--lookup-repeats", type=int, default=200)
    p.add_argument("--limit-mb", type=int, default=1000, help="memory-limited: the cgroup's limit")
    p.add_argument("--nprobe", type=int, default=32, help="memory-limited: the setting the probe searches with")
    args = p.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    return args


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.section == "choices":
        run_choices(
            args, args.only or [c for c in CHOICES if c != "flat" and (not CHOICES[c].on_disk or args.n <= 2_000_000)]
        )
    elif args.section == "ondisk":
        run_choices(args, args.only or ["ivf4096-ondisk"])
    elif args.section == "memory-limited":
        save(args, {f"memory-{args.n}": {**run_memory_limited(args), **stamp(args)}})
    elif args.section == "metadata":
        save(args, {f"metadata-{args.rows}": {**run_metadata(args), **stamp(args)}})
    import scale_report

    scale_report.write(RESULTS / "scale.json", RESULTS / "scale.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
