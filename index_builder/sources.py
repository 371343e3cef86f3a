"""What goes into an index: image folders, captions files (CSV or JSONL) and caption-dataset
folders, turned into items with stable int64 ids and content hashes.

- An image's identity (`key`) is its path relative to the collection's root, so its id survives
  a content change and a rebuild; its `sha256` is the hash of the file's bytes; its `uri`, what
  search results call it, is the key under an optional prefix (never a path of the build host).
- A caption's key is its explicit id when the file gives one, else (image key, text, ordinal of
  that same pair), so unchanged captions keep their ids; its `sha256` is the hash of its text.
- ids are the first 63 bits of sha256(kind, key): deterministic, never -1 (FAISS's "no result").

Captions files are read by `index_builder.captions_file`: every column other than the text, image
and id is an attribute of its caption (`index_builder.attributes`); empty values are absent.

Structural problems (missing folder, unknown format, nothing to index) raise DatasetError;
item-level problems (a line without text, a file that is not an image, a caption naming an image
that is not in the collection) are skipped with a reason, and a skipped item is not indexed.
"""

from __future__ import annotations

import hashlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from index_builder.captions_file import read_captions_file
from retrieval.encoding.images import IMAGE_SUFFIXES
from retrieval.errors import DatasetError
from retrieval.progress import meter

log = logging.getLogger(__name__)


def stable_id(kind: str, key: str) -> int:
    digest = hashlib.sha256(f"{kind}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & ((1 << 63) - 1)


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class ImageItem:
    id: int
    key: str  # path relative to the collection root (posix)
    path: Path  # absolute path of the file (read by the builder, never stored in the index)
    sha256: str
    uri: str  # what results call it: uri prefix + key


@dataclass(frozen=True)
class TextItem:
    id: int
    key: str
    caption: str
    sha256: str
    image_key: str | None = None  # key of the image it describes, when that image is in the collection
    image_ref: str | None = None  # the reference as written (the image_uri of an image named by URL)


@dataclass
class Collection:
    images: list[ImageItem]
    texts: list[TextItem]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (item, reason)
    sources: dict = field(default_factory=dict)  # what was read, for the manifest
    text_attrs: dict[int, dict[str, str]] = field(default_factory=dict)  # caption id -> its extra columns


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def scan_image_folder(root: Path) -> tuple[dict[str, Path], list[tuple[str, str]]]:
    """{relative key: absolute path} of files with an image suffix under root (recursive, sorted,
    hidden entries ignored); other files are reported as skipped."""
    if not root.is_dir():
        raise DatasetError(f"image folder '{root}' does not exist or is not a folder")
    found: dict[str, Path] = {}
    skipped: list[tuple[str, str]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d))
        for name in sorted(filenames):
            if _is_hidden(name):
                continue
            path = Path(dirpath) / name
            key = path.relative_to(root).as_posix()
            if path.suffix.lower() in IMAGE_SUFFIXES:
                found[key] = path.resolve()
            else:
                skipped.append((key, f"not an image file type ('{path.suffix or 'no suffix'}')"))
    return found, skipped


class _TextKeys:
    """Caption keys: the explicit id, else (image key, text, ordinal of that pair)."""

    def __init__(self):
        self.seen: dict[str, int] = {}
        self.ids: set[str] = set()

    def key(self, caption: str, image_key: str | None, explicit_id: str | None) -> str | None:
        if explicit_id is not None:
            if explicit_id in self.ids:
                return None
            self.ids.add(explicit_id)
            return f"id:{explicit_id}"
        pair = f"{image_key or ''}\0{caption}"
        n = self.seen.get(pair, 0)
        self.seen[pair] = n + 1
        return f"{pair}\0{n}"


def _hash_images(
    paths: dict[str, Path], progress: bool, uri_prefix: str
) -> tuple[list[ImageItem], list[tuple[str, str]]]:
    """Content hashes, read in a few threads (hashlib releases the GIL)."""
    keys = list(paths)

    def one(key: str):
        try:
            return file_sha256(paths[key]), None
        except OSError as e:
            return None, f"cannot be read: {e.strerror or e}"

    items, skipped = [], []
    with (
        ThreadPoolExecutor(max_workers=4) as pool,
        meter(len(keys), "hash images", "file", enabled=progress and len(keys) >= 1000) as bar,
    ):
        for key, (digest, error) in zip(keys, pool.map(one, keys)):
            bar.update()
            if error:
                skipped.append((key, error))
            else:
                items.append(ImageItem(stable_id("image", key), key, paths[key], digest, uri_prefix + key))
    return items, skipped


def _make_texts(
    rows: list[dict], resolve, skipped: list[tuple[str, str]], attrs: dict[int, dict[str, str]]
) -> list[TextItem]:
    """Caption items of `rows`, their attributes into `attrs`; `resolve(ref)` gives (image key or None,
    why the caption is skipped or None)."""
    keys, texts = _TextKeys(), []
    for row in rows:
        image_key, problem = resolve(row["image"]) if row["image"] else (None, None)
        if problem:
            skipped.append((row["where"], problem))
            continue
        key = keys.key(row["text"], image_key or row["image"], row["id"])
        if key is None:
            skipped.append((row["where"], f"duplicate caption id '{row['id']}'"))
            continue
        texts.append(
            TextItem(stable_id("text", key), key, row["text"], text_sha256(row["text"]), image_key, row["image"])
        )
        if row.get("attrs"):
            attrs[texts[-1].id] = row["attrs"]
    return texts


def from_dataset(root: Path, split: str | None, progress: bool = True, uri_prefix: str = "") -> Collection:
    from retrieval.encoding.datasets import load_caption_dataset

    ds = load_caption_dataset(root, split)
    images, skipped = _hash_images(
        {name: (root / "images" / name).resolve() for name in ds.images}, progress, uri_prefix
    )
    skipped = list(ds.skipped) + skipped
    keys, texts = _TextKeys(), []
    for caption, owner in zip(ds.captions, ds.caption_image):
        name = ds.images[int(owner)]
        key = keys.key(caption, name, None)
        texts.append(TextItem(stable_id("text", key), key, caption, text_sha256(caption), name, name))
    return Collection(images, texts, skipped, {"dataset": str(root.resolve()), "split": split})


def from_files(
    images_dir: Path | None, captions: Path | None, progress: bool = True, uri_prefix: str = ""
) -> Collection:
    """An image folder and/or a captions file. Without a folder, the images a captions file
    references (relative to the file's folder, and inside it) are the collection's images. A
    caption naming an image that is not in the collection is skipped; one naming it by URL is kept
    as a caption of that URL."""
    skipped: list[tuple[str, str]] = []
    found: dict[str, Path] = {}
    if images_dir is not None:
        found, skipped = scan_image_folder(images_dir)
    rows: list[dict] = []
    if captions is not None:
        rows, bad_rows = read_captions_file(captions)
        skipped += bad_rows
    base = images_dir.resolve() if images_dir is not None else (captions.parent.resolve() if captions else None)

    def resolve(ref: str) -> tuple[str | None, str | None]:
        if "://" in ref:
            return None, None
        path = Path(os.path.normpath(base / ref))  # lexically, as the folder scan names a symlink: by its own path
        try:
            key = path.relative_to(base).as_posix()
        except ValueError:
            where = "the image folder" if images_dir is not None else "the captions file's folder"
            return None, f"its image '{ref}' is outside {where}"
        if key not in found and images_dir is None and path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
            found[key] = path
        if key not in found:
            return None, f"its image '{ref}' is not in the collection"
        return key, None

    text_attrs: dict[int, dict[str, str]] = {}
    texts = _make_texts(rows, resolve, skipped, text_attrs)
    images, hash_skipped = _hash_images(found, progress, uri_prefix)
    skipped += hash_skipped
    sources = {
        "images": str(images_dir.resolve()) if images_dir else None,
        "captions": str(captions.resolve()) if captions else None,
    }
    return Collection(images, texts, skipped, sources, text_attrs)


def collect(
    images: str | None = None,
    captions: str | None = None,
    dataset: str | None = None,
    split: str | None = None,
    progress: bool = True,
    uri_prefix: str = "",
) -> Collection:
    if dataset and (images or captions):
        raise DatasetError("--dataset cannot be combined with --images or --captions")
    if split and not dataset:
        raise DatasetError("--split applies to --dataset only")
    if not (dataset or images or captions):
        raise DatasetError("nothing to index: give --images DIR, --captions FILE or --dataset DIR")
    if dataset:
        coll = from_dataset(Path(dataset), split, progress, uri_prefix)
    else:
        coll = from_files(Path(images) if images else None, Path(captions) if captions else None, progress, uri_prefix)
    if not coll.images and not coll.texts:
        raise DatasetError(
            f"the collection is empty: no image files and no captions found ({len(coll.skipped)} item(s) skipped)"
        )
    _check_unique_ids(coll)
    log.info(
        "collection: %d image(s), %d caption(s), %d item(s) skipped",
        len(coll.images),
        len(coll.texts),
        len(coll.skipped),
    )
    return coll


def _check_unique_ids(coll: Collection) -> None:
    for kind, items in (("image", coll.images), ("caption", coll.texts)):
        ids = [it.id for it in items]
        if len(set(ids)) != len(ids):  # 63-bit hashes: astronomically unlikely, but never silently
            raise DatasetError(f"two {kind} keys hash to the same 63-bit id; rename one of them")
