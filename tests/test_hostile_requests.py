"""Requests built to hurt the server, each against a real server (or the real decoding path in a
fresh process): images whose cost would explode, clients that give up, replies too large to
send, bytes that are not a request, vectors that overflow, and messages that would leak host paths.
Each gets its status, costs what a normal request costs, and the server keeps serving."""

from __future__ import annotations

import asyncio
import io
import logging
import os
import platform
import re
import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import torch
from conftest import build_index
from PIL import Image

from retrieval.client import RetrievalClient, search_request
from retrieval.encoding.images import MAX_ASPECT, load_image
from retrieval.errors import BatchItemError, DeadlineExceededError, IndexCorruptError
from retrieval.pb import retrieval_pb2 as pb
from retrieval.serving.config import Limits
from retrieval.serving.encoder import cached_model
from retrieval.serving.engine import Engine
from retrieval.serving.server import MiB, ServeConfig, ServerThread
from retrieval.serving.status import status_for

pytestmark = pytest.mark.dataset
MODEL = os.environ.get("RETRIEVAL_TEST_MODEL", "lite0-minilm")
INVALID = grpc.StatusCode.INVALID_ARGUMENT
SEARCH = "/retrieval.v1.RetrievalService/Search"


def png(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("L", (width, height), 128).save(out, "PNG")
    return out.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height RGB pixels and holds none: a few bytes, a huge promise."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )


@pytest.fixture(scope="module")
def index_root(flickr_mini, tmp_path_factory):

    root = tmp_path_factory.mktemp("hostile") / "index"
    build_index(root, "--dataset", str(flickr_mini), "--split", "dev", "--model", MODEL)
    return root


@pytest.fixture(scope="module")
def bundle():
    return cached_model(MODEL)


@pytest.fixture(scope="module")
def server(index_root, bundle):
    # 1 MiB messages: small enough that a batch of searches can ask for more than fits
    with ServerThread(ServeConfig(index=str(index_root), port=0, metrics_port=-1, max_message_mb=1.0)) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with RetrievalClient(server.address, timeout=60) as c:
        yield c


def photo(flickr_mini, i: int = 0) -> bytes:
    return sorted((flickr_mini / "images").iterdir())[i].read_bytes()


# -- 2. bounded cost for every image -------------------------------------------------------------------

RSS_PROBE = r"""
import io, resource, sys
from pathlib import Path
import torch
from PIL import Image
from open_clip.transform import image_transform
from retrieval.errors import InvalidInputError
from retrieval.encoding.images import ImageFileDataset, load_image, split_transform

prepare = split_transform(image_transform(224, is_train=False))[0]  # the per-image steps the server runs
peak_mb = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
big = io.BytesIO()
Image.effect_noise((1600, 1200), 64).convert("RGB").save(big, "PNG")
prepare(load_image(big.getvalue(), min_side=224))  # a normal large photo first: the baseline
before = peak_mb()
placeholder = torch.zeros(224, 224, 3, dtype=torch.uint8)
for path in map(Path, sys.argv[1:]):
    try:  # the server's path (bytes), then the builder's (a file in a DataLoader dataset)
        pixels = prepare(load_image(path.read_bytes(), min_side=224))
    except InvalidInputError as e:
        print(path.stem, "refused:", e)
    else:
        _, from_file, error = ImageFileDataset([path], prepare, 224, placeholder)[0]
        assert error == "" and torch.equal(from_file, pixels), error
        print(path.stem, tuple(pixels.shape))
print(peak_mb() - before)
"""


@pytest.mark.skipif(platform.system() != "Linux", reason="ru_maxrss is in KiB on Linux")
def test_thin_and_bomb_images_cost_bounded_memory(tmp_path):
    """Decoded and preprocessed as the server and the builder do, in a fresh process (peak RSS is
    per process). Before the bound, the 20000x1 PNG (99 bytes) resized to 4,480,000x224 pixels:
    +4 GB and half a minute."""
    images = {
        "20000x1": png(20000, 1),
        "1x20000": png(1, 20000),
        "60000x60000": png_header(60000, 60000),
        "9000x9000": png_header(9000, 9000),
    }
    for name, data in images.items():
        (tmp_path / f"{name}.png").write_bytes(data)
    run = subprocess.run(
        [sys.executable, "-c", RSS_PROBE, *(str(tmp_path / f"{n}.png") for n in images)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    *lines, growth = run.stdout.strip().splitlines()
    assert lines[:2] == ["20000x1 (224, 224, 3)", "1x20000 (224, 224, 3)"]  # cropped to 4:1, then as usual
    assert lines[2].startswith("60000x60000 refused: image bytes: the header declares too many pixels")  # PIL's bound
    assert lines[3] == (
        "9000x9000 refused: image bytes: the header declares 9000x9000 pixels, over the limit of 64,000,000"
    )
    assert float(growth) < 100, f"peak RSS grew {growth} MB beyond a normal large photo's"


@pytest.mark.parametrize(
    "size",
    [(640, 480), (480, 640), (1920, 1080), (2340, 1080), (2520, 1080), (3840, 1080), (4 * 300, 300), (300, 4 * 300)],
)
def test_usual_formats_decode_bit_for_bit_as_before(bundle, flickr_mini, size):
    """Up to MAX_ASPECT:1, nothing is cropped: the pixels, and the encoder's input, are the full decode's."""
    _, preprocess, _ = bundle
    out = io.BytesIO()
    Image.open(io.BytesIO(photo(flickr_mini))).resize(size).save(out, "PNG")
    data = out.getvalue()
    full = Image.open(io.BytesIO(data)).convert("RGB")
    bounded = load_image(data, min_side=224)
    assert bounded.size == size and np.array_equal(np.asarray(bounded), np.asarray(full))
    assert torch.equal(preprocess(bounded), preprocess(full))


@pytest.mark.parametrize("size", [(1600, 300), (300, 2000), (30000, 7)])
def test_longer_images_are_center_cropped_to_the_same_view(bundle, flickr_mini, size):
    """Beyond MAX_ASPECT:1 the long side is cropped around the center the encoder keeps anyway:
    its input differs from the uncropped resize's by resampling rounding only."""
    _, preprocess, _ = bundle
    out = io.BytesIO()
    Image.open(io.BytesIO(photo(flickr_mini))).resize(size).save(out, "PNG")
    bounded = load_image(out.getvalue(), min_side=224)
    short = min(size)
    assert sorted(bounded.size) == [short, MAX_ASPECT * short]
    full = Image.open(io.BytesIO(out.getvalue())).convert("RGB")
    assert (preprocess(bounded) - preprocess(full)).abs().mean() < 0.01  # of a [-1, 1] range


def test_bomb_and_thin_images_at_once_do_not_stall_the_server(client):
    stub = client.stub
    images = {
        "20000x1": png(20000, 1),
        "1x20000": png(1, 20000),
        "60000x60000": png_header(60000, 60000),
        "9000x9000": png_header(9000, 9000),
    }
    calls = {name: stub.Search.future(search_request(image=data, k=3), timeout=120) for name, data in images.items()}
    text = stub.Search(search_request(text="a dog runs on the grass", k=3), timeout=120)
    assert len(text.results) == 3
    for name in ("20000x1", "1x20000"):
        assert len(calls[name].result().results) == 3
    for name in ("60000x60000", "9000x9000"):
        with pytest.raises(grpc.RpcError) as err:
            calls[name].result()
        assert err.value.code() == INVALID and "pixels" in err.value.details(), err.value.details()
    assert len(client.search_text("two children play", k=2)) == 2


# -- 3. a client's deadline stops its work ---------------------------------------------------------------


class GatedModel:
    """The real model, whose image encoder waits at a gate and counts the images it encodes."""

    def __init__(self, model):
        self._model, self.gate, self.busy, self.encoded = model, threading.Event(), threading.Event(), 0

    def __getattr__(self, name):
        return getattr(self._model, name)

    def encode_image(self, pixels):
        self.busy.set()
        assert self.gate.wait(120), "the test never opened the gate"
        self.encoded += len(pixels)
        return self._model.encode_image(pixels)


def wait_until(condition, what: str, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_a_request_whose_deadline_passed_is_never_encoded(index_root, bundle, flickr_mini):
    gated = GatedModel(bundle[0])
    cfg = ServeConfig(index=str(index_root), port=0, metrics_port=-1, image_concurrency=1)
    with (
        ServerThread(cfg, model_loader=lambda name: (gated, *bundle[1:])) as srv,
        RetrievalClient(srv.address, timeout=120) as c,
    ):
        busy = c.stub.Search.future(search_request(image=photo(flickr_mini, 0), k=2), timeout=120)
        assert gated.busy.wait(60)  # the only encoder slot is taken
        with pytest.raises(grpc.RpcError) as err:
            c.stub.Search(search_request(image=photo(flickr_mini, 1), k=2), timeout=0.5)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        count = srv.server.metrics.registry.get_sample_value
        wait_until(
            lambda: any(
                count("retrieval_requests_total", {"method": "Search", "code": code})
                for code in ("CANCELLED", "DEADLINE_EXCEEDED")
            ),
            "the server to give the call up",
        )
        gated.gate.set()
        assert len(busy.result().results) == 2
        assert len(c.search_image(photo(flickr_mini, 2), k=2)) == 2
    assert gated.encoded == 2  # the first and the last: the abandoned one was dropped, not encoded


def test_the_engine_stops_a_request_its_caller_gave_up(index_root, bundle, flickr_mini, monkeypatch):
    """The engine knows no gRPC: it asks a callable whether the caller still waits, before
    decoding and when the encoder's batch is formed."""
    import retrieval.serving.encoder

    decoded = []
    monkeypatch.setattr(
        retrieval.serving.encoder, "load_image", lambda *a, **kw: decoded.append(1) or load_image(*a, **kw)
    )
    gated = GatedModel(bundle[0])
    gated.gate.set()
    executor = ThreadPoolExecutor(2)
    engine = Engine(index_root, Limits(), executor, model_loader=lambda name: (gated, *bundle[1:]))
    assert engine.load()
    image = photo(flickr_mini)
    answers = iter([True])  # alive for the decode, gone by the time the encoder's batch forms

    async def main():  # one event loop: the batchers live on it
        with pytest.raises(DeadlineExceededError):
            await engine.search(image, alive=lambda: False)
        assert (decoded, gated.encoded) == ([], 0)
        with pytest.raises(DeadlineExceededError):
            await engine.search(image, alive=lambda: next(answers, False))
        assert (decoded, gated.encoded) == ([1], 0)
        hits, _ = await engine.search(image, alive=lambda: True)
        assert hits and gated.encoded == 1

    asyncio.run(main())
    executor.shutdown()


# -- 4. a reply too large to send is refused before any work ---------------------------------------------


def test_a_batch_whose_reply_cannot_fit_is_refused_before_any_work(server, client):
    count = server.server.metrics.registry.get_sample_value
    encoded = lambda: count("retrieval_encoder_batch_size_count", {"modality": "text"}) or 0  # noqa: E731
    before = encoded()
    queries = [search_request(text=f"a dog number {i}", k=1000, target="text") for i in range(256)]
    with pytest.raises(grpc.RpcError) as err:
        client.batch_search(queries)
    assert err.value.code() == INVALID, err.value.details()
    assert f"over the server's limit of {MiB:,} bytes" in err.value.details()
    assert encoded() == before, "nothing was encoded"
    assert len(client.batch_search(queries[:4])) == 4  # a batch that fits is answered


def test_the_reply_bound_is_never_below_a_real_reply(server, client, flickr_mini):
    engine = server.server.engine
    index = engine.live().index
    vec = client.embed_text("a dog")
    for requests, asks in [
        ([search_request(text="a dog", k=1000)], [("image", 1000)]),
        ([search_request(image=photo(flickr_mini), k=1000)], [("text", 1000)]),
        ([search_request(embedding=vec, target="text", k=1000)] * 3, [("text", 1000)] * 3),
    ]:
        reply = client.stub.BatchSearch(pb.BatchSearchRequest(requests=requests), timeout=60)
        bound = server._call(engine.reply_bytes(index, asks))
        assert reply.ByteSize() <= bound < 3 * reply.ByteSize(), (reply.ByteSize(), bound)


# -- 5. every malformed request gets INVALID_ARGUMENT ------------------------------------------------------


def raw_call(address: str, method: str, data: bytes):
    with grpc.insecure_channel(address) as channel:
        return channel.unary_unary(method)(data, timeout=30)


def test_bytes_that_are_not_a_request_are_invalid_argument_without_a_traceback(server, client, caplog):
    bad_utf8 = pb.SearchRequest(query=pb.Query(text="a dog"), k=3).SerializeToString().replace(b"a dog", b"a \xff\xfeg")
    cases = {
        SEARCH: [b"\xff\xff\xff\xff", b"\x0a\x05\x0a\x03\xff\xfe\xfd", bad_utf8, b"\x1a\x02\x08"],
        "/retrieval.v1.RetrievalService/Embed": [b"\x0a\x02\xc3\x28"],
        "/retrieval.v1.RetrievalService/BatchSearch": [b"\x0a\x04" + bad_utf8[:4], b"\x0a"],
    }
    with caplog.at_level(logging.DEBUG):
        for method, payloads in cases.items():
            for data in payloads:
                with pytest.raises(grpc.RpcError) as err:
                    raw_call(server.address, method, data)
                assert err.value.code() == INVALID, (method, data, err.value.code(), err.value.details())
                assert err.value.details().startswith("malformed request"), err.value.details()
        assert len(client.search_text("a man in a red shirt", k=2)) == 2
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR], caplog.text
    assert "Traceback" not in caplog.text


def test_huge_finite_embeddings_rank_as_their_direction(client):
    vec = client.embed_text("a dog jumps over a fence")
    expected = client.search_embedding(vec, target="image", k=5, modality="text")
    huge = client.search_embedding(vec * 1e30, target="image", k=5, modality="text")  # its norm overflows float32
    assert [r.id for r in huge] == [r.id for r in expected]
    np.testing.assert_allclose([r.score for r in huge], [r.score for r in expected], atol=1e-5)
    ones = client.search_embedding(np.full(256, 1e30), target="text", k=3)
    assert [r.id for r in ones] == [r.id for r in client.search_embedding(np.ones(256), target="text", k=3)]
    assert all(r.score != 0.0 for r in ones)


def test_a_failing_batch_item_is_named_by_its_position(client):
    queries = [search_request(text="a dog", k=2)] * 3 + [
        search_request(image=b"GIF89a not an image", k=2),
        search_request(text="a cat", k=2),
    ]
    with pytest.raises(grpc.RpcError) as err:
        client.batch_search(queries)
    assert err.value.code() == INVALID and err.value.details().startswith("requests[3]: image bytes"), (
        err.value.details()
    )


def test_every_kind_of_batch_item_error_names_its_position(caplog):
    with caplog.at_level(logging.ERROR):
        code, message = status_for(BatchItemError(5, RuntimeError("boom at /srv/secret")), "BatchSearch")
    assert code == grpc.StatusCode.INTERNAL and message.startswith("requests[5]: internal server error")
    assert "boom" in caplog.text and "secret" not in message  # the log has the cause, the client the position
    code, message = status_for(BatchItemError(1, DeadlineExceededError("gone")), "BatchSearch")
    assert (code, message) == (grpc.StatusCode.DEADLINE_EXCEEDED, "requests[1]: gone")


# -- 10. nothing about the host reaches a client -------------------------------------------------------------

HOST_PATH = re.compile(r"(^|[\s'\"(])/\w")


def test_an_unavailable_index_names_no_host_path(tmp_path, bundle):
    root = tmp_path / "private" / "index-root"
    cfg = ServeConfig(index=str(root), port=0, metrics_port=-1, model=MODEL)
    with ServerThread(cfg) as srv, RetrievalClient(srv.address, timeout=30) as c:
        for call in (lambda: c.search_text("a dog"), lambda: c.index_info(), lambda: c.embed_text("a dog")):
            with pytest.raises(grpc.RpcError) as err:
                call()
            details = err.value.details()
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "no index version" in details
            assert "private" not in details and not HOST_PATH.search(details), details


def test_index_errors_reach_clients_with_file_names_only(tmp_path):
    path = tmp_path / "srv" / "index" / "v0003" / "images.faiss"
    code, message = status_for(
        IndexCorruptError(f"{path} is missing or does not match its checksum; cannot read '{path.parent.parent}'"),
        "Search",
    )
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert message == "v0003/images.faiss is missing or does not match its checksum; cannot read 'index'"
