"""What the index builder reports agrees with what it indexed: every caption is either indexed or
skipped, the builder indexes exactly the image formats the server decodes, results name images by
their collection key (never a host path), a build with no change publishes nothing, and only
published versions are listed, whatever a kill left behind."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

from PIL import Image

from index_builder.build import BuildConfig, build
from index_builder.cli import main
from index_builder.publish import gc, incomplete_dirs, list_index, new_temp_dir, next_version, publish, write_current
from index_builder.sources import stable_id
from retrieval.encoding.images import IMAGE_SUFFIXES, load_image
from retrieval.errors import InvalidInputError
from retrieval.store.layout import CURRENT, list_versions, read_current

MODEL = "lite0-minilm"
REPO = Path(__file__).resolve().parents[1]


def _build(loaded, out: Path, **kw) -> dict:
    return build(BuildConfig(out=str(out), model=MODEL, progress=False, workers=0, **kw), loaded=loaded)


def _rows(version_dir: Path, sql: str) -> list[tuple]:
    db = sqlite3.connect(version_dir / "meta.sqlite")
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


def _photos(flickr_mini: Path, dest: Path, n: int) -> list[str]:
    dest.mkdir(parents=True, exist_ok=True)
    names = sorted(p.name for p in (flickr_mini / "images").iterdir())[:n]
    for name in names:
        shutil.copyfile(flickr_mini / "images" / name, dest / name)
    return names


def _write_csv(path: Path, rows: list[tuple[str, str]]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "caption"])
        writer.writerows(rows)


def test_every_caption_row_is_either_indexed_or_skipped_never_both(tmp_path, flickr_mini, default_model):
    photos = tmp_path / "photos"
    a, b = _photos(flickr_mini, photos, 2)
    (photos / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(3000))
    shutil.copyfile(photos / a, tmp_path / "outside.jpg")
    rows = [
        (a, "a caption of the first photo"),  # caps.csv:2
        (b, "a caption of the second photo"),  # caps.csv:3
        ("missing.jpg", "a caption of an image that does not exist"),  # caps.csv:4
        (a, ""),  # caps.csv:5
        ("", "a caption with no image"),  # caps.csv:6
        ("https://cdn.example/x.jpg", "a caption of an image named by URL"),
        ("corrupt.jpg", "a caption of an image that does not decode"),
        ("../outside.jpg", "a caption of an image outside the folder"),
        ("missing.jpg", "another caption of the missing image"),
    ]  # caps.csv:10
    _write_csv(tmp_path / "caps.csv", rows)
    m = _build(default_model, tmp_path / "idx", images=str(photos), captions=str(tmp_path / "caps.csv"))

    indexed = {c for (c,) in _rows(tmp_path / "idx" / "v0001", "SELECT caption FROM texts")}
    reasons = {s["item"]: s["reason"] for s in m["report"]["skipped"]}
    assert reasons == {
        "caps.csv:4": "its image 'missing.jpg' is not in the collection",
        "caps.csv:5": "no caption text",
        "caps.csv:9": "its image '../outside.jpg' is outside the image folder",
        "caps.csv:10": "its image 'missing.jpg' is not in the collection",
        "corrupt.jpg": reasons["corrupt.jpg"],
    }
    assert "decod" in reasons["corrupt.jpg"]
    assert reasons["corrupt.jpg"].endswith("; its 1 caption(s) are skipped too")
    for line, (image, caption) in enumerate(rows, start=2):
        listed = f"caps.csv:{line}" in reasons or image in reasons
        assert listed != (caption in indexed), (line, image, caption)  # one or the other, never both
    assert indexed == {
        "a caption of the first photo",
        "a caption of the second photo",
        "a caption with no image",
        "a caption of an image named by URL",
    }
    c = m["report"]["counts"]
    assert m["num_texts"] == c["texts_indexed"] == len(indexed) == 4
    assert c["texts_found"] - c["texts_dropped_with_bad_image"] == c["texts_indexed"]
    assert c["texts_dropped_with_bad_image"] == 1
    assert m["num_images"] == 2 and c["skipped"] == len(m["report"]["skipped"]) == 5
    by_caption = {c: u for c, u in _rows(tmp_path / "idx" / "v0001", "SELECT caption, image_uri FROM texts")}
    assert by_caption["a caption of an image named by URL"] == "https://cdn.example/x.jpg"
    assert by_caption["a caption with no image"] is None


def test_builder_indexes_exactly_the_formats_the_server_decodes(tmp_path, flickr_mini, default_model):
    photos = tmp_path / "photos"
    src = flickr_mini / "images" / _photos(flickr_mini, tmp_path / "src", 1)[0]
    with Image.open(src) as im:
        photo = im.convert("RGB").resize((160, 120))
    written = {}
    for fmt, name in [
        ("JPEG", "a.jpg"),
        ("JPEG", "b.jpeg"),
        ("PNG", "c.png"),
        ("WEBP", "d.webp"),
        ("GIF", "e.gif"),
        ("BMP", "f.bmp"),
        ("TIFF", "g.tif"),
        ("PPM", "h.ppm"),
        ("ICO", "i.ico"),
        ("TIFF", "tiff-inside.jpg"),
    ]:
        buf = io.BytesIO()
        photo.save(buf, fmt)
        written[name] = buf.getvalue()
        photos.mkdir(exist_ok=True)
        (photos / name).write_bytes(written[name])

    def server_decodes(data: bytes) -> bool:  # what the server does with a query's bytes
        try:
            load_image(data)
            return True
        except InvalidInputError:
            return False

    m = _build(default_model, tmp_path / "idx", images=str(photos))
    indexed = {u for (u,) in _rows(tmp_path / "idx" / "v0001", "SELECT uri FROM images")}
    assert indexed == {name for name, data in written.items() if server_decodes(data)}
    assert indexed == {"a.jpg", "b.jpeg", "c.png", "d.webp", "e.gif", "f.bmp"}
    assert {Path(n).suffix for n in indexed} == set(IMAGE_SUFFIXES)
    reasons = {s["item"]: s["reason"] for s in m["report"]["skipped"]}
    assert set(reasons) == {"g.tif", "h.ppm", "i.ico", "tiff-inside.jpg"}
    assert "not an image file type" in reasons["g.tif"] and "not a decodable image" in reasons["tiff-inside.jpg"]


def test_uris_are_collection_keys_under_an_optional_prefix(tmp_path, flickr_mini, default_model):
    photos = tmp_path / "photos"
    names = _photos(flickr_mini, photos / "sub", 3)
    (photos / "sub" / names[2]).rename(photos / names[2])
    keys = [f"sub/{names[0]}", f"sub/{names[1]}", names[2]]
    _write_csv(tmp_path / "caps.csv", [(k, f"caption {i}") for i, k in enumerate(keys)])

    def uris(root: Path, version: str) -> tuple[dict, dict]:
        images = dict(_rows(root / version, "SELECT id, uri FROM images"))
        return images, dict(_rows(root / version, "SELECT caption, image_uri FROM texts"))

    plain = tmp_path / "plain"
    _build(default_model, plain, images=str(photos), captions=str(tmp_path / "caps.csv"))
    images, texts = uris(plain, "v0001")
    assert images == {stable_id("image", k): k for k in keys}  # relative to the image folder
    assert texts == {f"caption {i}": k for i, k in enumerate(keys)}

    prefix = "https://cdn.example/photos/"
    cdn = tmp_path / "cdn"
    assert (
        main(
            [
                "-q",
                "build",
                "--out",
                str(cdn),
                "--images",
                str(photos),
                "--captions",
                str(tmp_path / "caps.csv"),
                "--uri-prefix",
                prefix,
                "--no-progress",
                "--workers",
                "0",
            ]
        )
        == 0
    )
    images, texts = uris(cdn, "v0001")
    assert images == {stable_id("image", k): prefix + k for k in keys}  # same ids, prefixed uris
    assert texts == {f"caption {i}": prefix + k for i, k in enumerate(keys)}

    # captions only: the images are those the file names, relative to its folder
    alone = tmp_path / "alone"
    _write_csv(
        tmp_path / "caps2.csv",
        [(f"photos/{k}", f"caption {i}") for i, k in enumerate(keys)]
        + [(str(flickr_mini / "images" / names[0]), "an absolute path outside the folder")],
    )
    m = _build(default_model, alone, captions=str(tmp_path / "caps2.csv"))
    images, texts = uris(alone, "v0001")
    assert sorted(images.values()) == sorted(f"photos/{k}" for k in keys)
    reasons = {s["item"]: s["reason"] for s in m["report"]["skipped"]}
    assert "outside the captions file's folder" in reasons["caps2.csv:5"]

    # a caption dataset: names under its images/ folder
    ds = tmp_path / "ds"
    m = _build(default_model, ds, dataset=str(flickr_mini), split="dev", uri_prefix="s3://bucket/")
    images, texts = uris(ds, "v0001")
    assert len(images) == 16 and all(
        u.startswith("s3://bucket/") and "/" not in u[len("s3://bucket/") :] for u in images.values()
    )

    # nowhere does a uri carry this machine's paths
    for root in (plain, cdn, alone, ds):
        for version in list_versions(root):
            for (uri,) in _rows(root / version, "SELECT uri FROM images UNION ALL SELECT image_uri FROM texts"):
                assert uri is None or (
                    str(tmp_path) not in uri and str(flickr_mini) not in uri and not uri.startswith("/")
                ), uri


def test_an_incremental_build_with_no_change_publishes_nothing(tmp_path, flickr_mini, default_model, capsys):
    photos = tmp_path / "photos"
    names = _photos(flickr_mini, photos, 3)
    (photos / "notes.txt").write_text("not an image\n")
    (photos / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(3000))
    _write_csv(tmp_path / "caps.csv", [(n, f"caption {i}") for i, n in enumerate(names)])
    root = tmp_path / "idx"
    kw = dict(images=str(photos), captions=str(tmp_path / "caps.csv"), incremental=True)
    first = _build(default_model, root, **kw)
    assert first["version"] == "v0001" and "up_to_date" not in first
    before = sorted(p.name for p in root.iterdir())

    again = _build(default_model, root, **kw)
    assert again["up_to_date"] is True and again["version"] == "v0001" and again["num_images"] == 3
    assert sorted(p.name for p in root.iterdir()) == before and read_current(root) == "v0001"
    assert (
        main(
            [
                "build",
                "--out",
                str(root),
                "--images",
                str(photos),
                "--captions",
                str(tmp_path / "caps.csv"),
                "--incremental",
                "--no-progress",
                "--workers",
                "0",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.strip() == (
        "the index is up to date: v0001 already holds these 3 images and 3 captions; nothing published"
    )
    assert sorted(p.name for p in root.iterdir()) == before and list_versions(root) == ["v0001"]

    # any change to what results would show publishes: a caption, the uri prefix
    _write_csv(tmp_path / "caps.csv", [(n, f"caption {i}") for i, n in enumerate(names[:2])] + [(names[2], "new")])
    assert _build(default_model, root, **kw)["version"] == "v0002"
    assert _build(default_model, root, **kw, uri_prefix="https://cdn.example/")["version"] == "v0003"
    assert _build(default_model, root, **kw, uri_prefix="https://cdn.example/").get("up_to_date")
    assert _build(default_model, root, **{**kw, "incremental": False})["version"] == "v0004"  # a full one always does


def test_build_log_off_a_terminal_has_progress_lines_not_frames(tmp_path, flickr_mini):
    photos = tmp_path / "photos"
    names = _photos(flickr_mini, photos, 3)
    _write_csv(tmp_path / "caps.csv", [(n, f"caption {i}") for i, n in enumerate(names)])
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "index_builder",
            "build",
            "--out",
            str(tmp_path / "idx"),
            "--images",
            str(photos),
            "--captions",
            str(tmp_path / "caps.csv"),
            "--workers",
            "0",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "\r" not in proc.stderr  # stderr is a pipe here: no bar frames, the model's either
    assert re.search(
        r"INFO retrieval\.progress: encode images: 3/3 \(100\.0%\), .*img/s, ETA 00:00$", proc.stderr, re.M
    )
    assert re.search(r"INFO retrieval\.progress: encode captions: 3/3 \(100\.0%\)", proc.stderr)
    assert proc.stdout.startswith("published v0001: 3 images, 3 captions")


def _fake_version(root: Path, n: int) -> Path:
    tmp = new_temp_dir(root)
    (tmp / "manifest.json").write_text(json.dumps({"model": MODEL, "dim": 4, "num_images": n, "num_texts": 0}))
    return tmp


def test_only_published_versions_are_listed_whatever_a_kill_left(tmp_path, capsys):
    root = tmp_path / "idx"
    publish(root, _fake_version(root, 1), next_version(root), keep=10)
    publish(root, _fake_version(root, 2), next_version(root), keep=10)
    # killed while writing a version: a temp dir without its manifest, and one finished but not renamed
    (new_temp_dir(root) / "images.faiss").write_bytes(b"partial")
    _fake_version(root, 3)
    # killed while flipping CURRENT: its temp file
    (root / f".{CURRENT}.deadbeef").write_text("v0002\n")
    # killed between the rename and the flip: a complete version that CURRENT does not name
    renamed = _fake_version(root, 3)
    renamed.rename(root / next_version(root))
    # killed while gc removed an old version: its renamed remains
    (root / ".tmp-gc-v0000-abcdef").mkdir()
    # a vNNNN directory that no publish made (no manifest): not a version
    (root / "v0009").mkdir()
    (root / "v0009" / "images.faiss").write_bytes(b"copied halfway")

    assert read_current(root) == "v0002"
    assert list_versions(root) == ["v0001", "v0002", "v0003"]
    assert [(v.name, v.current) for v in list_index(root)] == [("v0001", False), ("v0002", True), ("v0003", False)]
    assert incomplete_dirs(root) == ["v0009"]
    assert main(["list", str(root), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [v["version"] for v in listed["versions"]] == ["v0001", "v0002", "v0003"]
    assert listed["incomplete_dirs"] == ["v0009"]
    assert main(["list", str(root)]) == 0
    out = capsys.readouterr().out
    assert "v0009: not a version" in out and ".tmp" not in out and "CURRENT" not in out

    assert next_version(root) == "v0010"  # never reuses a name on disk
    result = gc(root, keep=2)
    assert result["removed_versions"] == ["v0001"] and result["versions"] == ["v0002", "v0003"]
    assert sorted(p.name for p in root.iterdir()) == [".lock", CURRENT, "v0002", "v0003", "v0009"]
    write_current(root, "v0003")  # the renamed version is usable: roll forward
    assert [(v.name, v.current) for v in list_index(root)] == [("v0002", False), ("v0003", True)]
