"""The layout of an index root, and the rules for reading it as data:

    ROOT/CURRENT              one line: the live version's directory name, e.g. "v0007"
    ROOT/v0007/manifest.json  model, fingerprint, dim, counts, index types, query bank, checksums
    ROOT/v0007/images.faiss   IndexIDMap2 over an inner-product index of image vectors [g, b_g]
    ROOT/v0007/texts.faiss    the same for captions
    ROOT/v0007/meta.sqlite    the metadata (`retrieval.store.schema`)
    ROOT/v0007/model.safetensors   the model, when the build's was a checkpoint file

Only plain files inside a version directory are read (no symlinks, no paths in names), and a
version directory that is a symlink must stay under the root.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from pathlib import Path

from retrieval.errors import IndexCorruptError

FORMAT = "sphere-index/2"  # /2: vectors carry the inverted-softmax bias as coordinate D+1
CURRENT = "CURRENT"
MANIFEST = "manifest.json"
META = "meta.sqlite"
INDEX_FILES = {"image": "images.faiss", "text": "texts.faiss"}
MODEL_FILE = "model.safetensors"  # where the builder copies a checkpoint-file model
CHECKPOINT_SUFFIX = ".safetensors"
VERSION_RE = re.compile(r"^v(\d{4,})$")
# How an index file is read (the manifest's `storage`, per modality): whole into RAM, or, for an IVF
# index built on disk, its inverted lists memory-mapped from the `.ivfdata` file beside it
STORAGE_MEMORY, STORAGE_MMAP = "memory", "mmap"


def version_name(number: int) -> str:
    return f"v{number:04d}"


def list_versions(root: str | Path) -> list[str]:
    """Published versions under root, oldest first: vNNNN directories holding a manifest. A publish
    renames a finished temporary directory (its manifest written last) to vNNNN, so nothing a killed
    build leaves behind (a `.tmp-*` directory) is listed; a version it renamed but did not make
    CURRENT is complete, and listed."""
    root = Path(root)
    if not root.is_dir():
        return []
    names = [p.name for p in root.iterdir() if p.is_dir() and VERSION_RE.match(p.name) and (p / MANIFEST).is_file()]
    return sorted(names, key=lambda n: int(VERSION_RE.match(n).group(1)))


def read_current(root: str | Path) -> str | None:
    """The version CURRENT names, or None when nothing is published yet."""
    path = Path(root) / CURRENT
    try:
        name = path.read_text().strip()
    except FileNotFoundError:
        return None
    if not VERSION_RE.match(name):
        raise IndexCorruptError(f"{path} names '{name}', which is not a version directory name")
    return name


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open_plain(path) as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def is_plain_name(name: object) -> bool:
    """A file name that stays in its directory: no separators, not '.' or '..', no NUL."""
    return isinstance(name, str) and name not in ("", ".", "..") and not any(c in name for c in "/\\\0")


def open_plain(path: str | Path):
    """Open a regular file for reading, refusing a symlink, a FIFO, a device or a directory
    (O_NOFOLLOW; O_NONBLOCK so that a FIFO cannot block the open)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as e:
        raise IndexCorruptError(f"{shown(path)} cannot be opened as a plain file ({e.strerror})") from None
    f = os.fdopen(fd, "rb")
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        f.close()
        raise IndexCorruptError(f"{shown(path)} is not a regular file")
    return f


def shown(path: str | Path) -> str:
    """A path as messages show it: VERSION/NAME, relative to the index root (no host paths)."""
    path = Path(path)
    return f"{path.parent.name}/{path.name}"


def plain_file(directory: Path, name: str) -> Path:
    """directory/name when it is a regular file there (not a symlink, which could lead anywhere)."""
    path = directory / name
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        raise IndexCorruptError(f"{shown(path)} is missing") from None
    if not stat.S_ISREG(mode):
        raise IndexCorruptError(
            f"{shown(path)} is {'a symlink' if stat.S_ISLNK(mode) else 'not a regular file'}; "
            f"a version holds plain files only"
        )
    return path


def is_checkpoint_name(model: str) -> bool:
    """Does a manifest's model name a checkpoint file in the version (rather than a registered model)?"""
    return is_plain_name(model) and model.endswith(CHECKPOINT_SUFFIX)


def version_dir(root: str | Path, version: str) -> Path:
    """ROOT/version, refused unless its name is a version name and it is a directory that stays
    under the index root (a symlinked version must resolve inside it)."""
    root = Path(root)
    if not VERSION_RE.match(version):
        raise IndexCorruptError(f"'{version}' is not a version directory name")
    path = root / version
    if path.is_symlink() and not path.resolve().is_relative_to(root.resolve()):
        raise IndexCorruptError(f"version {version} is a symlink that leads outside the index root")
    if not path.is_dir():
        raise IndexCorruptError(f"version {version} is not a directory")
    return path


def version_signature(root: str | Path, version: str) -> tuple:
    """A cheap signature of a version's files (name, inode, size, mtime of each entry, symlinks
    not followed): it changes when a file is rewritten, added or removed."""
    path = Path(root) / version
    try:
        entries = sorted(os.scandir(path), key=lambda e: e.name) if path.is_dir() else []
        stats = [(e.name, *_stat_key(e.stat(follow_symlinks=False))) for e in entries]
        return (_stat_key(os.lstat(path)), *stats)
    except OSError:
        return ()


def _stat_key(st: os.stat_result) -> tuple[int, int, int]:
    return st.st_ino, st.st_size, st.st_mtime_ns
