"""Index builds on a Ray cluster (`index-builder build --ray`), against the single-process builder.

A two-node cluster (one CPU each) runs on loopback for the module, in a process of its own
(`tests/ray_cluster.py`; as root, in a network namespace whose only interface is loopback, so its
traffic stays on 127.0.0.1). Every Ray driver is a process of its own too, joined to that network:
the test process never becomes a Ray driver, so no thread of Ray's outlives the module in it. On a
small real Flickr8k cut with one corrupt image, a Ray build gives the single-process build's
vectors bit for bit (both run each forward pass on one thread) and its counts and bad-file
report; a driver killed mid-encode leaves shards that the rerun reuses instead of encoding again;
workers whose model is not the driver's fail the build with one typed error; and `--ray` without
Ray installed is one clear error.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch
from conftest import make_mini_dataset

from index_builder.encode import SHARD_RE

REPO = Path(__file__).resolve().parents[1]
HAVE_RAY = importlib.util.find_spec("ray") is not None
needs_ray = pytest.mark.skipif(not HAVE_RAY, reason="Ray is not installed: pip install '.[ray]' (the dev extra has it)")
SHARD = 16  # items per shard: two forward passes of 8 images
DRIVER_TIMEOUT = 600  # seconds for one build of 25 images on the 2-CPU cluster (about 30 s unloaded)


@pytest.fixture(scope="module")
def mini(tmp_path_factory) -> Path:
    """24 real images with their captions, and one corrupt image with a caption of its own."""
    root = make_mini_dataset(tmp_path_factory.mktemp("ray_mini"), {"train": 16, "test": 8})
    (root / "images" / "zz_corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with (root / "captions.csv").open("a") as f:
        f.write("zz_corrupt.jpg,a picture that does not decode\n")
    return root


@dataclass(frozen=True)
class RayCluster:
    address: str  # the head's host:port
    host: subprocess.Popen  # tests/ray_cluster.py, holding the nodes
    own_network: bool  # the nodes are in the host's network namespace, loopback only

    def driver(self, argv: Sequence[str], **popen) -> subprocess.Popen:
        """A process on the cluster's network, with RAY_ADDRESS set to the head."""
        enter = ["nsenter", f"--net=/proc/{self.host.pid}/ns/net", "--"] if self.own_network else []
        env = {
            **os.environ,
            "RAY_ADDRESS": self.address,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        }
        return subprocess.Popen([*enter, *argv], env=env, **popen)

    def run(self, argv: Sequence[str]) -> subprocess.CompletedProcess:
        process = self.driver(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            out, err = process.communicate(timeout=DRIVER_TIMEOUT)
        finally:
            process.kill()
        return subprocess.CompletedProcess(argv, process.returncode, out, err)


@pytest.fixture(scope="module")
def cluster() -> Iterator[RayCluster]:
    """A head and a worker node of one CPU each on this machine, in tests/ray_cluster.py."""
    if not HAVE_RAY:
        pytest.skip("Ray is not installed")
    own = os.geteuid() == 0 and shutil.which("nsenter") is not None
    argv = [sys.executable, str(Path(__file__).with_name("ray_cluster.py")), *(["--own-network"] if own else [])]
    host = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = host.stdout.readline()  # one line once both nodes are up; "" if it died
        assert line, f"the Ray test cluster did not start:\n{host.stderr.read() if host.poll() is not None else ''}"
        started = json.loads(line)
        yield RayCluster(started["address"], host, started["own_network"])
    finally:
        host.stdin.close()  # the host shuts its nodes down and exits
        try:
            host.wait(timeout=60)
        except subprocess.TimeoutExpired:
            host.kill()
            host.wait()


def build_argv(out: Path, dataset: Path, *flags: str) -> list[str]:
    """`index-builder build` of DATASET into OUT, as a command line."""
    return [
        sys.executable,
        "-m",
        "index_builder",
        "-q",
        "build",
        "--out",
        str(out),
        "--dataset",
        str(dataset),
        "--no-progress",
        *flags,
    ]


@pytest.fixture(scope="module")
def reference(mini, default_model, tmp_path_factory) -> Path:
    """The single-process build, each forward pass on one thread (as each Ray actor has one CPU)."""
    from index_builder.build import BuildConfig, build

    out = tmp_path_factory.mktemp("single") / "index"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        build(
            BuildConfig(out=str(out), dataset=str(mini), shard_size=SHARD, workers=0, progress=False),
            loaded=default_model,
        )
    finally:
        torch.set_num_threads(threads)
    return out


def published(root: Path) -> tuple[dict, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """(manifest, {modality: (ids, stored vectors) sorted by id}) of the current version."""
    from retrieval.store.layout import INDEX_FILES, MANIFEST, read_current
    from retrieval.store.vectors import reconstruct

    version = root / read_current(root)
    vectors = {}
    for modality, name in INDEX_FILES.items():
        index = faiss.read_index(str(version / name))
        ids = np.sort(faiss.vector_to_array(faiss.downcast_index(index).id_map))
        vectors[modality] = (ids, reconstruct(index, ids))
    return json.loads((version / MANIFEST).read_text()), vectors


def assert_same_index(root: Path, reference: Path) -> dict:
    """The two builds' stored vectors are equal bit for bit, under the same ids; returns root's manifest."""
    manifest, vectors = published(root)
    expected_manifest, expected = published(reference)
    for modality, (ids, vecs) in expected.items():
        assert len(ids) > 0
        assert np.array_equal(vectors[modality][0], ids), f"{modality}: different ids"
        assert vectors[modality][1].tobytes() == vecs.tobytes(), f"{modality}: vectors differ"
    for key in ("num_images", "num_texts", "fingerprint", "index_factory"):
        assert manifest[key] == expected_manifest[key], key
    assert manifest["report"]["skipped"] == expected_manifest["report"]["skipped"]
    return manifest


def assert_ran(done: subprocess.CompletedProcess) -> None:
    assert done.returncode == 0, f"{' '.join(done.args[3:6])} exited {done.returncode}:\n{done.stderr}"


@needs_ray
@pytest.mark.dataset
def test_ray_build_matches_single_process_build(mini, cluster, reference, tmp_path):
    out = tmp_path / "index"
    assert_ran(cluster.run(build_argv(out, mini, "--shard-size", str(SHARD), "--ray", "auto")))  # RAY_ADDRESS: the head
    manifest = assert_same_index(out, reference)
    expected, _ = published(reference)
    assert manifest["report"]["counts"] == expected["report"]["counts"]
    assert [s["item"] for s in manifest["report"]["skipped"]] == ["zz_corrupt.jpg"]
    assert manifest["report"]["config"]["ray"] == "auto"


def encoded_in_shards(out: Path) -> tuple[set[str], set[str]]:
    """(good, bad) image checksums in the finished image shards of OUT's work directories."""
    good: set[str] = set()
    bad: set[str] = set()
    for path in out.glob(".work-*/images/shard-*.npz"):
        if not SHARD_RE.match(path.name):  # one being written (a shard appears whole, renamed)
            continue
        with np.load(path) as z:
            good.update(z["sha"].tolist())
            bad.update(z["bad_sha"].tolist())
    return good, bad


@needs_ray
@pytest.mark.dataset
def test_killed_ray_build_resumes_from_its_shards(mini, cluster, reference, tmp_path):
    out = tmp_path / "index"
    # shards of one forward pass (8 images), so that most are still to come when the first appears
    argv = build_argv(out, mini, "--shard-size", "8", "--ray", cluster.address)
    driver = cluster.driver(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + DRIVER_TIMEOUT
    try:
        # a shard of encoded images, not only one holding the corrupt file (that alone proves no reuse)
        while not encoded_in_shards(out)[0]:
            assert driver.poll() is None, f"the build ended before it could be killed:\n{driver.stderr.read().decode()}"
            assert time.monotonic() < deadline, f"no shard of encoded images in {DRIVER_TIMEOUT} s"
            time.sleep(0.05)
        driver.send_signal(signal.SIGKILL)  # the driver, mid-encode
    finally:
        driver.kill()
        driver.wait()
    assert not (out / "CURRENT").exists(), "the killed build published nothing"
    good_written, bad_written = encoded_in_shards(out)  # its actors may have added some since

    assert_ran(cluster.run(argv))
    manifest, _ = published(out)
    counts = manifest["report"]["counts"]
    expected = published(reference)[0]["report"]["counts"]
    good, bad = expected["images_encoded"], expected["images_skipped"]
    assert counts["images_resumed"] >= len(good_written | bad_written), "every item in a finished shard is reused"
    # and the rest encoded once: resumed + encoded now = all, less the bad files found now (not counted as encoded)
    assert good <= counts["images_resumed"] + counts["images_encoded"] <= good + bad
    assert counts["images_encoded"] <= good - len(good_written)
    assert_same_index(out, reference)


# A driver whose model differs from the workers' (its weights changed in memory after loading)
PERTURBED_DRIVER = """
import sys, torch
from index_builder.build import BuildConfig, build
from retrieval.embedding.factory import create_model
from retrieval.errors import FingerprintMismatchError

model, preprocess, tokenizer = create_model("lite0-minilm")
with torch.no_grad():
    next(model.parameters()).add_(1e-3)
try:
    build(BuildConfig(out=sys.argv[1], dataset=sys.argv[2], progress=False, ray="auto"), loaded=(model, preprocess, tokenizer))
except FingerprintMismatchError as e:
    print(e)
    sys.exit(3)
"""


@needs_ray
@pytest.mark.dataset
def test_ray_workers_refuse_a_model_other_than_the_drivers(mini, cluster, tmp_path):
    """Vectors of two models never share a work directory: an actor whose model differs from the
    driver's fails the build with one typed error."""
    out = tmp_path / "index"
    done = cluster.run([sys.executable, "-c", PERTURBED_DRIVER, str(out), str(mini)])
    assert done.returncode == 3, f"not a FingerprintMismatchError (exit {done.returncode}):\n{done.stderr}"
    assert len(done.stdout.strip().splitlines()) == 1, done.stdout
    assert "every node needs the same model" in done.stdout
    assert not list(out.glob(".work-*/*/shard-*.npz")), "no vectors of either model were kept"


def test_ray_flag_without_ray_is_one_clear_error(mini, tmp_path, monkeypatch, capsys):
    from index_builder.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError, as without Ray installed
    monkeypatch.delitem(sys.modules, "index_builder.ray_encode", raising=False)
    assert main(["build", "--out", str(tmp_path / "index"), "--dataset", str(mini), "--ray"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "--ray needs Ray Data, which is not installed" in err and "pip install" in err
    assert not (tmp_path / "index").exists(), "nothing was started"


@needs_ray
def test_the_test_process_stays_on_its_own_network(cluster):
    """Every thread of this process is still in the network namespace the process started in,
    while a (namespaced) Ray cluster runs: servers started by later tests stay reachable."""
    threads = {os.readlink(f"/proc/self/task/{tid}/ns/net") for tid in os.listdir("/proc/self/task")}
    assert threads == {os.readlink("/proc/self/ns/net")}
