"""The batch index builder on real Flickr8k images: inputs, consistency with the model, bad files,
incremental builds, atomic publish under SIGKILL with resume, list/gc, and CLI errors."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import pytest
from PIL import Image

from index_builder.build import BuildConfig, build
from index_builder.cli import main
from index_builder.publish import BuildLockedError, RootLock, new_temp_dir, next_version, publish, write_current
from index_builder.sources import stable_id
from retrieval.embedding.querybank import querybank_of
from retrieval.errors import FingerprintMismatchError
from retrieval.store.layout import FORMAT, list_versions, read_current, sha256_file
from retrieval.store.reader import IndexVersion
from retrieval.store.schema import write_metadata

REPO = Path(__file__).resolve().parents[1]
MODEL = "lite0-minilm"


@pytest.fixture(scope="module")
def bundle(default_model):
    return default_model


def _build(bundle, out: Path, **kw) -> dict:
    kw.setdefault("progress", False)
    kw.setdefault("workers", 1)
    return build(BuildConfig(out=str(out), model=MODEL, **kw), loaded=bundle)


def _images(src: Path, dest: Path, n: int, start: int = 0) -> list[str]:
    """Copy n real images (sorted names) into dest; returns their names."""
    dest.mkdir(parents=True, exist_ok=True)
    names = sorted(p.name for p in (src / "images").iterdir())[start : start + n]
    for name in names:
        shutil.copyfile(src / "images" / name, dest / name)
    return names


def _captions(src: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    with (src / "captions.csv").open(newline="") as f:
        for row in csv.DictReader(f):
            out.setdefault(row["image"], []).append(row["caption"])
    return out


def _rows(version_dir: Path, sql: str) -> list[tuple]:
    db = sqlite3.connect(version_dir / "meta.sqlite")
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


def test_dataset_build_is_consistent_with_the_model(tmp_path, flickr_mini, bundle):
    from index_builder.verify import index_recall
    from retrieval.encoding.bulk import encode_image_files

    root = tmp_path / "idx"
    m = _build(bundle, root, dataset=str(flickr_mini), split="test")
    assert read_current(root) == "v0001" == m["version"]
    for key in (
        "format",
        "version",
        "model",
        "fingerprint",
        "dim",
        "num_images",
        "num_texts",
        "index_factory",
        "recall_at_10",
        "created_at",
        "build_seconds",
        "files",
        "report",
    ):
        assert key in m, key
    on_disk = json.loads((root / "v0001" / "manifest.json").read_text())
    assert on_disk == m and m["model"] == MODEL and m["fingerprint"] == bundle[0].fingerprint()
    assert (m["num_images"], m["num_texts"], m["dim"]) == (32, 160, 256)
    assert m["index_factory"] == {"image": "Flat", "text": "Flat"} and m["recall_at_10"] == {"image": 1.0, "text": 1.0}
    assert set(m["files"]) == {"images.faiss", "texts.faiss", "meta.sqlite"}
    assert all(sha256_file(root / "v0001" / f) == d for f, d in m["files"].items())
    assert not list(root.glob(".work-*")) and not list(root.glob(".tmp-*"))

    version = IndexVersion.open(root)
    image_rows = _rows(root / "v0001", "SELECT id, uri FROM images ORDER BY uri")
    ids = np.array([r[0] for r in image_rows], np.int64)
    stored = version.indexes["image"].reconstruct_batch(ids)  # (N, D+1): [g, b_g]
    emb, bias = stored[:, :-1], stored[:, -1]
    assert all(r[1] == Path(r[1]).name for r in image_rows)  # uris: names under images/
    model_vecs, bad = encode_image_files(
        bundle[0], [flickr_mini / "images" / r[1] for r in image_rows[:8]], bundle[1], workers=0, progress=False
    )
    assert not bad and np.allclose(emb[:8], model_vecs, atol=1e-5)
    assert m["querybank"]["beta"] > 0 and np.allclose(bias, querybank_of(bundle[0]).bias(emb, "image"), atol=1e-6)
    assert np.ptp(bias) > 0.01, "the shipped model's inverted softmax should give items different biases"

    # exact search through the index == brute force in numpy over the same vectors: cross-modal
    # queries rank by cosine + bias and report the cosine; same-modal ones rank by the cosine
    text_ids = np.array([r[0] for r in _rows(root / "v0001", "SELECT id FROM texts")], np.int64)
    queries = version.indexes["text"].reconstruct_batch(text_ids)[:, :-1]
    for cross_modal, brute in ((True, queries @ emb.T + bias), (False, queries @ emb.T)):
        scores, found = version.search("image", queries, 10, cross_modal=cross_modal)
        order = np.argsort(-brute, axis=1, kind="stable")[:, :10]
        assert np.allclose(scores, np.take_along_axis(queries @ emb.T, order, 1), atol=1e-5)
        assert (found == ids[order]).mean() > 0.99  # ties aside
    meta = version.metadata("text", text_ids[:3])
    assert all(r["image_id"] in set(ids.tolist()) and r["caption"] for r in meta)
    version.close()

    # the indexes answer the model's queries as `retrieval eval` scores them
    result = index_recall(root, flickr_mini, "test", bundle, workers=0)
    assert (result["images"], result["captions"]) == (32, 160)
    assert result["max_abs_diff"] <= 0.1, result


def test_images_and_captions_files_csv_and_jsonl(tmp_path, flickr_mini, bundle):
    caps = _captions(flickr_mini)
    photos = tmp_path / "photos"
    names = _images(flickr_mini, photos / "a" / "b", 3) + _images(flickr_mini, photos, 3, start=3)
    rel = [f"a/b/{n}" for n in names[:3]] + names[3:]
    with (tmp_path / "caps.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption"])
        for r, n in zip(rel, names):
            w.writerow([r, caps[n][0]])
        w.writerow(["missing.jpg", "a caption whose image is not there"])
        w.writerow([rel[0], ""])
    root = tmp_path / "idx"
    m = _build(bundle, root, images=str(photos), captions=str(tmp_path / "caps.csv"), index_factory="HNSW32,Flat")
    assert (m["num_images"], m["num_texts"]) == (6, 6)
    assert m["index_factory"] == {"image": "HNSW32,Flat", "text": "HNSW32,Flat"}
    assert 0.0 <= m["recall_at_10"]["image"] <= 1.0 and m["index_type"]["image"] == "IndexIDMap2(IndexHNSWFlat)"
    reasons = {s["item"]: s["reason"] for s in m["report"]["skipped"]}
    assert "no caption text" in reasons["caps.csv:9"]
    assert reasons["caps.csv:8"] == "its image 'missing.jpg' is not in the collection"
    rows = _rows(root / "v0001", "SELECT caption, image_id, image_uri FROM texts")
    by_caption = {c: (i, u) for c, i, u in rows}
    assert by_caption[caps[names[0]][0]] == (stable_id("image", rel[0]), rel[0])
    assert "a caption whose image is not there" not in by_caption  # skipped, so not indexed

    with (tmp_path / "caps.jsonl").open("w") as f:
        for i, (r, n) in enumerate(zip(rel, names)):
            f.write(json.dumps({"id": f"c{i}", "text": caps[n][1], "image": r}) + "\n")
        f.write("{not json\n")
    m2 = _build(bundle, root, images=str(photos), captions=str(tmp_path / "caps.jsonl"), keep=1)
    assert m2["version"] == "v0002" and list_versions(root) == ["v0002"]  # --keep 1 pruned v0001
    assert (m2["num_images"], m2["num_texts"]) == (6, 6)
    ids = {c: i for i, c in _rows(root / "v0002", "SELECT id, caption FROM texts")}
    assert ids[caps[names[2]][1]] == stable_id("text", "id:c2")
    assert any("invalid JSON" in s["reason"] for s in m2["report"]["skipped"])
    image_ids = {u: i for i, u in _rows(root / "v0002", "SELECT id, uri FROM images")}
    assert image_ids[rel[4]] == stable_id("image", rel[4])  # same id in both versions


def test_bad_files_are_skipped_and_reported(tmp_path, flickr_mini, bundle):
    photos = tmp_path / "photos"
    names = _images(flickr_mini, photos, 4)
    src = photos / names[0]
    with Image.open(src) as im:
        im.save(photos / "as.png")
        im.save(photos / "as.webp")
        frames = [im.convert("RGB"), im.convert("RGB").rotate(90)]
        frames[0].save(photos / "anim.gif", save_all=True, append_images=frames[1:])
    data = src.read_bytes()
    (photos / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (photos / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + os.urandom(3000))
    (photos / "empty.jpg").write_bytes(b"")
    (photos / "text.jpg").write_text("this is a text file renamed to .jpg\n")
    (photos / "notes.txt").write_text("not an image either\n")
    m = _build(bundle, tmp_path / "idx", images=str(photos))
    assert m["num_images"] == 7 and m["num_texts"] == 0
    reasons = {s["item"]: s["reason"] for s in m["report"]["skipped"]}
    assert set(reasons) == {"truncated.jpg", "corrupt.jpg", "empty.jpg", "text.jpg", "notes.txt"}
    assert "zero-byte" in reasons["empty.jpg"]
    assert "not a decodable image" in reasons["text.jpg"]
    assert "decod" in reasons["corrupt.jpg"] and "decod" in reasons["truncated.jpg"]
    assert "not an image file type" in reasons["notes.txt"]
    assert m["report"]["counts"]["images_skipped"] == 4
    version = IndexVersion.open(tmp_path / "idx")
    assert version.count("image") == 7 and version.count("text") == 0
    scores, ids = version.search("text", np.eye(1, 256, dtype=np.float32), 5)
    assert ids.tolist() == [[-1]]  # an empty text index answers with padding, not an error
    version.close()


def test_incremental_encodes_only_changes(tmp_path, flickr_mini, bundle):
    caps = _captions(flickr_mini)
    photos = tmp_path / "photos"
    names = _images(flickr_mini, photos, 5)

    def write_captions(which):
        with (photos.parent / "caps.csv").open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["image", "caption"])
            for n in which:
                w.writerow([n, caps[n][0]])

    write_captions(names)
    root = tmp_path / "idx"
    assert _build(bundle, root, images=str(photos), captions=str(photos.parent / "caps.csv"))["num_images"] == 5
    v1 = IndexVersion.open(root, "v0001")

    new = _images(flickr_mini, photos, 1, start=10)[0]  # added
    with Image.open(photos / names[1]) as im:  # changed (same name, new bytes)
        im.rotate(180).save(photos / names[1], quality=90)
    (photos / names[2]).unlink()  # deleted
    write_captions([n for n in names if n != names[2]] + [new])
    m2 = _build(bundle, root, images=str(photos), captions=str(photos.parent / "caps.csv"), incremental=True)
    c = m2["report"]["counts"]
    assert m2["incremental"] == {"base": "v0001"} and read_current(root) == "v0002"
    assert (c["images_encoded"], c["images_reused"], m2["num_images"]) == (2, 3, 5)
    assert (c["texts_encoded"], c["texts_reused"], m2["num_texts"]) == (1, 4, 5)

    v2 = IndexVersion.open(root)
    old = dict(_rows(v1.path, "SELECT uri, id FROM images"))  # uris: names under photos/
    now = dict(_rows(v2.path, "SELECT uri, id FROM images"))
    for n in (names[0], names[3], names[4], names[1]):
        assert now[n] == old[n]  # ids of unchanged (and changed) items are stable
    assert names[2] not in now and now[new] == stable_id("image", new)
    same = np.array([old[names[0]]], np.int64)
    before, after = v1.indexes["image"].reconstruct_batch(same), v2.indexes["image"].reconstruct_batch(same)
    assert np.array_equal(before[:, :-1], after[:, :-1])  # the vector itself is reused, bit for bit
    # its bias is recomputed over a block of another size: BLAS may round that matmul differently in the last bit
    assert np.allclose(before[:, -1], after[:, -1], rtol=0, atol=1e-6)
    changed = np.array([old[names[1]]], np.int64)
    assert not np.allclose(
        v1.indexes["image"].reconstruct_batch(changed), v2.indexes["image"].reconstruct_batch(changed)
    )
    v1.close()
    v2.close()


def test_ivf_index_searches_restricted_ids_and_pq_needs_a_rotation(tmp_path, flickr_mini, bundle):
    root = tmp_path / "idx"
    m = _build(bundle, root, dataset=str(flickr_mini), split="test", index_factory="IVF4,Flat")
    assert m["index_factory"]["image"] == "IVF4,Flat" and 0 < m["recall_at_10"]["image"] <= 1  # nprobe 1 of 4 lists
    version = IndexVersion.open(root)
    ids = np.array([r[0] for r in _rows(root / "v0001", "SELECT id FROM images")], np.int64)
    query = version.indexes["text"].reconstruct_batch(
        np.array([r[0] for r in _rows(root / "v0001", "SELECT id FROM texts LIMIT 3")], np.int64)
    )[:, :-1]
    _, found = version.search("image", query, 5, cross_modal=True, allowed=ids[:4])
    assert set(found[found >= 0].tolist()) <= set(ids[:4].tolist())
    version.close()
    with pytest.raises(Exception, match=r"257-dimensional.*OPQ32_256"):
        _build(bundle, tmp_path / "pq", dataset=str(flickr_mini), split="test", index_factory="IVF4,PQ32")


def test_incremental_over_an_older_format_builds_everything(tmp_path, flickr_mini, bundle):
    root = tmp_path / "idx"
    _build(bundle, root, dataset=str(flickr_mini), split="test")
    manifest = root / "v0001" / "manifest.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "format": "sphere-index/1"}))
    with pytest.raises(Exception, match="rebuild it"):
        IndexVersion.open(root)
    m = _build(bundle, root, dataset=str(flickr_mini), split="test", incremental=True)
    assert m["incremental"] is None and m["version"] == "v0002"
    assert m["report"]["counts"]["images_reused"] == 0 and m["num_images"] == 32


def test_sigkill_leaves_current_and_rerun_resumes(tmp_path, flickr_mini, bundle):
    root = tmp_path / "idx"
    _build(bundle, root, dataset=str(flickr_mini), split="dev")
    assert read_current(root) == "v0001"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [
        sys.executable,
        "-m",
        "index_builder",
        "-q",
        "build",
        "--out",
        str(root),
        "--dataset",
        str(flickr_mini),
        "--split",
        "train",
        "--shard-size",
        "4",
        "--batch-size",
        "4",
        "--workers",
        "1",
        "--no-progress",
    ]
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 180
        while not [p for p in root.glob(".work-*/images/shard-*.npz") if ".tmp" not in p.name]:  # a complete shard
            assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
            assert time.monotonic() < deadline, "the builder wrote no shard in time"
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)  # the builder and its DataLoader worker, mid-run
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert read_current(root) == "v0001" and list_versions(root) == ["v0001"]
    version = IndexVersion.open(root)
    scores, ids = version.search(
        "image",
        version.indexes["image"].reconstruct_batch(
            np.array([r[0] for r in _rows(root / "v0001", "SELECT id FROM images LIMIT 2")], np.int64)
        )[:, :-1],
        3,
    )
    assert (ids >= 0).all() and np.allclose(scores[:, 0], 1.0, atol=1e-4)  # the old version loads and answers
    version.close()

    m = _build(bundle, root, dataset=str(flickr_mini), split="train")
    c = m["report"]["counts"]
    assert m["version"] == "v0002" and read_current(root) == "v0002" and m["num_images"] == 48
    assert c["images_resumed"] >= 4 and c["images_resumed"] + c["images_encoded"] == 48
    assert not list(root.glob(".work-*"))


# a builder that holds the root's lock and forks a child (as a DataLoader worker is forked) sharing its descriptor
_LOCK_AND_FORK = """
import os, sys, time
from index_builder.publish import RootLock
RootLock(sys.argv[1]).__enter__()
child = os.fork()
if child == 0:
    sys.stdin.read()          # the child holds the inherited descriptor until the test closes stdin
    os._exit(0)
print(child, flush=True)
time.sleep(600)
"""


def test_root_lock_dies_with_the_builder_not_with_its_forked_children(tmp_path):
    root = tmp_path / "idx"
    builder = subprocess.Popen(
        [sys.executable, "-c", _LOCK_AND_FORK, str(root)],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    child = None
    try:
        child = int(builder.stdout.readline())
        with pytest.raises(BuildLockedError, match="another index-builder"):
            RootLock(root).__enter__()  # held while the builder lives
        builder.kill()
        assert builder.wait(timeout=60) == -signal.SIGKILL
        os.kill(child, 0)  # the forked child still lives, descriptor open
        with RootLock(root) as lock:  # yet the lock died with the builder
            assert lock.fd is not None
            with pytest.raises(BuildLockedError):
                RootLock(root).__enter__()  # and a second lock in one process is refused too
        with RootLock(root):  # released on exit
            pass
    finally:
        builder.kill()
        builder.wait(timeout=60)
        if child is not None:
            try:
                os.kill(child, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_list_and_gc_keep_n_never_remove_current(tmp_path, capsys):
    root = tmp_path / "idx"
    for n in range(4):
        tmp = new_temp_dir(root)
        (tmp / "manifest.json").write_text(json.dumps({"model": MODEL, "dim": 4, "num_images": n, "num_texts": 0}))
        publish(root, tmp, next_version(root), keep=10)
    assert list_versions(root) == ["v0001", "v0002", "v0003", "v0004"] and read_current(root) == "v0004"
    write_current(root, "v0002")  # an operator rolled back
    (root / ".tmp-leftover").mkdir()
    assert main(["list", str(root), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)["versions"]
    assert [(v["version"], v["current"]) for v in listed] == [
        ("v0001", False),
        ("v0002", True),
        ("v0003", False),
        ("v0004", False),
    ]
    assert main(["-q", "gc", str(root), "--keep", "1"]) == 0
    assert "removed 2 version(s)" in capsys.readouterr().out
    assert list_versions(root) == ["v0002", "v0004"] and read_current(root) == "v0002"
    assert not (root / ".tmp-leftover").exists()
    assert main(["gc", str(root), "--keep", "0"]) == 2
    assert "at least 1" in capsys.readouterr().err


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, flickr_mini, bundle, capsys):
    out = str(tmp_path / "idx")
    proc = subprocess.run(
        [sys.executable, "-m", "index_builder", "build", "--out", out, "--images", str(tmp_path / "nope")],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=120,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert (
        proc.stderr.strip().splitlines()[-1].startswith("index-builder build: error: image folder")
        and "does not exist" in proc.stderr
    )

    (tmp_path / "empty").mkdir()
    (tmp_path / "caps.xml").write_text("<x/>")
    cases = [
        (["build", "--out", out], "nothing to index"),
        (["build", "--out", out, "--images", str(tmp_path / "empty")], "collection is empty"),
        (["build", "--out", out, "--split", "test", "--images", str(tmp_path)], "--split applies to --dataset"),
        (["build", "--out", out, "--dataset", str(flickr_mini), "--images", str(tmp_path)], "cannot be combined"),
        (["build", "--out", out, "--dataset", str(flickr_mini), "--split", "nope"], "split 'nope' not found"),
        (["build", "--out", out, "--captions", str(tmp_path / "caps.xml")], "must be .csv"),
        (["build", "--out", out, "--dataset", str(flickr_mini), "--model", "no-such-model"], "unknown model"),
        (["list", str(tmp_path / "nowhere")], "does not exist"),
    ]
    for argv, message in cases:
        assert main(["-q", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (argv, err)
    with pytest.raises(Exception, match="invalid --index-factory 'Nonsense'"):
        _build(bundle, tmp_path / "idx2", dataset=str(flickr_mini), split="test", index_factory="Nonsense")
    root = tmp_path / "idx3"  # a version built by another model: --incremental refuses to mix
    tmp = new_temp_dir(root)
    for name in ("images.faiss", "texts.faiss"):
        faiss.write_index(faiss.index_factory(257, "IDMap2,Flat", faiss.METRIC_INNER_PRODUCT), str(tmp / name))
    write_metadata(tmp / "meta.sqlite", [], [])
    files = {name: sha256_file(tmp / name) for name in ("images.faiss", "texts.faiss", "meta.sqlite")}
    (tmp / "manifest.json").write_text(
        json.dumps({"format": FORMAT, "model": "other", "fingerprint": "0123", "dim": 256, "files": files})
    )
    publish(root, tmp, "v0001", keep=3)
    with pytest.raises(FingerprintMismatchError, match="run a full build"):
        _build(bundle, root, dataset=str(flickr_mini), split="test", incremental=True)
