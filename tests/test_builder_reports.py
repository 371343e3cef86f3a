"""What the index builder reports agrees with what it indexed: every caption is either indexed or
skipped, the builder indexes exactly the image formats the server decodes, results name images by
their collection key (never a host path), a build with no change publishes nothing, and only
published versions are listed, whatever a kill left behind."""
from __future__ import annotations

import csv
import io
import shutil
import sqlite3
from pathlib import Path

from PIL import Image

from index_builder.build import BuildConfig, build
from retrieval.errors import InvalidInputError
from retrieval.images import IMAGE_SUFFIXES, load_image

MODEL = "lite0-minilm"


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


def test_builder_indexes_exactly_the_formats_the_server_decodes(tmp_path, flickr_mini, default_model):
    photos = tmp_path / "photos"
    src = flickr_mini / "images" / _photos(flickr_mini, tmp_path / "src", 1)[0]
    with Image.open(src) as im:
        photo = im.convert("RGB").resize((160, 120))
    written = {}
    for fmt, name in [("JPEG", "a.jpg"), ("JPEG", "b.jpeg"), ("PNG", "c.png"), ("WEBP", "d.webp"), ("GIF", "e.gif"),
                      ("BMP", "f.bmp"), ("TIFF", "g.tif"), ("PPM", "h.ppm"), ("ICO", "i.ico"),
                      ("TIFF", "tiff-inside.jpg")]:
        buf = io.BytesIO()
        photo.save(buf, fmt)
        written[name] = buf.getvalue()
        photos.mkdir(exist_ok=True)
        (photos / name).write_bytes(written[name])

    def server_decodes(data: bytes) -> bool:   # what the server does with a query's bytes
        try:
            load_image(data)
            return True
        except InvalidInputError:
            return False

    m = _build(default_model, tmp_path / "idx", images=str(photos))
    indexed = {Path(u).name for (u,) in _rows(tmp_path / "idx" / "v0001", "SELECT uri FROM images")}
    assert indexed == {name for name, data in written.items() if server_decodes(data)}
    assert indexed == {"a.jpg", "b.jpeg", "c.png", "d.webp", "e.gif", "f.bmp"}
    assert {Path(n).suffix for n in indexed} == set(IMAGE_SUFFIXES)
    reasons = {s["item"]: s["reason"] for s in m["report"]["skipped"]}
    assert set(reasons) == {"g.tif", "h.ppm", "i.ico", "tiff-inside.jpg"}
    assert "not an image file type" in reasons["g.tif"] and "not a decodable image" in reasons["tiff-inside.jpg"]
