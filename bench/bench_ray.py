"""The same Flickr8k build on a 2-node Ray cluster on loopback against the single-process builder.

    python bench/bench_ray.py                  # all of Flickr8k (8,091 images, 40,455 captions)
    python bench/bench_ray.py --split test     # a 1,000-image cut, for a quick look

Starts a Ray head and a worker node on this machine, one CPU each (`ray start --head --block` and
`ray start --address ... --block`, stopped by signalling exactly those two processes), then runs
`index-builder build --dataset DIR` twice as subprocesses, in alternating order with --repeats:
once as is, once with `--ray auto` (RAY_ADDRESS: the head). Each run gets its own index root.
It reports:

- identical vectors: every stored vector of both indexes (images and captions, with their
  inverted-softmax coordinate), reconstructed by id, compared bit for bit;
- identical manifest counts, bad-file reports, index types;
- the wall-clock ratio Ray / single process, and each encode stage's rate from the manifests
  (captions encoded on the cluster against the single-process builder's in-process rate: what the
  driver would have done had it kept captions to itself).

Ray on Linux binds every node to the machine's network address, never to loopback: run as root,
the script re-runs itself in a network namespace of its own (`unshare --net`) whose only
interface is loopback, where the nodes bind to 127.0.0.1.

Results go to bench/results/ray.json and ray.md. No GPU measurement here: none on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import faiss  # noqa: E402
import numpy as np  # noqa: E402

from retrieval.store.layout import INDEX_FILES, MANIFEST, read_current  # noqa: E402
from retrieval.store.vectors import reconstruct  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "datasets" / "flickr8k"
RESULTS = REPO / "bench" / "results"
RAY = Path(sys.executable).with_name("ray")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="caption-dataset folder (default: %(default)s)")
    p.add_argument("--split", default=None, help="index only this split (default: every image)")
    p.add_argument("--repeats", type=int, default=1, help="builds of each kind, alternating")
    p.add_argument("--out", type=Path, default=RESULTS, help="where ray.json and ray.md go")
    return p.parse_args(argv)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def loopback_cluster(log_dir: Path, cpus_per_node: int = 1) -> Iterator[str]:
    """A Ray head and one worker node on 127.0.0.1, `cpus_per_node` each; yields the head's address."""
    port = free_port()
    os.environ.setdefault("RAY_AUTH_MODE", "token")  # nodes, drivers and probes authenticate
    if not (Path.home() / ".ray" / "auth_token").is_file():  # none of the user's: one for this run
        os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))  # as `ray get-auth-token --generate`
    common = [
        "--block",
        "--node-ip-address",
        "127.0.0.1",
        "--num-cpus",
        str(cpus_per_node),
        "--object-store-memory",
        str(500 * 1024 * 1024),
        "--disable-usage-stats",
    ]
    nodes: list[subprocess.Popen] = []
    logs: list[Path] = []
    address = f"127.0.0.1:{port}"
    try:
        for name, extra in (
            (
                "head",
                [
                    "--head",
                    "--port",
                    str(port),
                    "--include-dashboard",
                    "false",
                    "--ray-client-server-port",
                    str(free_port()),
                ],
            ),
            ("worker", ["--address", address]),
        ):
            logs.append(log_dir / f"ray-{name}.log")
            with logs[-1].open("w") as log:
                nodes.append(
                    subprocess.Popen([str(RAY), "start", *extra, *common], stdout=log, stderr=subprocess.STDOUT)
                )
            wait_for_nodes(address, nodes, logs)
        yield address
    finally:
        for node in reversed(nodes):  # `ray start --block` stops its node's processes on SIGTERM
            node.send_signal(signal.SIGTERM)
            try:
                node.wait(timeout=60)
            except subprocess.TimeoutExpired:
                node.kill()
                node.wait()


def wait_for_nodes(address: str, nodes: list[subprocess.Popen], logs: list[Path], timeout: float = 300) -> None:
    """Until all `nodes` are alive in the cluster; a node that exits raises with the end of its log
    (the log folder is temporary)."""
    count = len(nodes)
    probe = (
        "import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR'); "
        "print(sum(1 for n in ray.nodes() if n['Alive']))"
    )
    deadline = time.monotonic() + timeout
    while True:
        for node, log in zip(nodes, logs):
            if node.poll() is not None:
                tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
                raise RuntimeError(f"`{' '.join(map(str, node.args[:3]))}` exited with {node.returncode}:\n{tail}")
        out = subprocess.run([sys.executable, "-c", probe, address], capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.strip().splitlines()[-1:] == [str(count)]:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the cluster at {address} did not reach {count} node(s) in {timeout:.0f}s")
        time.sleep(2)


def run_build(root: Path, args: argparse.Namespace, log: Path, ray_address: str | None) -> tuple[float, dict]:
    cmd = [
        sys.executable,
        "-m",
        "index_builder",
        "build",
        "--out",
        str(root),
        "--dataset",
        str(args.data),
        "--no-progress",
        "--json",
    ]
    if args.split:
        cmd += ["--split", args.split]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if ray_address:
        cmd += ["--ray", "auto"]
        env["RAY_ADDRESS"] = ray_address
    start = time.perf_counter()
    with log.open("w") as err:
        out = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
    seconds = time.perf_counter() - start
    if out.returncode != 0:
        raise RuntimeError(f"build failed ({out.returncode}); see {log}")
    return seconds, json.loads(out.stdout)


def stored_vectors(root: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    version = root / read_current(root)
    result = {}
    for modality, name in INDEX_FILES.items():
        index = faiss.read_index(str(version / name))
        ids = np.sort(faiss.vector_to_array(faiss.downcast_index(index).id_map))
        result[modality] = (ids, reconstruct(index, ids))
    return result


def where_different(ids: np.ndarray, x: np.ndarray, y: np.ndarray) -> dict:
    """Where two (N, D+1) stored-row arrays of the same `ids` differ: the embedding columns or the
    last, the inverted-softmax bias computed from them at build time (it tells encoding from
    indexing), and the first ids that differ."""
    rows = (x != y).any(axis=1)
    return {
        "max_abs_diff": float(np.abs(x - y).max()),
        "rows_different": int(rows.sum()),
        "rows_with_embedding_different": int((x[:, :-1] != y[:, :-1]).any(axis=1).sum()),
        "rows_with_bias_different": int((x[:, -1] != y[:, -1]).sum()),
        "first_ids_different": ids[rows][:10].tolist(),
    }


def compare(single: Path, ray_root: Path) -> dict:
    a, b = stored_vectors(single), stored_vectors(ray_root)
    out = {}
    for modality in a:
        same_ids = bool(np.array_equal(a[modality][0], b[modality][0]))
        out[modality] = {
            "vectors": int(len(a[modality][0])),
            "same_ids": same_ids,
            "bit_identical": same_ids and a[modality][1].tobytes() == b[modality][1].tobytes(),
            **(where_different(a[modality][0], a[modality][1], b[modality][1]) if same_ids else {}),
        }
    ma, mb = (json.loads((r / read_current(r) / MANIFEST).read_text()) for r in (single, ray_root))
    out["counts_identical"] = ma["report"]["counts"] == mb["report"]["counts"]
    out["skipped_identical"] = ma["report"]["skipped"] == mb["report"]["skipped"]
    out["index_types_identical"] = ma["index_type"] == mb["index_type"]
    return out


def stage_seconds(manifest: dict) -> dict:
    c, e = manifest["report"]["counts"], manifest["report"]["encode"]
    return {
        "images": round(c["images_encoded"] / e["images_per_second"], 1) if e["images_per_second"] else 0.0,
        "captions": round(c["texts_encoded"] / e["captions_per_second"], 1) if e["captions_per_second"] else 0.0,
        "images_per_second": e["images_per_second"],
        "captions_per_second": e["captions_per_second"],
    }


def in_loopback_namespace(argv: Sequence[str]) -> None:
    """As root and not yet there: replace this process by itself in a new network namespace with
    only loopback up."""
    if os.geteuid() != 0 or os.environ.get("BENCH_RAY_NETNS") == "1" or not shutil.which("unshare"):
        return
    os.environ["BENCH_RAY_NETNS"] = "1"
    os.execvp(
        "unshare",
        [
            "unshare",
            "--net",
            "--",
            "sh",
            "-c",
            'ip link set lo up && exec "$0" "$@"',
            sys.executable,
            str(Path(__file__).resolve()),
            *argv,
        ],
    )


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    in_loopback_namespace(argv)
    args = parse_args(argv)
    runs: dict[str, list[dict]] = {"single": [], "ray": []}
    comparison = None
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench_ray_") as tmp:
        tmp_path = Path(tmp)
        with loopback_cluster(tmp_path) as address:
            print(f"cluster up at {address}", flush=True)
            for repeat in range(args.repeats):
                order = ("single", "ray") if repeat % 2 == 0 else ("ray", "single")
                roots = {}
                for kind in order:
                    roots[kind] = tmp_path / f"{kind}-{repeat}"
                    seconds, manifest = run_build(
                        roots[kind], args, tmp_path / f"{kind}-{repeat}.log", address if kind == "ray" else None
                    )
                    runs[kind].append(
                        {
                            "wall_seconds": round(seconds, 1),
                            "build_seconds": manifest["build_seconds"],
                            "num_images": manifest["num_images"],
                            "num_texts": manifest["num_texts"],
                            "counts": manifest["report"]["counts"],
                            "encode": stage_seconds(manifest),
                            "load_average_after": [round(x, 1) for x in os.getloadavg()],
                        }
                    )
                    print(f"{kind} #{repeat}: {seconds:.1f}s, {stage_seconds(manifest)}", flush=True)
                comparison = compare(roots["single"], roots["ray"])
                print(json.dumps(comparison), flush=True)
                for root in roots.values():
                    shutil.rmtree(root, ignore_errors=True)
    wall = {k: statistics.median(r["wall_seconds"] for r in v) for k, v in runs.items()}
    result = {
        "created_at": started,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "load_average_before": [round(x, 1) for x in load_before],
        },
        "data": str(args.data),
        "split": args.split,
        "repeats": args.repeats,
        "cluster": f"2 Ray nodes on {'127.0.0.1' if os.environ.get('BENCH_RAY_NETNS') == '1' else 'this machine'} "
        "(ray start --head / --address), --num-cpus 1 each",
        "runs": runs,
        "median_wall_seconds": wall,
        "wall_ratio_ray_over_single": round(wall["ray"] / wall["single"], 3),
        "comparison": comparison,
        "gpu": "not measured: no GPU machine was lent to this task",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ray.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "ray.md").write_text(render(result))
    print(render(result))
    return 0


def difference(m: dict) -> str:
    return (
        f"DIFFERENT: max |diff| {m['max_abs_diff']:.2g} in {m['rows_different']} rows (embedding differs in "
        f"{m.get('rows_with_embedding_different', '?')}, bias coordinate in {m.get('rows_with_bias_different', '?')})"
    )


def render(r: dict) -> str:
    c = r["comparison"]
    single = r["runs"]["single"]

    def med(kind: str, key: str) -> float:
        return statistics.median(run["encode"][key] for run in r["runs"][kind])

    lines = [
        "# Index builds on a Ray cluster against the single-process builder",
        "",
        f"`python bench/bench_ray.py{' --split ' + r['split'] if r['split'] else ''}"
        f"{' --repeats ' + str(r['repeats']) if r['repeats'] != 1 else ''}` ({r['created_at']}): the same Flickr8k "
        f"build ({single[0]['num_images']} images, {single[0]['num_texts']} captions), `index-builder build` as is and "
        f"with `--ray auto` on {r['cluster']}, on one machine with {r['machine']['cpus']} cores "
        f"(load average {r['machine']['load_average_before'][0]} when it started: the machine is shared).",
        "",
        "| | single process | Ray, 2 nodes x 1 CPU |",
        "| --- | --- | --- |",
        f"| wall clock, whole build (median of {r['repeats']}) | {r['median_wall_seconds']['single']:.1f} s | "
        f"{r['median_wall_seconds']['ray']:.1f} s (**{r['wall_ratio_ray_over_single']:.2f}x**) |",
        f"| image encode stage | {med('single', 'images'):.1f} s ({med('single', 'images_per_second'):.1f}/s) | "
        f"{med('ray', 'images'):.1f} s ({med('ray', 'images_per_second'):.1f}/s) |",
        f"| caption encode stage | {med('single', 'captions'):.1f} s ({med('single', 'captions_per_second'):.1f}/s, "
        f"in the driver) | {med('ray', 'captions'):.1f} s ({med('ray', 'captions_per_second'):.1f}/s, on the cluster) |",
        "",
        "Stage times include the Ray actors' start (a process each, torch, the model) and are the builder's own "
        "(manifest `report.encode`).",
        "",
        "| check | result |",
        "| --- | --- |",
    ]
    for modality in INDEX_FILES:
        m = c[modality]
        lines.append(
            f"| {modality} vectors ({m['vectors']}, with their bias coordinate), by id | "
            f"{'bit for bit identical' if m['bit_identical'] else difference(m)} |"
        )
    lines += [
        f"| manifest counts | {'identical' if c['counts_identical'] else 'DIFFERENT'} |",
        f"| bad-file reports | {'identical' if c['skipped_identical'] else 'DIFFERENT'} |",
        f"| index types | {'identical' if c['index_types_identical'] else 'DIFFERENT'} |",
        "",
        f"GPU: {r['gpu']}.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
