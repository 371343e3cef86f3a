"""Filters and pages on a live server over a real Flickr8k build whose captions file carries extra
columns and whose --attributes file carries per-image ones (generated deterministically here).
A filtered search answers exactly what an exact search over the matching items answers (the same
ids, k of them whenever k match); every bad filter or page token gets its status; pages chain to
the whole ranking; a token outlives no swap."""

from __future__ import annotations

import base64
import csv
import datetime as dt
import json
import shlex
import shutil
import subprocess
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import build_index

from retrieval.client import RetrievalClient, search_request
from retrieval.client import filters as F
from retrieval.serving.encoder import cached_model
from retrieval.serving.server import ServeConfig, ServerThread
from retrieval.store.layout import CURRENT
from retrieval.store.reader import IndexVersion
from retrieval.store.vectors import query_rows

pytestmark = pytest.mark.dataset
MODEL = "lite0-minilm"
CAMERAS = ("Canon", "Nikon", "Sony", "Fuji")
INVALID, STALE = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION
QUERIES = ("a dog runs on the grass", "children playing in the water")


def image_attrs(i: int) -> dict:
    """The attributes of the i-th image (sorted by name): some from the captions file, some from --attributes."""
    return {
        "camera": CAMERAS[i % 4],
        "year": 2000 + i % 16,
        "taken": (dt.date(2010, 1, 1) + dt.timedelta(i)),
        "iso": 100 * (1 + i % 8),
        "place": "indoor" if i % 3 == 0 else "outdoor",
    }


@pytest.fixture(scope="module")
def collection(flickr_mini, tmp_path_factory) -> tuple[Path, Path, list[str]]:
    """A captions folder with the mini test split's images, its captions.csv with camera, year, taken
    (per image) and ordinal (per caption) columns, and attributes.jsonl with iso and place."""
    src = tmp_path_factory.mktemp("filtered") / "photos"
    (src / "img").mkdir(parents=True)
    names = sorted((flickr_mini / "splits" / "test.txt").read_text().split())
    for name in names:
        shutil.copyfile(flickr_mini / "images" / name, src / "img" / name)
    with (flickr_mini / "captions.csv").open(newline="") as f:
        captions = [r for r in csv.DictReader(f) if r["image"] in set(names)]
    seen: dict[str, int] = {}
    with (src / "captions.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption", "camera", "year", "taken", "ordinal"])
        for r in captions:
            a = image_attrs(names.index(r["image"]))
            seen[r["image"]] = seen.get(r["image"], -1) + 1
            w.writerow(
                [f"img/{r['image']}", r["caption"], a["camera"], a["year"], a["taken"].isoformat(), seen[r["image"]]]
            )
    attributes = src.parent / "attributes.jsonl"
    attributes.write_text(
        "".join(
            json.dumps({"image": f"img/{n}", "iso": image_attrs(i)["iso"], "place": image_attrs(i)["place"]}) + "\n"
            for i, n in enumerate(names)
        )
    )
    return src, attributes, names


def build(root: Path, src: Path, attributes: Path) -> None:

    build_index(root, "--captions", str(src / "captions.csv"), "--attributes", str(attributes), "--model", MODEL)


@pytest.fixture(scope="module")
def index_root(collection, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("filtered-index") / "index"
    build(root, *collection[:2])
    return root


@pytest.fixture(scope="module")
def client(index_root):
    cached_model(MODEL)
    srv = ServerThread(
        ServeConfig(index=str(index_root), port=0, metrics_port=0, max_k=50, watch_interval_s=0.2)
    ).start()
    with RetrievalClient(srv.address, timeout=60) as c:
        yield c
    srv.stop(grace=0)


@pytest.fixture(scope="module")
def version(index_root):
    v = IndexVersion.open(index_root)
    yield v
    v.close()


def image_ids(version: IndexVersion) -> dict[str, int]:
    """image file name -> its id in the index"""
    return {row["uri"].split("/")[-1]: i for i, row in zip(*_all(version, "image"))}


def _all(version: IndexVersion, modality: str):
    table = "images" if modality == "image" else "texts"
    ids = [r[0] for r in version._db.execute(f"SELECT id FROM {table}")]
    return ids, version.metadata(modality, ids)


def exact_top(version: IndexVersion, client, text: str, target: str, allowed: list[int], k: int) -> list[int]:
    """The top k of an exact search over the allowed items' stored vectors (numpy, no FAISS search)."""
    q = client.embed_text(text)[None]
    rows = query_rows(q / np.linalg.norm(q), cross_modal=target == "image")
    vecs = version.indexes[target].reconstruct_batch(np.asarray(allowed, np.int64))
    order = np.argsort(-(vecs @ rows[0]), kind="stable")[:k]
    return [allowed[i] for i in order]


CASES = {  # name: (filters, which image indices match)
    "equals": ([F.eq("camera", "Canon")], lambda a: a["camera"] == "Canon"),
    "any_of": ([F.any_of("camera", ["Nikon", "Fuji"])], lambda a: a["camera"] in ("Nikon", "Fuji")),
    "number range": ([F.between("year", 2003, 2008)], lambda a: 2003 <= a["year"] <= 2008),
    "open range": ([F.between("iso", None, 300)], lambda a: a["iso"] <= 300),
    "date range": (
        [F.between("taken", dt.date(2010, 1, 5), dt.date(2010, 1, 20))],
        lambda a: dt.date(2010, 1, 5) <= a["taken"] <= dt.date(2010, 1, 20),
    ),
    "date-time bound": (
        [F.between("taken", F.date_value("2010-01-03T12:00:00Z"))],
        lambda a: a["taken"] >= dt.date(2010, 1, 4),
    ),
    "two filters": (
        [F.eq("place", "indoor"), F.between("year", 2004)],
        lambda a: a["place"] == "indoor" and a["year"] >= 2004,
    ),
    "none match": ([F.eq("camera", "Leica")], lambda a: False),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("k", [5, 20])
def test_filtered_image_search_equals_exact_search_over_the_matching_images(client, version, collection, case, k):
    filters, holds = CASES[case]
    names = collection[2]
    ids = image_ids(version)
    allowed = sorted(ids[n] for i, n in enumerate(names) if holds(image_attrs(i)))
    for text in QUERIES:
        got = [h.id for h in client.search_text(text, k=k, filters=filters)]
        assert len(got) == min(k, len(allowed))  # k back whenever k match
        assert got == (exact_top(version, client, text, "image", allowed, k) if allowed else [])


def test_caption_attributes_filter_captions_and_captions_inherit_their_image_attributes(client, version, collection):
    ids, rows = _all(version, "text")
    names = collection[2]
    with (collection[0] / "captions.csv").open(newline="") as f:
        written = {(r["image"], r["caption"]): int(r["ordinal"]) for r in csv.DictReader(f)}
    owner = {i: row["image_uri"].split("/")[-1] for i, row in zip(ids, rows)}
    ordinal = {i: written[(row["image_uri"], row["caption"])] for i, row in zip(ids, rows)}
    filters = [F.eq("ordinal", 0), F.eq("camera", "Sony")]
    allowed = sorted(i for i in ids if ordinal[i] == 0 and image_attrs(names.index(owner[i]))["camera"] == "Sony")
    got = [h.id for h in client.search_text(QUERIES[0], k=10, target="text", filters=filters)]
    assert len(got) == min(10, len(allowed)) and got == exact_top(version, client, QUERIES[0], "text", allowed, 10)


def test_filter_fields_and_their_types(client, version):
    assert list(client.index_info().filter_fields) == ["camera", "iso", "ordinal", "place", "taken", "year"]
    assert version.filter_fields == {
        "camera": "string",
        "iso": "number",
        "ordinal": "number",
        "place": "string",
        "taken": "date",
        "year": "number",
    }


BAD = {
    "unknown field": ([F.eq("lens", "50mm")], "'lens'"),
    "string for a number": ([F.eq("year", "2004")], "'year'"),
    "number for a string": ([F.eq("camera", 3)], "'camera'"),
    "number for a date": ([F.between("taken", 2010)], "'taken'"),
    "not a date": ([F.between("taken", F.date_value("last tuesday"))], "'taken'"),
    "empty any_of": ([F.any_of("camera", [])], "'camera'"),
    "min above max": ([F.between("year", 2010, 2001)], "'year'"),
    "range on strings": ([F.between("camera", "A", "M")], "'camera'"),
    "no condition": ([F.pb.Filter(field="camera")], "'camera'"),
    "no field": ([F.pb.Filter(equals=F.value("Canon"))], "no field name"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_filters_are_invalid_argument_naming_the_field(client, case):
    filters, named = BAD[case]
    with pytest.raises(grpc.RpcError) as e:
        client.search_text(QUERIES[0], k=5, filters=filters)
    assert e.value.code() == INVALID and named in e.value.details()


def pages(client, request) -> list[list[int]]:
    out, token = [], ""
    while True:
        request.page_token = token
        hits, token = client.search_page(request)
        out.append([h.id for h in hits])
        if not token:
            return out


@pytest.mark.parametrize("filters", [[], [F.between("year", 2002, 2012)]], ids=["all", "filtered"])
def test_pages_chain_to_the_whole_ranking(client, filters):
    whole = [h.id for h in client.search_text(QUERIES[1], k=50, filters=filters)]
    chained = pages(client, search_request(text=QUERIES[1], k=0, page_size=7, filters=filters))
    assert [len(p) for p in chained[:-1]] == [7] * (len(chained) - 1) and 0 < len(chained[-1]) <= 7
    assert sum(chained, []) == whole
    bounded = pages(client, search_request(text=QUERIES[1], k=10, page_size=4, filters=filters))
    assert bounded == [whole[:4], whole[4:8], whole[8:10]]  # k bounds the ranking the pages cover


def _token(client, **kw) -> str:
    _, token = client.search_page(search_request(text=QUERIES[0], k=0, page_size=3, **kw))
    assert token
    return token


def test_bad_page_tokens_are_invalid_argument(client):
    token = _token(client)
    doc = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    forged = base64.urlsafe_b64encode(json.dumps({**doc, "o": "3"}).encode()).decode()
    for bad, says in (
        (token[:-3] + "!!!", "not a token"),
        ("eyJ2Ijoi", "not a token"),
        (forged, "not a token"),
        (token, "another request"),
    ):
        req = search_request(text=QUERIES[1] if bad == token else QUERIES[0], k=0, page_size=3, page_token=bad)
        with pytest.raises(grpc.RpcError) as e:
            client.search_page(req)
        assert e.value.code() == INVALID and says in e.value.details(), bad
    with pytest.raises(grpc.RpcError) as e:  # the same query with another filter is another request
        client.search_page(
            search_request(text=QUERIES[0], k=0, page_size=3, page_token=token, filters=[F.eq("camera", "Canon")])
        )
    assert e.value.code() == INVALID
    with pytest.raises(grpc.RpcError) as e:
        client.search_page(search_request(text=QUERIES[0], k=0, page_size=-1))
    assert e.value.code() == INVALID


def test_a_page_token_after_a_swap_is_failed_precondition(index_root, tmp_path):
    root = tmp_path / "index"
    shutil.copytree(index_root, root)
    srv = ServerThread(ServeConfig(index=str(root), port=0, metrics_port=0, watch_interval_s=0.1)).start()
    try:
        with RetrievalClient(srv.address, timeout=60) as client:
            token = _token(client)
            shutil.copytree(root / "v0001", root / "v0002")  # a new version (the same items) is published
            (root / f"{CURRENT}.new").write_text("v0002\n")
            (root / f"{CURRENT}.new").rename(root / CURRENT)
            req = search_request(text=QUERIES[0], k=0, page_size=3, page_token=token)
            # the server polls CURRENT every 0.1 s: it swaps within a few polls. Until then the token
            # works; the first call after the swap is refused (no separate "has it swapped?" check
            # before each call: the swap may fall between the two)
            refused = None
            for _ in range(600):
                try:
                    client.search_page(req)
                except grpc.RpcError as e:
                    refused = e
                    break
                time.sleep(0.01)
            assert refused is not None, "the server never swapped to v0002"
            assert refused.code() == STALE and "v0001" in refused.details() and "v0002" in refused.details()
            assert client.index_info().version == "v0002"
    finally:
        srv.stop(grace=0)


def test_query_cli_filters_and_pages(client, capsys):
    from retrieval.cli import main

    query = ["query", "--address", client.address, "--text", QUERIES[0], "--filter", "camera=Canon|Sony"]
    query += ["--filter", "year>=2004", "--page-size", "2", "--k", "3", "--json"]
    assert main(query) == 0
    out = capsys.readouterr()
    first = json.loads(out.out)
    token = out.err.split("--page-token ")[1].split()[0]
    assert main([*query, "--page-token", token]) == 0
    out = capsys.readouterr()
    assert "(last page)" in out.err
    whole = client.search_text(
        QUERIES[0], k=3, filters=[F.any_of("camera", ["Canon", "Sony"]), F.between("year", 2004)]
    )
    assert [r["id"] for r in first + json.loads(out.out)] == [h.id for h in whole]
    assert main(["query", "--address", client.address, "--text", "x", "--filter", "lens=50"]) == 1
    err = capsys.readouterr().err
    assert "INVALID_ARGUMENT" in err and "'lens'" in err


def test_readme_filter_grpcurl_examples_work(client):
    """The README's grpcurl lines with filters, run as written (but for the address) against this
    index, whose fields they name; they answer what the Python client does."""
    from google.protobuf import json_format
    from test_server import grpcurl_binary  # pytest imports test modules by their base name

    from retrieval.pb import retrieval_pb2 as pb

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    commands = [
        shlex.split(line) for line in readme.splitlines() if line.startswith("grpcurl ") and '"filters"' in line
    ]
    assert len(commands) >= 2
    for argv in commands:
        run = subprocess.run(
            [grpcurl_binary(), *argv[1:-2], client.address, argv[-1]], capture_output=True, text=True, timeout=60
        )
        assert run.returncode == 0, f"{argv}: {run.stderr}"
        request = json_format.Parse(argv[argv.index("-d") + 1], pb.SearchRequest())
        assert [int(r["id"]) for r in json.loads(run.stdout)["results"]] == [h.id for h in client.search(request)]


@pytest.mark.parametrize("percent", [1, 10, 100])
def test_search_within_an_hnsw_index_finds_the_matching_top_k(percent):
    """On an approximate index: exact below 5% of the gallery, the IDSelector walk (efSearch scaled by
    the share allowed) above; k results whenever k match, and the exact top k (a recall floor above)."""
    import faiss

    from retrieval.store.vectors import search_within, with_bias

    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((4000, 32)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    ids = rng.choice(1 << 62, size=len(vecs), replace=False).astype(np.int64)
    index = faiss.IndexIDMap2(faiss.index_factory(33, "HNSW16,Flat", faiss.METRIC_INNER_PRODUCT))
    index.add_with_ids(with_bias(vecs, np.zeros(len(vecs), np.float32)), ids)
    faiss.downcast_index(index.index).hnsw.efSearch = 64
    allowed = np.sort(ids[:: 100 // percent])
    rows = query_rows(vecs[rng.integers(0, len(vecs), 20)] + 0.3, cross_modal=False)
    _, found = search_within(index, rows, 10, allowed)
    assert found.shape == (20, 10) and np.isin(found, allowed).all()
    mask = np.isin(ids, allowed)
    truth = ids[mask][np.argsort(-(vecs[mask] @ rows[:, :-1].T).T, axis=1)[:, :10]]
    recall = np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found.tolist(), truth.tolist())])
    assert recall == 1.0 if percent == 1 else recall >= 0.9, recall


def test_column_types_are_inferred_from_every_value():
    from retrieval.store.attributes import infer_type

    assert infer_type(["1", "2.5", "", "-3e2"]) == "number"
    assert infer_type(["2012-05-01", "2012-05-01T10:00:00+02:00", ""]) == "date"
    assert infer_type(["2012-05-01", "7"]) == "string" and infer_type(["nan"]) == "string"
    assert infer_type([]) == "string"
