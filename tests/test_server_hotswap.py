"""Hot swap: while a client loop keeps querying, the index builder publishes a new version; no
request fails, versions only move forward, and once the swap happened answers come from the new
version (its images and captions)."""

from __future__ import annotations

import os
import threading
import time

import grpc
import pytest
from conftest import build_index

from retrieval.client import RetrievalClient, search_request
from retrieval.serving.encoder import cached_model
from retrieval.serving.server import ServeConfig, ServerThread

pytestmark = pytest.mark.dataset
MODEL = os.environ.get("RETRIEVAL_TEST_MODEL", "lite0-minilm")


def build(root, dataset, split) -> None:
    build_index(root, "--dataset", str(dataset), "--split", split, "--model", MODEL)


def test_hot_swap_fails_no_request(flickr_mini, tmp_path):
    root = tmp_path / "index"
    build(root, flickr_mini, "dev")  # v0001: the 16 dev images
    old_images = set((flickr_mini / "splits" / "dev.txt").read_text().split())
    new_images = set((flickr_mini / "splits" / "test.txt").read_text().split())
    probe = (flickr_mini / "images" / sorted(new_images)[0]).read_bytes()
    cached_model(MODEL)

    log: list[tuple[str, str, set[str]]] = []  # (outcome, version, image names)
    failures: list[str] = []
    stop = threading.Event()

    def loop(client: RetrievalClient) -> None:
        deadline = time.monotonic() + 240  # bounded, whatever happens
        i = 0
        while time.monotonic() < deadline and not stop.is_set():
            try:
                if i % 2 == 0:
                    resp = client.stub.Search(search_request(text="a dog runs", k=5), timeout=30)
                    names = {r.uri.rsplit("/", 1)[-1] for r in resp.results}
                else:
                    resp = client.stub.Search(search_request(image=probe, k=5), timeout=30)
                    names = {r.image_uri.rsplit("/", 1)[-1] for r in resp.results}
                log.append(("ok", resp.index_version, names))
            except grpc.RpcError as e:
                failures.append(f"{e.code().name}: {e.details()}")
            i += 1
            if sum(v == "v0002" for _, v, _ in log) >= 20:
                return

    cfg = ServeConfig(index=str(root), port=0, metrics_port=-1, watch_interval_s=0.1)
    with ServerThread(cfg) as srv, RetrievalClient(srv.address, timeout=30) as client:
        worker = threading.Thread(target=loop, args=(client,))
        worker.start()
        while len(log) + len(failures) < 10 and worker.is_alive():
            time.sleep(0.05)
        before = len(log)
        build(root, flickr_mini, "test")  # v0002 published while the loop runs
        assert len(log) > before, "no query ran while the new version was being built and published"
        deadline = time.monotonic() + 60
        while client.index_info().version != "v0002":
            assert time.monotonic() < deadline, "the server did not swap to v0002"
            time.sleep(0.05)
        worker.join(240)
        stop.set()
        assert not worker.is_alive()

    assert failures == [], failures
    versions = [v for _, v, _ in log]
    assert versions[0] == "v0001" and versions[-1] == "v0002"
    first_new = versions.index("v0002")
    assert set(versions[first_new:]) == {"v0002"}, "a request was answered by the old version after the new one"
    assert len(log) - first_new >= 20
    for _, version, names in log:
        assert names <= (old_images if version == "v0001" else new_images), (version, names)
