"""Composed queries, more like this, Walk, caps and diversity on a live server over a real Flickr8k
build: each answer equals the same geometry done in-process on the stored vectors, and every bad
input gets its status and message."""

from __future__ import annotations

import asyncio
import json

import faiss
import grpc
import numpy as np
import pytest
from conftest import build_index

from retrieval.client import AsyncRetrievalClient, RetrievalClient, search_request
from retrieval.hits import ItemRef
from retrieval.serving.server import ServeConfig, ServerThread
from retrieval.sphere import compose as C
from retrieval.store.reader import IndexVersion

pytestmark = pytest.mark.dataset
MAX_K, MAX_TERMS, MAX_STEPS = 40, 4, 6
INVALID, NOT_FOUND = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND


@pytest.fixture(scope="module")
def index_root(flickr_mini, tmp_path_factory):

    root = tmp_path_factory.mktemp("compose") / "index"
    build_index(root, "--dataset", str(flickr_mini), "--split", "test")
    return root


@pytest.fixture(scope="module")
def server(index_root):
    srv = ServerThread(
        ServeConfig(
            index=str(index_root),
            port=0,
            metrics_port=-1,
            max_k=MAX_K,
            max_terms=MAX_TERMS,
            max_walk_steps=MAX_STEPS,
            rerank_pool=MAX_K,
        )
    ).start()
    yield srv
    srv.stop(grace=0)


@pytest.fixture(scope="module")
def client(server):
    with RetrievalClient(server.address) as c:
        yield c


@pytest.fixture(scope="module")
def index(index_root):
    idx = IndexVersion.open(index_root)
    yield idx
    idx.close()


def ids(hits) -> list[int]:
    return [h.id for h in hits]


def expect(status, call, *args, match: str = "", **kwargs):
    with pytest.raises(grpc.RpcError) as e:
        result = call(*args, **kwargs)
        list(result) if not isinstance(result, list) else result
    assert e.value.code() == status, e.value.details()
    assert match in e.value.details()


TEXTS = ["a dog runs on the grass", "a child in a red shirt", "people on a street"]


def test_one_term_is_the_plain_query(client):
    assert ids(client.search_composed([TEXTS[0]], k=10)) == ids(client.search_text(TEXTS[0], k=10))


@pytest.mark.parametrize("combine", ["geodesic", "linear"])
def test_composed_equals_the_geometry_on_the_embeddings(client, combine):
    terms = [(TEXTS[0], 2.0), (TEXTS[1], 1.0), (TEXTS[2], -1.0)]
    x = np.stack([client.embed_text(t) for t, _ in terms])
    w = np.array([w for _, w in terms])
    point = C.compose_geodesic(x, w) if combine == "geodesic" else C.compose_linear(x, w)
    got = client.search_composed(terms, k=10, combine=combine)
    want = client.search_embedding(point, target="image", k=10, modality="text")  # text majority: cross-modal
    assert ids(got) == ids(want)
    np.testing.assert_allclose([h.score for h in got], [h.score for h in want], atol=1e-5)


def test_geodesic_and_linear_differ_with_a_negative_term(client):
    terms = [(TEXTS[0], 1.0), ("grass", -1.0)]
    assert ids(client.search_composed(terms, k=20)) != ids(client.search_composed(terms, k=20, combine="linear"))


def test_more_like_this_is_the_stored_vector_without_the_item(client, index):
    first = client.search_text(TEXTS[0], k=1)[0]
    got = client.more_like_this(first.id, "image", k=8)
    assert first.id not in ids(got) and len(got) == 8
    vector = index.vectors("image", np.array([first.id]))[0]
    want = [h for h in client.search_embedding(vector, target="image", k=9) if h.id != first.id]
    assert ids(got) == ids(want)
    captions = client.more_like_this(first.id, "image", k=5, target="text")  # cross-modal: its captions may come
    assert ids(captions) == ids(client.search_embedding(vector, target="text", k=5, modality="image"))


def test_an_item_term_is_its_stored_vector_and_is_excluded(client, index):
    item = client.search_text(TEXTS[1], k=1)[0]
    got = client.search_composed([ItemRef(item.id, "image"), (TEXTS[1], 1.0)], target="image", k=10)
    assert item.id not in ids(got)
    x = np.stack([index.vectors("image", np.array([item.id]))[0], client.embed_text(TEXTS[1])])
    want = client.search_embedding(C.compose_geodesic(x, np.ones(2)), target="image", k=11)  # no majority: cosine
    assert ids(got) == [i for i in ids(want) if i != item.id][:10]


@pytest.mark.parametrize("target", ["image", "text"])
def test_a_cap_is_every_item_within_the_angle_ranked_as_the_search_ranks(client, index, target):
    query = TEXTS[0]
    vector = client.embed_text(query)
    every = faiss.vector_to_array(index.indexes[target].id_map)
    stored = index.rows(target, every)
    cos = stored[:, : index.dim] @ vector
    theta = float(np.degrees(np.arccos(np.sort(cos)[-16:-14])).mean())  # 15 items inside, none on the rim
    inside = np.flatnonzero(C.in_cap(cos, theta))
    rank = cos[inside] + (stored[inside, index.dim] if target == "image" else 0)  # text -> image: cross-modal
    want = every[inside[np.lexsort((every[inside], -rank))]]
    got = client.search_text(query, k=MAX_K, target=target, max_angle_deg=theta)
    assert ids(got) == want.tolist() and all(h.angle_deg <= theta + 1e-3 for h in got)
    assert ids(client.search_text(query, k=5, target=target, max_angle_deg=theta)) == want[:5].tolist()
    assert client.search_text(query, k=5, target=target, max_angle_deg=0.0) == []


def test_diversity_is_mmr_over_the_pool_and_dedup_keeps_results_apart(client, index):
    vector = client.embed_text(TEXTS[2])
    pool = client.search_text(TEXTS[2], k=MAX_K, target="text")  # same-modal: relevance is the cosine
    rows = index.vectors("text", np.array(ids(pool)))
    picks = C.mmr(np.array([h.score for h in pool]), rows, 10, 0.5)
    got = client.search_embedding(vector, target="text", k=10, modality="text", diversity=0.5)
    assert ids(got) == [pool[i].id for i in picks]
    assert ids(client.search_text(TEXTS[2], k=10, target="text", diversity=0.0)) == ids(pool[:10])
    deduped = client.search_text(TEXTS[2], k=10, target="text", dedup_angle_deg=25.0)
    v = index.vectors("text", np.array(ids(deduped)))
    off_diagonal = (v @ v.T)[~np.eye(len(v), dtype=bool)]
    assert len(deduped) == 10 and np.all(off_diagonal < np.cos(np.radians(25.0)))


def test_walk_streams_equal_angle_steps_without_repeats(client):
    steps = list(client.walk(TEXTS[0], TEXTS[1], steps=5, k=4))
    assert [s.step for s in steps] == list(range(5))
    np.testing.assert_allclose([s.t for s in steps], np.linspace(0, 1, 5), atol=1e-6)
    gaps = np.diff([s.angle_deg for s in steps])
    assert np.ptp(gaps) < 1e-4 and gaps[0] > 0
    streamed = [i for s in steps for i in ids(s.hits)]
    assert len(streamed) == len(set(streamed)) == 20
    assert ids(steps[0].hits) == ids(client.search_text(TEXTS[0], k=4))  # step 0 is the start query
    a, b = client.embed_text(TEXTS[0]), client.embed_text(TEXTS[1])
    assert steps[-1].angle_deg == pytest.approx(float(np.degrees(np.arccos(a @ b))), abs=1e-3)


def test_async_client_walks_and_composes_the_same(server, client):
    caption = client.search_text(TEXTS[1], k=1, target="text")[0].id

    async def run():
        async with AsyncRetrievalClient(server.address) as c:
            walked = [s async for s in c.walk(TEXTS[0], TEXTS[2], steps=3, k=2)]
            composed = await c.search_composed([TEXTS[0], TEXTS[1]], k=5)
            return walked, composed, await c.more_like_this(caption, "text", k=3)

    walked, composed, similar = asyncio.run(run())
    assert [ids(s.hits) for s in walked] == [ids(s.hits) for s in client.walk(TEXTS[0], TEXTS[2], steps=3, k=2)]
    assert ids(composed) == ids(client.search_composed([TEXTS[0], TEXTS[1]], k=5))
    assert ids(similar) == ids(client.more_like_this(caption, "text", k=3))


def test_bad_inputs_get_their_status(client):
    expect(NOT_FOUND, client.more_like_this, 10**9, "image", match="no image with id 1000000000")
    expect(NOT_FOUND, client.search_composed, [TEXTS[0], ItemRef(-5, "text")], match="no text with id -5")
    expect(INVALID, client.search, search_request(item=ItemRef(1, None)), match="must name its gallery")
    expect(INVALID, client.search_composed, [(TEXTS[0], 0.0)], match="weight 0")
    expect(INVALID, client.search_composed, [(TEXTS[0], -1.0)], match="negative terms only")
    expect(INVALID, client.search_composed, [TEXTS[0]] * (MAX_TERMS + 1), match=f"limit of {MAX_TERMS}")
    expect(INVALID, client.search_composed, [], match="at least one term")
    expect(
        INVALID,
        client.search_composed,
        [(TEXTS[0], 1.0), (TEXTS[0], -1.0)],
        combine="linear",
        match="zero total weight",
    )
    expect(INVALID, client.search_composed, [(TEXTS[0], 1.0), (TEXTS[0], -1.0)], match="coincides")
    expect(INVALID, client.search_composed, [TEXTS[0], ""], match="terms[1]: text is empty")
    expect(
        INVALID,
        client.search_composed,
        [np.ones(3, np.float32)],
        target="image",
        match="terms[0]: embedding has dimension 3",
    )
    expect(
        INVALID, client.search_composed, [np.ones(client.index_info().dim, np.float32)], match="must name its target"
    )
    expect(INVALID, client.search_text, TEXTS[0], max_angle_deg=181.0, match="max_angle_deg")
    expect(INVALID, client.search_text, TEXTS[0], dedup_angle_deg=-1.0, match="dedup_angle_deg")
    expect(INVALID, client.search_text, TEXTS[0], diversity=1.5, match="diversity must lie in [0, 1]")
    expect(
        INVALID,
        client.batch_search,
        [search_request(text=TEXTS[0]), search_request(terms=[(TEXTS[0], 0.0)])],
        match="requests[1]: terms[0] has weight 0",
    )
    expect(
        NOT_FOUND,
        client.batch_search,
        [search_request(item=ItemRef(10**9, "text")), search_request(text="x")],
        match="requests[0]: no text",
    )


def test_bad_walks_get_their_status(client):
    expect(INVALID, client.walk, TEXTS[0], TEXTS[1], steps=1, k=3, match="steps must be between 2 and 6")
    expect(INVALID, client.walk, TEXTS[0], TEXTS[1], steps=MAX_STEPS + 1, k=3, match="between 2 and")
    expect(INVALID, client.walk, TEXTS[0], TEXTS[1], steps=5, k=10, match="over the limit of 40")
    expect(INVALID, client.walk, TEXTS[0], "", steps=3, k=3, match="text is empty")
    expect(INVALID, client.walk, TEXTS[0], ItemRef(2, "text"), steps=3, k=3, match="different galleries")
    expect(NOT_FOUND, client.walk, TEXTS[0], ItemRef(10**9, "image"), steps=3, k=3, match="no image with id")
    assert len(list(client.walk(TEXTS[0], TEXTS[1], steps=2, k=3))) == 2  # the server still answers


def test_query_cli_composes_walks_and_caps(server, client, capsys):
    from retrieval.cli import main

    def run(*argv: str) -> str:
        assert main(["query", "--address", server.address, "--json", *argv]) == 0
        return capsys.readouterr().out

    got = json.loads(run("--text", TEXTS[0], "--text", TEXTS[1], "--weight", "2", "--minus", "grass", "--k", "4"))
    want = client.search_composed([(TEXTS[0], 2.0), (TEXTS[1], 1.0), ("grass", -1.0)], k=4)
    assert [r["id"] for r in got] == ids(want)
    item = want[0].id
    got = json.loads(run("--like", str(item), "--gallery", "image", "--k", "3", "--diversity", "0.3"))
    assert [r["id"] for r in got] == ids(client.more_like_this(item, "image", k=3, diversity=0.3))
    got = json.loads(run("--text", TEXTS[0], "--max-angle", "80", "--dedup-angle", "5", "--k", "6"))
    assert [r["id"] for r in got] == ids(client.search_text(TEXTS[0], k=6, max_angle_deg=80, dedup_angle_deg=5))
    lines = run("--text", TEXTS[0], "--walk-to", TEXTS[1], "--steps", "3", "--k", "2").splitlines()
    assert [json.loads(line)["step"] for line in lines] == [0, 1, 2]
    assert main(["query", "--address", server.address, "--like", "999999999999", "--k", "3"]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err
