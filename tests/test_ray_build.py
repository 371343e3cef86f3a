"""Index builds on a Ray cluster (`index-builder build --ray`), against the single-process builder.

A two-node cluster (one CPU each) runs on loopback for the module (`ray.cluster_utils.Cluster`,
Ray's own multi-node test cluster: its nodes are this process's children and stop with it). On a
small real Flickr8k cut with one corrupt image, a Ray build gives the single-process build's
vectors bit for bit (both run each forward pass on one thread) and its counts and bad-file
report; a driver killed mid-encode leaves shards that the rerun reuses instead of encoding again;
workers whose model is not the driver's fail the build with one typed error; and `--ray` without
Ray installed is one clear error.

Ray on Linux binds every node to the machine's network address, never to loopback; as root, the
cluster runs in a network namespace of its own whose only interface is loopback (`loopback_only`),
so its traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import ctypes
import fcntl
import importlib.util
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch
from conftest import make_mini_dataset

REPO = Path(__file__).resolve().parents[1]
HAVE_RAY = importlib.util.find_spec("ray") is not None
needs_ray = pytest.mark.skipif(not HAVE_RAY, reason="Ray is not installed: pip install '.[ray]' (the dev extra has it)")
SHARD = 16  # items per shard: two forward passes of 8 images


@pytest.fixture(scope="module")
def mini(tmp_path_factory) -> Path:
    """24 real images with their captions, and one corrupt image with a caption of its own."""
    root = make_mini_dataset(tmp_path_factory.mktemp("ray_mini"), {"train": 16, "test": 8})
    (root / "images" / "zz_corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with (root / "captions.csv").open("a") as f:
        f.write("zz_corrupt.jpg,a picture that does not decode\n")
    return root


@pytest.fixture(scope="module")
def loopback_only():
    """This thread (and the processes and threads it starts) in a new network namespace whose
    only interface, loopback, is up; back to the original one afterwards. Needs CAP_SYS_ADMIN
    (root): without it, nothing changes. Yields the address nodes should bind to."""
    libc = ctypes.CDLL(None, use_errno=True)
    original = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        if libc.unshare(0x40000000) != 0:  # CLONE_NEWNET
            yield None
            return
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:  # ip link set lo up
            flags = struct.unpack("16sH", fcntl.ioctl(s, 0x8913, struct.pack("16sH", b"lo", 0)))[1]  # SIOCGIFFLAGS
            fcntl.ioctl(s, 0x8914, struct.pack("16sH", b"lo", flags | 1))  # SIOCSIFFLAGS, IFF_UP
        try:
            yield "127.0.0.1"
        finally:
            assert libc.setns(original, 0x40000000) == 0, f"setns: errno {ctypes.get_errno()}"
    finally:
        os.close(original)


@pytest.fixture(scope="module")
def cluster(loopback_only):
    """A head and a worker node of one CPU each on this machine; yields the head's address."""
    if not HAVE_RAY:
        pytest.skip("Ray is not installed")
    from ray.cluster_utils import Cluster

    node = {"num_cpus": 1, "object_store_memory": 200 * 1024 * 1024}
    if loopback_only:
        node["node_ip_address"] = loopback_only
    nodes = Cluster(initialize_head=True, connect=False, head_node_args={**node, "include_dashboard": False})
    try:
        nodes.add_node(**node)
        nodes.wait_for_nodes()
        yield nodes.address
    finally:
        nodes.shutdown()


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


@needs_ray
@pytest.mark.dataset
def test_ray_build_matches_single_process_build(mini, cluster, reference, default_model, tmp_path, monkeypatch):
    from index_builder.build import BuildConfig, build

    monkeypatch.setenv("RAY_ADDRESS", cluster)
    out = tmp_path / "index"
    build(
        BuildConfig(out=str(out), dataset=str(mini), shard_size=SHARD, progress=False, ray="auto"), loaded=default_model
    )
    manifest = assert_same_index(out, reference)
    expected, _ = published(reference)
    assert manifest["report"]["counts"] == expected["report"]["counts"]
    assert [s["item"] for s in manifest["report"]["skipped"]] == ["zz_corrupt.jpg"]
    assert manifest["report"]["config"]["ray"] == "auto"


@needs_ray
@pytest.mark.dataset
def test_killed_ray_build_resumes_from_its_shards(mini, cluster, reference, default_model, tmp_path):
    from index_builder.build import BuildConfig, build

    out = tmp_path / "index"
    env = {
        **os.environ,
        "RAY_ADDRESS": cluster,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    # shards of one forward pass (8 images), so that most are still to come when the first appears
    argv = [
        sys.executable,
        "-m",
        "index_builder",
        "-q",
        "build",
        "--out",
        str(out),
        "--dataset",
        str(mini),
        "--shard-size",
        "8",
        "--no-progress",
        "--ray",
        "auto",
    ]
    driver = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    try:
        while not list(out.glob(".work-*/images/shard-*.npz")):
            assert driver.poll() is None, f"the build ended before it could be killed:\n{driver.stderr.read().decode()}"
            assert time.monotonic() < deadline, "no shard written in 300 s"
            time.sleep(0.05)
        driver.send_signal(signal.SIGKILL)  # the driver, mid-encode
    finally:
        driver.kill()
        driver.wait()
    assert not (out / "CURRENT").exists(), "the killed build published nothing"
    written: set[str] = set()  # items in the shards the killed build left (its actors may still add some)
    for path in out.glob(".work-*/images/shard-*.npz"):
        with np.load(path) as z:
            written.update(z["sha"].tolist() + z["bad_sha"].tolist())
    assert written

    manifest = build(
        BuildConfig(out=str(out), dataset=str(mini), shard_size=8, progress=False, ray=cluster), loaded=default_model
    )
    counts = manifest["report"]["counts"]
    expected = published(reference)[0]["report"]["counts"]
    good, bad = expected["images_encoded"], expected["images_skipped"]
    assert counts["images_resumed"] >= len(written), "every item in a finished shard is reused"
    # and the rest encoded once: resumed + encoded now = all, less the bad files found now (not counted as encoded)
    assert good <= counts["images_resumed"] + counts["images_encoded"] <= good + bad
    assert counts["images_encoded"] < good
    assert_same_index(out, reference)


@needs_ray
@pytest.mark.dataset
def test_ray_workers_refuse_a_model_other_than_the_drivers(mini, cluster, default_model, tmp_path):
    """Vectors of two models never share a work directory: an actor whose model differs from the
    driver's (here the driver's is changed in memory) fails the build with one typed error."""
    import copy

    from index_builder.build import BuildConfig, build
    from retrieval.errors import FingerprintMismatchError

    model, preprocess, tokenizer = default_model
    changed = copy.deepcopy(model)
    with torch.no_grad():
        next(changed.parameters()).add_(1e-3)
    out = tmp_path / "index"
    with pytest.raises(FingerprintMismatchError, match="every node needs the same model") as raised:
        build(
            BuildConfig(out=str(out), dataset=str(mini), progress=False, ray=cluster),
            loaded=(changed, preprocess, tokenizer),
        )
    assert len(str(raised.value).splitlines()) == 1
    assert not list(out.glob(".work-*/*/shard-*.npz"))


def test_ray_flag_without_ray_is_one_clear_error(mini, tmp_path, monkeypatch, capsys):
    from index_builder.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError, as without Ray installed
    monkeypatch.delitem(sys.modules, "index_builder.ray_encode", raising=False)
    assert main(["build", "--out", str(tmp_path / "index"), "--dataset", str(mini), "--ray"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "--ray needs Ray Data, which is not installed" in err and "pip install" in err
    assert not (tmp_path / "index").exists(), "nothing was started"
