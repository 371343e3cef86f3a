"""The sync and async clients are one API: the same public methods with the same signatures, and
the same answers from a live server over a real index (every method, including min_score,
embedding search, batch search and embed)."""

from __future__ import annotations

import asyncio
import inspect

import numpy as np
import pytest
from conftest import build_index

from retrieval.client import AsyncRetrievalClient, RetrievalClient, search_request
from retrieval.serving.server import ServeConfig, ServerThread

TEXT = "two dogs play in the snow"


def public_methods(cls: type) -> dict[str, inspect.Signature]:
    return {
        name: inspect.signature(fn)
        for name, fn in inspect.getmembers(cls, inspect.isfunction)
        if not name.startswith("_")
    }


def test_async_client_has_every_method_of_the_sync_client_with_the_same_signature():
    sync, aio = public_methods(RetrievalClient), public_methods(AsyncRetrievalClient)
    assert sync.keys() == aio.keys()
    for name, signature in sync.items():
        method = getattr(AsyncRetrievalClient, name)
        if inspect.isasyncgenfunction(method):  # a streamed RPC: an iterator of the same items, asynchronously
            assert inspect.isgeneratorfunction(getattr(RetrievalClient, name)), name
            assert aio[name].parameters == signature.parameters, name
            assert aio[name].return_annotation == signature.return_annotation.replace("Iterator", "AsyncIterator")
        else:
            assert aio[name] == signature, name
            assert inspect.iscoroutinefunction(method), name


@pytest.fixture(scope="module")
def server(flickr_mini, tmp_path_factory):

    root = tmp_path_factory.mktemp("client") / "index"
    build_index(root, "--dataset", str(flickr_mini), "--split", "test")
    srv = ServerThread(ServeConfig(index=str(root), port=0, metrics_port=-1)).start()
    yield srv
    srv.stop(grace=0)


@pytest.mark.dataset
def test_sync_and_async_clients_give_the_same_answers(server, flickr_mini):
    image = next((flickr_mini / "images").iterdir())
    with RetrievalClient(server.address, timeout=60) as client:
        vector = client.embed_text(TEXT)
        expected = {
            "text": client.search_text(TEXT, k=5),
            "text_min_score": client.search_text(TEXT, k=5, min_score=0.2),
            "image": client.search_image(image, k=3),
            "embedding": client.search_embedding(vector, target="image", k=5, modality="text"),
            "batch": client.batch_search([search_request(text=TEXT, k=2), search_request(image=image, k=2)]),
            "image_vector": client.embed_image(image),
            "info": client.index_info().version,
        }

    async def ask() -> dict:
        async with AsyncRetrievalClient(server.address, timeout=60) as client:
            assert np.array_equal(await client.embed_text(TEXT), vector)
            return {
                "text": await client.search_text(TEXT, k=5),
                "text_min_score": await client.search_text(TEXT, k=5, min_score=0.2),
                "image": await client.search_image(image, k=3),
                "embedding": await client.search_embedding(vector, target="image", k=5, modality="text"),
                "batch": await client.batch_search([search_request(text=TEXT, k=2), search_request(image=image, k=2)]),
                "image_vector": await client.embed_image(image),
                "info": (await client.index_info()).version,
            }

    got = asyncio.run(ask())
    assert np.array_equal(got.pop("image_vector"), expected.pop("image_vector"))
    assert got == expected
    # a text's vector declared as text ranks as the text (renormalized on the way: scores to float32 rounding)
    assert [h.id for h in expected["embedding"]] == [h.id for h in expected["text"]]
    assert np.allclose([h.score for h in expected["embedding"]], [h.score for h in expected["text"]], atol=1e-6)
    assert len(expected["text"]) == 5 and all(h.modality == "image" for h in expected["text"])
    assert all(h.score >= 0.2 for h in expected["text_min_score"])
    assert [len(r) for r in expected["batch"]] == [2, 2]
