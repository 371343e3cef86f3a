"""No code runs from an index folder or a checkpoint file, and a refused version is visible and
retried once its files change (issue 11, items 1 and 7). Each attack is a real file on disk: a
pickle whose unpickling would create a marker file, manifests that point outside their version,
symlinks out of the index root. The index is built from the scikit-image gallery the demo uses
(no dataset needed)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import pickle
import shutil
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from conftest import build_index

from retrieval.client import RetrievalClient
from retrieval.errors import IndexCorruptError, ModelError, RetrievalError
from retrieval.serving.encoder import cached_model
from retrieval.serving.engine import Engine
from retrieval.serving.server import ServeConfig, ServerThread
from retrieval.store.layout import sha256_file
from retrieval.store.reader import IndexVersion

MODEL = "lite0-minilm"


class Plant:
    """Unpickling this creates `marker`: the proof that a loader ran code from a file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def build(root: Path, images: Path, captions: Path, *extra: str) -> None:

    build_index(root, "--images", str(images), "--captions", str(captions), *extra)


@pytest.fixture(scope="module")
def gallery(tmp_path_factory) -> tuple[Path, Path]:
    from retrieval.commands.demo import write_gallery

    return write_gallery(tmp_path_factory.mktemp("gallery"))


@pytest.fixture(scope="module")
def built(gallery, tmp_path_factory) -> Path:
    """An index root with one good version, v0001 (the shipped model, by name)."""
    root = tmp_path_factory.mktemp("trust") / "index"
    build(root, *gallery)
    cached_model(MODEL)  # loaded once for every server here
    return root


@pytest.fixture
def root(built, tmp_path) -> Path:
    copy = tmp_path / "index"
    shutil.copytree(built, copy)
    return copy


def edit_manifest(version: Path, **changes) -> None:
    """Rewrite manifest.json atomically (a new inode, as a builder or an operator's copy makes)."""
    manifest = json.loads((version / "manifest.json").read_text())
    manifest.update(changes)
    (version / ".manifest.tmp").write_text(json.dumps(manifest))
    os.replace(version / ".manifest.tmp", version / "manifest.json")


def publish(root: Path, src: str, name: str, **changes) -> Path:
    """Copy a version, change its manifest, flip CURRENT to it."""
    shutil.copytree(root / src, root / name)
    if changes:
        edit_manifest(root / name, **changes)
    (root / ".CURRENT.tmp").write_text(name + "\n")
    os.replace(root / ".CURRENT.tmp", root / "CURRENT")
    return root / name


def plant_pickle(path: Path, marker: Path) -> str:
    """A pickle at `path` that would create `marker` if anything unpickled it; its sha256."""
    path.write_bytes(pickle.dumps(Plant(marker)))
    return sha256_file(path)


def wait_for(predicate, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


# -- the pickled-model attack ---------------------------------------------------------------------------


def test_pickled_model_named_by_a_manifest_is_refused_at_start_up_and_nothing_runs(root, tmp_path):
    marker = tmp_path / "pwned"
    version = root / "v0001"
    files = json.loads((version / "manifest.json").read_text())["files"]
    outside = tmp_path / "evil.pt"
    plant_pickle(outside, marker)
    inside = plant_pickle(version / "model.safetensors", marker)  # a pickle wearing the right name
    cases = [
        ({"model": str(outside)}, "field 'model'"),  # a file elsewhere
        ({"model": "model.safetensors", "files": {**files, "model.safetensors": inside}}, "is not a"),
        ({"model": "model.safetensors", "files": files}, "no checksum for model.safetensors"),  # unlisted
        ({"model": f"open_clip:RN50@{outside}"}, "field 'model'"),  # another loader
    ]
    for changes, message in cases:
        edit_manifest(version, **changes)
        with pytest.raises(RetrievalError, match=message):
            ServerThread(ServeConfig(index=str(root), port=0, metrics_port=-1)).start()
    assert not marker.exists()


def test_pickled_model_published_later_is_refused_at_hot_swap_and_the_old_version_keeps_serving(root, tmp_path):
    marker = tmp_path / "pwned"
    cfg = ServeConfig(index=str(root), port=0, metrics_port=0, watch_interval_s=0.05)
    with ServerThread(cfg) as srv, RetrievalClient(srv.address, timeout=60) as client:
        assert client.index_info().version == "v0001"
        files = json.loads((root / "v0001" / "manifest.json").read_text())["files"]
        shutil.copytree(root / "v0001", tmp_path / "staging")
        digest = plant_pickle(tmp_path / "staging" / "model.safetensors", marker)
        edit_manifest(tmp_path / "staging", model="model.safetensors", files={**files, "model.safetensors": digest})
        shutil.move(tmp_path / "staging", root / "v0002")
        (root / ".CURRENT.tmp").write_text("v0002\n")
        os.replace(root / ".CURRENT.tmp", root / "CURRENT")

        wait_for(lambda: client.index_info().rejected_version, "the server never refused v0002")
        info = client.index_info()
        assert (info.version, info.rejected_version) == ("v0001", "v0002")
        assert "is not a retrieval-sphere-checkpoint/2 checkpoint" in info.rejected_reason
        assert str(tmp_path) not in info.rejected_reason and "v0002/model.safetensors" in info.rejected_reason
        assert len(client.search_text("a cat", k=3)) == 3
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{srv.server.metrics_port}/metrics", timeout=10).read()
        assert b"retrieval_index_rejections_total 1.0" in metrics and b"retrieval_index_rejected_version 2.0" in metrics

        edit_manifest(root / "v0002", model=MODEL)  # fixed: the server swaps to it
        wait_for(lambda: client.index_info().version == "v0002", "the server did not swap to the fixed v0002")
        assert client.index_info().rejected_version == ""
    assert not marker.exists()


def test_a_pickled_checkpoint_passed_to_create_model_is_a_model_error_and_nothing_runs(tmp_path):
    from retrieval.embedding.factory import create_model

    marker = tmp_path / "pwned"
    torch.save({"format": "retrieval-sphere-checkpoint/1", "heads": Plant(marker)}, tmp_path / "old.pt")
    plant_pickle(tmp_path / "raw.pt", marker)
    plant_pickle(tmp_path / "disguised.safetensors", marker)
    for name in ("old.pt", "raw.pt", "disguised.safetensors"):
        with pytest.raises(ModelError, match="not read, since loading one can run code"):
            create_model(str(tmp_path / name))
    assert not marker.exists()


def test_a_checkpoint_cannot_choose_which_module_its_text_tower_imports(tmp_path):
    from retrieval.embedding.checkpoint import save_checkpoint
    from retrieval.embedding.factory import create_model

    model, _, _ = create_model(MODEL, load_weights=False)
    model.config = dataclasses.replace(
        model.config, text_tower=dataclasses.replace(model.config.text_tower, model="package:this")
    )
    path = save_checkpoint(tmp_path / "m.safetensors", model)
    sys.modules.pop("this", None)
    with pytest.raises(ModelError, match="names the text model 'package:this', which no registered model uses"):
        create_model(str(path))
    assert "this" not in sys.modules  # `import this` prints the Zen of Python: never imported


# -- the manifest and the version directory ------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"dim": "256"}, "manifest.json: field 'dim' must be an integer, got \"256\""),
        ({"fingerprint": None}, "manifest.json: field 'fingerprint' must be a non-empty string, got null"),
        ({"files": ["images.faiss"]}, "manifest.json: field 'files' must be an object, got [\"images.faiss\"]"),
        ({"model": 7}, "manifest.json: field 'model' must be a non-empty string, got 7"),
    ],
)
def test_a_manifest_field_of_the_wrong_type_is_one_error_naming_it(root, changes, message):
    edit_manifest(root / "v0001", **changes)
    with pytest.raises(IndexCorruptError) as err:
        IndexVersion.open(root)
    assert str(err.value) == f"v0001/{message}"


def test_a_missing_manifest_field_is_named(root):
    manifest = json.loads((root / "v0001" / "manifest.json").read_text())
    del manifest["dim"]
    (root / "v0001" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IndexCorruptError, match=r"^v0001/manifest.json: field 'dim' is missing$"):
        IndexVersion.open(root)


def test_a_manifest_model_outside_its_version_is_refused_even_a_valid_checkpoint(root, tmp_path):
    from retrieval.embedding.factory import get_model_config, list_models, shipped_weights_path

    checkpoint = tmp_path / "elsewhere" / "model.safetensors"
    checkpoint.parent.mkdir()
    shutil.copyfile(shipped_weights_path(get_model_config(MODEL)), checkpoint)
    for model in (str(checkpoint), "../elsewhere/model.safetensors", "no-such-model"):
        edit_manifest(root / "v0001", model=model)
        version = IndexVersion.open(root)
        with pytest.raises(IndexCorruptError, match="field 'model' .* neither a registered model") as err:
            version.model_source(list_models())
        assert str(tmp_path) not in str(err.value)
        version.close()
    # the server's own --model is trusted: it serves the version with the model it was told to
    with (
        ServerThread(ServeConfig(index=str(root), port=0, metrics_port=-1, model=str(checkpoint))) as srv,
        RetrievalClient(srv.address, timeout=60) as client,
    ):
        assert client.index_info().version == "v0001"


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "sub/meta.sqlite", "..", ""])
def test_a_listed_file_that_is_not_a_plain_name_in_the_version_is_refused(root, name):
    files = json.loads((root / "v0001" / "manifest.json").read_text())["files"]
    edit_manifest(root / "v0001", files={**files, name: "0" * 64})
    with pytest.raises(IndexCorruptError, match="field 'files' must map plain file names"):
        IndexVersion.open(root)


@pytest.mark.parametrize("verify", [True, False])
def test_an_index_file_symlinked_out_of_its_version_is_refused(root, tmp_path, verify):
    for name in ("images.faiss", "meta.sqlite"):
        version = root / "v0001"
        shutil.move(version / name, tmp_path / name)
        (version / name).symlink_to(tmp_path / name)
        with pytest.raises(IndexCorruptError, match=f"^v0001/{name} is a symlink"):
            IndexVersion.open(root, verify=verify)
        (version / name).unlink()
        shutil.move(tmp_path / name, version / name)
    IndexVersion.open(root).close()


def test_a_version_directory_symlinked_outside_the_root_is_refused(root, tmp_path):
    shutil.copytree(root / "v0001", tmp_path / "outside")
    (root / "v0002").symlink_to(tmp_path / "outside", target_is_directory=True)
    (root / "CURRENT").write_text("v0002\n")
    with pytest.raises(IndexCorruptError, match="version v0002 is a symlink that leads outside the index root"):
        IndexVersion.open(root)
    (root / "v0003").symlink_to(root / "v0001", target_is_directory=True)  # inside the root: fine
    IndexVersion.open(root, "v0003").close()


def test_a_fifo_in_place_of_an_index_file_is_refused_without_blocking(root):
    (root / "v0001" / "texts.faiss").unlink()
    os.mkfifo(root / "v0001" / "texts.faiss")
    for verify in (True, False):
        with pytest.raises(IndexCorruptError, match="texts.faiss is not a regular file"):
            IndexVersion.open(root, verify=verify)


# -- the builder copies a checkpoint-file model into the version ----------------------------------------------


def test_a_checkpoint_file_model_is_copied_into_the_version_and_served_from_there(gallery, tmp_path):
    from retrieval.embedding.factory import get_model_config, list_models, shipped_weights_path

    checkpoint = tmp_path / "runs" / "model.safetensors"
    checkpoint.parent.mkdir()
    shutil.copyfile(shipped_weights_path(get_model_config(MODEL)), checkpoint)
    root = tmp_path / "index"
    build(root, *gallery, "--model", str(checkpoint))
    manifest = json.loads((root / "v0001" / "manifest.json").read_text())
    assert manifest["model"] == "model.safetensors"
    assert manifest["files"]["model.safetensors"] == sha256_file(checkpoint)
    version = IndexVersion.open(root)
    assert version.model_source(list_models()) == str(root / "v0001" / "model.safetensors")
    version.close()
    checkpoint.unlink()  # the version needs nothing outside itself
    with (
        ServerThread(ServeConfig(index=str(root), port=0, metrics_port=-1)) as srv,
        RetrievalClient(srv.address, timeout=60) as client,
    ):
        info = client.index_info()
        assert (info.version, info.model, info.model_fingerprint) == ("v0001", "model.safetensors", "7590283e66e90215")
        assert len(client.search_text("a cat", k=2)) == 2


# -- a refused version is retried once its files change, and logged once per change --------------------------


def test_a_rejected_version_is_retried_only_when_its_files_change(root, caplog):
    rejected: list[tuple[str, str]] = []
    engine = Engine(root, on_reject=lambda version, reason: rejected.append((version, reason)))
    assert engine.load()
    bad = publish(root, "v0001", "v0002")
    good = (bad / "texts.faiss").read_bytes()
    (bad / "texts.faiss").write_bytes(good[:-1] + bytes([good[-1] ^ 1]))  # one flipped bit

    async def polls(n: int) -> list[bool]:
        return [await engine.poll_once() for _ in range(n)]

    with caplog.at_level(logging.ERROR, logger="retrieval.serving.engine"):
        assert asyncio.run(polls(5)) == [False] * 5
    assert rejected == [("v0002", "v0002/texts.faiss does not match its checksum in the manifest")]
    assert [r.getMessage() for r in caplog.records].count(
        "not swapping to index version v0002: v0002/texts.faiss does not match its checksum in the manifest "
        "(retried when its files change)"
    ) == 1
    info = engine.info()
    assert (info["version"], info["rejected_version"]) == ("v0001", "v0002")
    assert info["rejected_reason"] == rejected[0][1]

    (bad / ".fixed").write_bytes(good)
    os.replace(bad / ".fixed", bad / "texts.faiss")  # the files change: tried again, and it loads
    assert asyncio.run(polls(1)) == [True]
    info = engine.info()
    assert (info["version"], info["rejected_version"], info["rejected_reason"]) == ("v0002", "", "")
    assert len(rejected) == 1
    engine.live().index.close()
