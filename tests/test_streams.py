"""threaded_map: every item once, in real parallel threads sharing torch's intra-op threads,
in input order, errors and early exits handled; and the builder's shards are the same with 1 or 2 streams."""

import threading
import time

import numpy as np
import pytest
import torch

from index_builder.encode import ShardStore, encode_images, encode_texts
from retrieval.encoding.streams import threaded_map


def stream_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("stream-")]


@pytest.mark.parametrize("streams", [1, 2, 3])
def test_every_item_once_with_its_result_in_input_order(streams):
    """Items that take longer finish after later ones; they still come back in input order, so
    what the builder writes (its shards) does not depend on thread timing."""

    def fn(x: int) -> int:
        if x % 5 == 0:
            time.sleep(0.02)  # the other streams run ahead meanwhile
        return x * x

    assert list(threaded_map(range(50), fn, streams)) == [(x, x * x) for x in range(50)]
    assert not stream_threads()


def test_streams_run_at_once_on_their_share_of_torch_threads():
    caller = torch.get_num_threads()
    barrier = threading.Barrier(2, timeout=10)  # breaks (fails the test) unless two streams wait together
    seen = []

    def fn(x):
        if x < 2:
            barrier.wait()
        seen.append((x, threading.current_thread().name, torch.get_num_threads(), torch.is_inference_mode_enabled()))
        return x

    with torch.inference_mode():
        assert sorted(x for x, _ in threaded_map(range(10), fn, 2)) == list(range(10))
    assert {name for _, name, _, _ in seen} == {"stream-0", "stream-1"}
    assert len({name for x, name, _, _ in seen if x < 2}) == 2, "items 0 and 1 ran in different streams"
    assert {threads for _, _, threads, _ in seen} == {max(1, caller // 2)}
    assert all(inference for *_, inference in seen), "the caller's inference mode carries into the streams"
    assert torch.get_num_threads() == caller, "the caller's thread count is restored"


def failing_items():
    yield from range(5)
    raise OSError("disk went away")


def test_errors_in_the_items_or_the_function_reach_the_caller():
    with pytest.raises(OSError, match="disk went away"):
        list(threaded_map(failing_items(), lambda x: x, 2))

    def fn(x):
        if x == 7:
            raise ValueError("bad item 7")
        return x

    with pytest.raises(ValueError, match="bad item 7"):
        list(threaded_map(range(100), fn, 2))
    assert not stream_threads()


def test_a_caller_that_stops_early_stops_the_streams():
    caller = torch.get_num_threads()
    pulled = []

    def items():
        for i in range(10_000):
            pulled.append(i)
            yield i

    for _ in threaded_map(items(), lambda x: x, 2):
        break
    assert not stream_threads() and len(pulled) < 100, "the streams stopped after their current item"
    assert torch.get_num_threads() == caller


def test_one_multi_stream_map_at_a_time():
    """torch's thread count is process-wide: a second map would restore the first one's reduced count."""
    first = threaded_map(range(100), lambda x: x, 2)
    next(first)
    with pytest.raises(RuntimeError, match="another threaded_map"):
        next(threaded_map(range(3), lambda x: x, 2))
    assert sorted(x for x, _ in threaded_map(range(3), lambda x: x, 1)) == [0, 1, 2], "one stream needs no threads"
    first.close()
    assert not stream_threads()
    assert len(list(threaded_map(range(3), lambda x: x, 2))) == 3, "free again once the first is closed"


def test_builder_shards_do_not_depend_on_the_stream_count(default_model, flickr_mini, tmp_path):
    """Images and captions: the same rows in the same shard order with 1 or 2 streams (batches
    are written in input order), the same vectors up to the thread count's rounding."""
    model, preprocess, tokenizer = default_model
    photos = sorted((flickr_mini / "images").glob("*.jpg"))[:11]
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    images = [(f"{i:064x}", p) for i, p in enumerate(photos + [tmp_path / "bad.jpg"])]
    words = "a dog runs on the grass while two children play in the snow near a red house".split()
    captions = [(f"{i:064x}", " ".join(words[: 3 + i % 13])) for i in range(40)]
    stored = {}
    for streams in (1, 2):
        img = ShardStore(tmp_path / f"images{streams}", model.embed_dim)
        stats = encode_images(
            model, preprocess, img, images, batch_size=4, workers=0, streams=streams, shard_size=5, progress=False
        )
        assert (stats.items, stats.failed, stats.streams) == (11, 1, streams)
        txt = ShardStore(tmp_path / f"captions{streams}", model.embed_dim)
        stats = encode_texts(
            model, tokenizer, txt, captions, batch_size=8, streams=streams, shard_size=9, progress=False
        )
        assert (stats.items, stats.streams) == (40, streams)
        stored[streams] = [
            ([s.tolist() for s, _ in store.iter_vectors()], np.concatenate([v for _, v in store.iter_vectors()]))
            for store in (img, txt)
        ] + [img.scan()[1]]
    for (shas1, vecs1), (shas2, vecs2) in zip(stored[1][:2], stored[2][:2]):
        assert shas1 == shas2, "rows went to other shards, or in another order"
        assert np.allclose(vecs1, vecs2, atol=1e-5)
    assert stored[1][2] == stored[2][2] and "not a decodable image" in stored[1][2][images[-1][0]]
