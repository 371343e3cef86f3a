"""IVF indexes built in blocks and merged on disk (index_builder.ivf_ondisk): they serve exactly what
the same index built in memory serves, from a directory renamed after the build, with blocks added
in this process or in worker processes; and the builder publishes them memory-mapped."""

from __future__ import annotations

import hashlib
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import faiss
import numpy as np
import pytest

from index_builder import faiss_index, ivf_ondisk
from index_builder.build import BuildConfig, build
from retrieval.errors import DatasetError, IndexCorruptError
from retrieval.sphere import l2_normalize
from retrieval.store.bias_table import BiasTable
from retrieval.store.layout import STORAGE_MMAP
from retrieval.store.reader import IndexVersion, read_index_file
from retrieval.store.vectors import query_rows, with_bias

D = 32
N = 20_000
FACTORY = "IVF64,Flat"


def _rows(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = l2_normalize(rng.standard_normal((50, D)))
    x = l2_normalize(centers[rng.integers(0, 50, n)] + 0.3 * rng.standard_normal((n, D)) / np.sqrt(D))
    return with_bias(x.astype(np.float32), (-0.2 * rng.random(n)).astype(np.float32))


@pytest.fixture(scope="module")
def gallery():
    ids = np.random.default_rng(1).choice(2**62, N, replace=False).astype(np.int64)  # arbitrary int64 ids
    rows = _rows(N, 2)

    def blocks():
        for s in range(0, N, 4096):
            yield ids[s : s + 4096], rows[s : s + 4096]

    return ids, rows, blocks


def _build(blocks, out: Path, **kw) -> list[str]:
    built = ivf_ondisk.build(
        blocks, N, D + 1, FACTORY, out, "images", out.parent / f"work-{out.name}", block_rows=6000, **kw
    )
    assert set(built.seconds) == {"train", "add", "merge"}
    return built.files


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_merged_on_disk_index_serves_what_the_in_memory_one_serves(tmp_path, gallery):
    ids, rows, blocks = gallery
    out = tmp_path / ".tmp-build"
    out.mkdir()
    files = _build(blocks, out)
    assert files == ["images.faiss", "images.ivfdata", "images.ids.npy", "images.bias.npy"]
    assert not (tmp_path / "work-.tmp-build").exists()  # block files are gone after the merge
    final = tmp_path / "v0001"
    out.rename(final)  # what publishing does to the directory

    on_disk = read_index_file(final / "images.faiss", STORAGE_MMAP)
    assert isinstance(
        faiss.downcast_InvertedLists(faiss.extract_index_ivf(on_disk).invlists), faiss.OnDiskInvertedLists
    )
    # the same trained quantizer, every row added in memory in one go
    in_memory = faiss_index.make_index(D + 1, FACTORY, id_map=False)
    in_memory.train(faiss_index.sample(blocks, N, faiss_index.MAX_TRAIN))
    in_memory.add_with_ids(rows, ids)
    assert on_disk.ntotal == in_memory.ntotal == N
    assert on_disk.nprobe == in_memory.nprobe == faiss_index.default_nprobe(in_memory.nlist)

    queries = _rows(200, 3)[:, :-1]
    for cross_modal in (True, False):
        for nprobe in (1, 4, 16, 64):
            params = faiss.SearchParametersIVF(nprobe=nprobe)
            want_scores, want_ids = in_memory.search(query_rows(queries, cross_modal), 10, params=params)
            scores, found = on_disk.search(query_rows(queries, cross_modal), 10, params=params)
            assert np.array_equal(found, want_ids) and np.array_equal(scores, want_scores)

    table = BiasTable(final, "images")
    pick = ids[::997]
    assert np.array_equal(table.lookup(pick), rows[::997, -1])
    with pytest.raises(IndexCorruptError):
        table.lookup(np.array([ids.max() + 1]))


def test_blocks_added_in_worker_processes_merge_to_the_same_files(tmp_path, gallery):
    _, _, blocks = gallery
    (tmp_path / "seq").mkdir()
    (tmp_path / "pool").mkdir()
    _build(blocks, tmp_path / "seq")
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        _build(blocks, tmp_path / "pool", mapper=pool.map)
    for name in ("images.ivfdata", "images.faiss", "images.ids.npy", "images.bias.npy"):
        assert _sha(tmp_path / "seq" / name) == _sha(tmp_path / "pool" / name), name


def test_mmap_index_with_its_data_missing_or_cut_is_refused(tmp_path, gallery):
    _, _, blocks = gallery
    out = tmp_path / "v"
    out.mkdir()
    _build(blocks, out)
    data = out / "images.ivfdata"
    data.write_bytes(data.read_bytes()[:1000])
    with pytest.raises(IndexCorruptError, match="shorter"):
        read_index_file(out / "images.faiss", STORAGE_MMAP)
    data.unlink()
    with pytest.raises(IndexCorruptError, match="missing"):
        read_index_file(out / "images.faiss", STORAGE_MMAP)
    with pytest.raises(DatasetError, match="IVF factory"):
        ivf_ondisk.check_factory("HNSW32,Flat", D + 1)


def test_builder_publishes_an_on_disk_version_served_memory_mapped(tmp_path, flickr_mini, default_model):
    root = tmp_path / "idx"

    def run(**kw) -> dict:
        return build(
            BuildConfig(
                out=str(root),
                model="lite0-minilm",
                dataset=str(flickr_mini),
                split="test",
                progress=False,
                workers=0,
                **kw,
            ),
            loaded=default_model,
        )

    m = run(on_disk=True)
    assert m["storage"] == {"image": "mmap", "text": "mmap"} and m["index_factory"]["image"].startswith("IVF")
    assert {"images.ivfdata", "images.ids.npy", "images.bias.npy", "texts.ivfdata"} <= set(m["files"])
    recall = m["recall"]["image"]
    assert recall["cross_modal"]["query_source"] == "text" and recall["cross_modal"]["queries"] == 160
    assert recall["same_modal"]["query_source"].startswith("image") and recall["same_modal"]["queries"] == 32
    assert recall["recall_at_10"] == recall["cross_modal"]["recall_at_10"] == m["recall_at_10"]["image"]
    with pytest.raises(DatasetError, match="IVF factory"):
        run(on_disk=True, index_factory="HNSW32,Flat")

    # an exact in-memory version from the same vectors, read back from the on-disk one (incremental reuse)
    m2 = run(incremental=True, index_factory="Flat")
    counts = m2["report"]["counts"]
    assert (counts["images_reused"], counts["images_encoded"], counts["texts_reused"]) == (32, 0, 160)
    assert m2["storage"] == {"image": "memory", "text": "memory"} and "images.ivfdata" not in m2["files"]
    assert all(
        m2["recall"][mod][kind]["recall_at_10"] == 1.0
        for mod in ("image", "text")
        for kind in ("cross_modal", "same_modal")
    )

    mapped, exact = IndexVersion.open(root, "v0001"), IndexVersion.open(root, "v0002")
    text_ids = np.array(sorted(exact.bias_tables.get("text", mapped.bias_tables["text"]).ids), np.int64)
    queries = exact.indexes["text"].reconstruct_batch(text_ids[:20])[:, :-1]
    image_ids = np.asarray(mapped.bias_tables["image"].ids)
    for cross_modal in (True, False):
        scores, found = mapped.search("image", queries, 5, cross_modal=cross_modal, allowed=image_ids[:10])
        hit = found >= 0  # the allowed ids in the probed lists
        assert hit.sum() >= 10 and set(found[hit].tolist()) <= set(image_ids[:10].tolist())
        cosines = np.einsum(
            "bd,bd->b",
            np.repeat(queries, 5, axis=0)[hit.ravel()],
            exact.indexes["image"].reconstruct_batch(found[hit])[:, :-1],
        )
        assert np.allclose(scores[hit], cosines, atol=1e-5)  # the score is the cosine, the bias taken off
    mapped.close()
    exact.close()


def test_automatic_index_choice_follows_the_measured_settings():
    """Exact search up to 100,000 items; beyond, IVF probing 1/128 of its lists (at 1M: IVF4096,
    32 lists, text->image recall@10 0.983 at 64x exact search, bench/results/scale.md); the
    quantizer is trained on at least 64 rows a list."""
    assert faiss_index.choose_factory(100_000) == "Flat"
    assert faiss_index.choose_factory(1_000_000) == "IVF4096,Flat"
    assert faiss_index.choose_factory(10_000_000) == "IVF16384,Flat"
    assert faiss.extract_index_ivf(faiss_index.make_index(D + 1, "IVF4096,Flat")).nprobe == 32
    assert faiss_index.default_nprobe(16384) == 128 and faiss_index.default_nprobe(1024) == 16
    assert faiss_index.default_nprobe(8) == 8
    assert faiss_index.train_rows("IVF16384,Flat", D + 1) == 64 * 16384
    assert faiss_index.train_rows("Flat", D + 1) == faiss_index.MAX_TRAIN
