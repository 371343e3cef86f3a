"""End-to-end latency and throughput of the gRPC server against the in-process pipeline.

    python bench/bench_server.py                       # index the first 200 Flickr8k test images, run everything
    python bench/bench_server.py --index ROOT --duration 10

For text-to-image and image-to-text queries at concurrency 1, 8 and 32, three ways:
  - in_process:        decode/tokenize + encode + FAISS search + metadata in this process, one
                       query per forward pass, `concurrency` threads (no gRPC);
  - server_batched:    `retrieval serve` in a subprocess with micro-batching (--max-batch 32 for
                       texts, --max-image-batch 4 for images);
  - server_unbatched:  the same server with batches of 1 (everything else the same, so the
                       difference is what micro-batching buys).
Both servers start first; then, for each cell, the three modes take turns in short rounds so that
a change in the (shared) machine's background load hits them alike. Queries are real Flickr8k
captions and image files of test images that are not in the index. Writes bench/results/server.json (with the command) and server.md.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

# Client, in-process pipeline and servers share the machine's cores: OpenMP workers that spin
# after each forward pass (the ACTIVE default) steal the cores another process is computing on.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATASET = Path(os.environ.get("FLICKR8K_DIR", REPO.parent / "shared" / "datasets" / "flickr8k"))
KINDS = ("text_to_image", "image_to_text")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--index", help="existing index root (default: build one with index-builder into a temp dir)")
    p.add_argument(
        "--dataset", type=Path, default=DEFAULT_DATASET, help="Flickr8k-layout folder (queries, and the index)"
    )
    p.add_argument(
        "--images", type=int, default=200, help="test-split images to index when building (default: %(default)s)"
    )
    p.add_argument("--model", default="lite0-minilm", help="model for a built index (default: %(default)s)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument(
        "--duration",
        type=float,
        default=8.0,
        help="seconds measured per cell and mode, split into --rounds (default: %(default)s)",
    )
    p.add_argument("--rounds", type=int, default=5, help="turns the three modes take per cell (default: %(default)s)")
    p.add_argument(
        "--warmup", type=float, default=0.5, help="seconds of warm-up before each round (default: %(default)s)"
    )
    p.add_argument("--k", type=int, default=10)
    p.add_argument(
        "--device",
        default="cpu",
        help="torch device of the encoders, in-process and in both servers (default: %(default)s)",
    )
    p.add_argument("--max-batch", type=int, default=32, help="batched server's --max-batch (default: %(default)s)")
    p.add_argument(
        "--max-image-batch", type=int, default=4, help="batched server's --max-image-batch (default: %(default)s)"
    )
    p.add_argument(
        "--max-wait-ms", type=float, default=2.0, help="batched server's --max-wait-ms (default: %(default)s)"
    )
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results", help="results folder")
    return p.parse_args(argv)


# -- data ---------------------------------------------------------------------------------------------


def mini_dataset(src: Path, dest: Path, n: int) -> Path:
    names = (src / "splits" / "test.txt").read_text().split()[:n]
    (dest / "images").mkdir(parents=True)
    (dest / "splits").mkdir()
    (dest / "splits" / "test.txt").write_text("\n".join(names) + "\n")
    for name in names:
        os.symlink(src / "images" / name, dest / "images" / name)
    wanted = set(names)
    with (src / "captions.csv").open(newline="") as f, (dest / "captions.csv").open("w", newline="") as g:
        w = csv.writer(g)
        w.writerow(["image", "caption"])
        w.writerows([r["image"], r["caption"]] for r in csv.DictReader(f) if r["image"] in wanted)
    return dest


def load_queries(dataset: Path, n: int = 200) -> dict[str, list]:
    """Held-out-style queries: captions and image files of test images after the indexed ones."""
    names = (dataset / "splits" / "test.txt").read_text().split()
    pick = names[-n:]
    with (dataset / "captions.csv").open(newline="") as f:
        captions = [r["caption"] for r in csv.DictReader(f) if r["image"] in set(pick)]
    return {"text_to_image": captions[:n], "image_to_text": [(dataset / "images" / x).read_bytes() for x in pick[:n]]}


# -- measurement ----------------------------------------------------------------------------------------
# A round runs `concurrency` closed-loop workers and measures the requests that complete after the
# warm-up: for `duration` seconds, extended until at least 2 x concurrency requests completed (a
# batch of 32 images can outlast a short window). QPS = measured completions / measured time;
# raw numbers are merged over rounds.


def summarize(latencies: list[float], errors: int, seconds: float) -> dict:
    lat = np.asarray(latencies) * 1000
    return {
        "requests": len(latencies),
        "errors": errors,
        "seconds": round(seconds, 2),
        "p50_ms": round(float(np.percentile(lat, 50)), 2) if len(lat) else None,
        "p99_ms": round(float(np.percentile(lat, 99)), 2) if len(lat) else None,
        "qps": round(len(latencies) / seconds, 2) if seconds > 0 else None,
    }


class Window:
    def __init__(self, now: float, concurrency: int, duration: float, warmup: float):
        self.measure_from, self.stop_at = now + warmup, now + warmup + duration
        self.hard_stop = now + warmup + 20 * duration
        self.min_requests = 2 * concurrency
        self.latencies: list[float] = []
        self.last = self.measure_from
        self.errors = 0

    def going(self, t0: float) -> bool:
        return t0 < self.stop_at or (len(self.latencies) < self.min_requests and t0 < self.hard_stop)

    def done(self, t0: float, t1: float) -> None:
        if t1 >= self.measure_from:
            self.latencies.append(t1 - t0)
            self.last = max(self.last, t1)

    def result(self) -> tuple[list[float], int, float]:
        return self.latencies, self.errors, self.last - self.measure_from


def run_threads(call, queries: list, concurrency: int, duration: float, warmup: float):
    """`concurrency` threads, each calling `call(query)` back to back."""
    window, lock = Window(time.perf_counter(), concurrency, duration, warmup), threading.Lock()

    def worker(w: int) -> None:
        i = w
        while window.going(t0 := time.perf_counter()):
            try:
                call(queries[i % len(queries)])
                t1 = time.perf_counter()
                with lock:
                    window.done(t0, t1)
            except Exception:  # noqa: BLE001 - counted
                with lock:
                    window.errors += 1
            i += concurrency

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(worker, range(concurrency)))
    return window.result()


async def run_async(address: str, kind: str, queries: list, concurrency: int, duration: float, warmup: float, k: int):
    from retrieval.client import AsyncRetrievalClient, search_request

    requests = [
        search_request(text=q, k=k) if kind == "text_to_image" else search_request(image=q, k=k) for q in queries
    ]
    async with AsyncRetrievalClient(address, timeout=300) as client:
        window = Window(time.perf_counter(), concurrency, duration, warmup)

        async def worker(w: int) -> None:
            i = w
            while window.going(t0 := time.perf_counter()):
                try:
                    await client.search(requests[i % len(requests)])
                    window.done(t0, time.perf_counter())
                except Exception:  # noqa: BLE001 - counted
                    window.errors += 1
                i += concurrency

        await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return window.result()


# -- the pipelines ---------------------------------------------------------------------------------------


def in_process_calls(index_root: str, k: int, device: str):
    from retrieval.encoding.images import load_image
    from retrieval.serving.encoder import cached_model
    from retrieval.store.reader import IndexVersion

    index = IndexVersion.open(index_root)
    model, preprocess, tokenizer = cached_model(index.model, device)

    def text_to_image(text: str):
        q = model.encode_text(tokenizer([text]).to(device)).cpu().numpy()
        _, ids = index.search("image", q, k, cross_modal=True)
        return index.metadata("image", ids[0])

    def image_to_text(data: bytes):
        q = model.encode_image(preprocess(load_image(data))[None].to(device)).cpu().numpy()
        _, ids = index.search("text", q, k, cross_modal=True)
        return index.metadata("text", ids[0])

    return {"text_to_image": text_to_image, "image_to_text": image_to_text}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, index_root: str, max_batch: int, max_image_batch: int, max_wait_ms: float, device: str):
        self.port = free_port()
        self.args = [
            sys.executable,
            "-m",
            "retrieval.cli",
            "serve",
            "--index",
            index_root,
            "--port",
            str(self.port),
            "--metrics-port",
            "-1",
            "--max-batch",
            str(max_batch),
            "--max-image-batch",
            str(max_image_batch),
            "--max-wait-ms",
            str(max_wait_ms),
            "--device",
            device,
        ]
        self.proc = None

    def __enter__(self) -> ServerProcess:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
        self.proc = subprocess.Popen(self.args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 300
        with grpc.insecure_channel(f"127.0.0.1:{self.port}") as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server exited: {self.proc.stderr.read()}")
                try:
                    if (
                        stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status
                        == health_pb2.HealthCheckResponse.SERVING
                    ):
                        return self
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("server did not become SERVING")
                time.sleep(0.2)

    def __exit__(self, *exc) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def image_encoder_rates(
    index_root: str, images: list[bytes], device: str, sizes=(1, 2, 4, 8, 32), repeats: int = 3
) -> dict[str, float]:
    """Images/s of the image encoder alone (decoded beforehand, no server) at each batch size,
    median of `repeats`: the most that micro-batching image queries can buy on this machine."""
    import statistics

    import torch

    from retrieval.encoding.images import load_image
    from retrieval.serving.encoder import cached_model
    from retrieval.store.reader import IndexVersion

    model, preprocess, _ = cached_model(IndexVersion.open(index_root).model, device)
    pixels = torch.stack([preprocess(load_image(b)) for b in images[:64]]).to(device)
    sync = torch.cuda.synchronize if pixels.is_cuda else (lambda: None)  # CUDA kernels run asynchronously
    rates = {}
    for size in sizes:
        model.encode_image(pixels[:size])  # warm-up: the first pass at a new shape allocates
        runs = []
        for _ in range(repeats):
            sync()
            start = time.perf_counter()
            for s in range(0, len(pixels) - size + 1, size):
                model.encode_image(pixels[s : s + size])
            sync()
            runs.append((len(pixels) // size) * size / (time.perf_counter() - start))
        rates[str(size)] = round(statistics.median(runs), 1)
    return rates


# -- report ---------------------------------------------------------------------------------------------------


def goals(rows: list[dict], concurrency: list[int]) -> dict:
    cell = {(r["mode"], r["query"], r["concurrency"]): r for r in rows}
    out = {}
    for kind in KINDS:
        g = {}
        if 1 in concurrency:
            ratio = cell[("server_batched", kind, 1)]["p50_ms"] / cell[("in_process", kind, 1)]["p50_ms"]
            g["p50_c1_server_over_in_process"] = round(ratio, 3)
            g["p50_c1_goal_met (<= 1.2)"] = ratio <= 1.2
        top = max(concurrency)
        ratio = cell[("server_batched", kind, top)]["qps"] / cell[("server_unbatched", kind, top)]["qps"]
        g[f"qps_c{top}_batched_over_unbatched"] = round(ratio, 3)
        g[f"qps_c{top}_goal_met (>= 2)"] = ratio >= 2.0
        out[kind] = g
    return out


def ceiling(result: dict) -> float:
    rates = result["image_encoder_per_s"]
    return max(rates.values()) / rates["1"]


def markdown(result: dict) -> str:
    lines = [
        "# gRPC server benchmark",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Machine: {result['machine']['cpus']} CPU cores ({result['machine']['platform']}), torch threads "
        f"{result['machine']['torch_threads']}, encoders on {result['config']['device']}; index {result['index']['version']} with "
        f"{result['index']['images']} images / {result['index']['texts']} captions; k={result['config']['k']}; "
        f"{result['config']['duration_s']} s measured per cell and mode, in {result['config']['rounds']} interleaved rounds. "
        f"Batched server: max batch {result['config']['max_batch']} (text), {result['config']['max_image_batch']} (image), "
        f"max wait {result['config']['max_wait_ms']} ms; unbatched: max batch 1. Both run up to "
        f"{result['config']['text_concurrency']} text and {result['config']['image_concurrency']} image forward "
        f"passes at once. Client, in-process pipeline and "
        f"servers share the machine's cores (OMP_WAIT_POLICY={result['config']['omp_wait_policy']}).",
        "",
        "| query | mode | concurrency | p50 ms | p99 ms | QPS | errors |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in result["results"]:
        lines.append(
            f"| {r['query']} | {r['mode']} | {r['concurrency']} | {r['p50_ms']} | {r['p99_ms']} | {r['qps']} | {r['errors']} |"
        )
    lines += ["", "Goals:", ""]
    for kind, g in result["goals"].items():
        lines.append(f"- {kind}: " + ", ".join(f"{k} = {v}" for k, v in g.items()))
    lines += [
        "",
        "Reading it:",
        "",
        "- The cores are shared with whatever else runs on the machine; the three modes take turns within each "
        "cell so that drift hits them alike, but single runs still move by tens of percent at concurrency 1.",
        "- Text: MiniLM encodes many more captions per second in batches, so micro-batching pays as concurrency grows.",
        "- Images: the image encoder alone (decoded beforehand, no server, this run) encodes "
        + ", ".join(f"{v} img/s at batch {k}" for k, v in result["image_encoder_per_s"].items())
        + f": batching can raise its throughput at most {ceiling(result):.2f}x over batch 1, which bounds what "
        "micro-batching image queries can buy. On a CPU the server caps image batches at 4 and runs two forward "
        "passes side by side; on a GPU (`--device cuda`) a larger --max-image-batch is the setting to try.",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = parse_args(argv)
    sys.path.insert(0, str(REPO))
    import torch

    from retrieval.serving.server import ServeConfig
    from retrieval.store.reader import IndexVersion

    tmp = tempfile.TemporaryDirectory(prefix="bench-server-")
    index_root = args.index
    if index_root is None:
        from index_builder.cli import main as builder

        data = mini_dataset(args.dataset, Path(tmp.name) / "data", args.images)
        index_root = str(Path(tmp.name) / "index")
        print(f"building an index of {args.images} test images into {index_root}", flush=True)
        if (
            builder(
                [
                    "-q",
                    "build",
                    "--out",
                    index_root,
                    "--dataset",
                    str(data),
                    "--split",
                    "test",
                    "--model",
                    args.model,
                    "--no-progress",
                ]
            )
            != 0
        ):
            return 1
    index = IndexVersion.open(index_root)
    queries = load_queries(args.dataset)
    rows = []
    calls = in_process_calls(index_root, args.k, args.device)
    encoder_rates = image_encoder_rates(index_root, queries["image_to_text"], args.device)  # before any server runs
    print(f"image encoder alone, img/s by batch size: {encoder_rates}", flush=True)
    with (
        ServerProcess(index_root, args.max_batch, args.max_image_batch, args.max_wait_ms, args.device) as batched,
        ServerProcess(index_root, 1, 1, args.max_wait_ms, args.device) as unbatched,
    ):
        runners = {
            "in_process": lambda kind, c, d, w: run_threads(calls[kind], queries[kind], c, d, w),
            "server_batched": lambda kind, c, d, w: asyncio.run(
                run_async(f"127.0.0.1:{batched.port}", kind, queries[kind], c, d, w, args.k)
            ),
            "server_unbatched": lambda kind, c, d, w: asyncio.run(
                run_async(f"127.0.0.1:{unbatched.port}", kind, queries[kind], c, d, w, args.k)
            ),
        }
        for kind in KINDS:
            for c in args.concurrency:
                # The modes take turns in short rounds, so a change in the machine's background load
                # hits all three alike.
                raw = {mode: ([], 0, 0.0) for mode in runners}
                for _ in range(args.rounds):
                    for mode, run in runners.items():
                        lat, err, seconds = run(kind, c, args.duration / args.rounds, args.warmup)
                        raw[mode] = (raw[mode][0] + lat, raw[mode][1] + err, raw[mode][2] + seconds)
                for mode, (lat, err, seconds) in raw.items():
                    stats = summarize(lat, err, seconds)
                    rows.append({"mode": mode, "query": kind, "concurrency": c, **stats})
                    print(
                        f"{mode:17s} {kind:14s} c={c:<3d} p50 {stats['p50_ms']} ms  p99 {stats['p99_ms']} ms  "
                        f"{stats['qps']} QPS  errors {stats['errors']}",
                        flush=True,
                    )

    result = {
        "command": " ".join(["python bench/bench_server.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch_threads": torch.get_num_threads()},
        "index": {
            "version": index.name,
            "model": index.model,
            "images": index.count("image"),
            "texts": index.count("text"),
        },
        "config": {
            "k": args.k,
            "duration_s": args.duration,
            "rounds": args.rounds,
            "warmup_s": args.warmup,
            "max_batch": args.max_batch,
            "max_image_batch": args.max_image_batch,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "text_concurrency": ServeConfig.text_concurrency,
            "image_concurrency": ServeConfig.image_concurrency,
            "max_wait_ms": args.max_wait_ms,
            "concurrency": args.concurrency,
            "device": args.device,
        },
        "results": rows,
        "image_encoder_per_s": encoder_rates,
        "goals": goals(rows, args.concurrency),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "server.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "server.md").write_text(markdown(result))
    print(markdown(result))
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
