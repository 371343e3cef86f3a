"""Versions under an index root: build in `ROOT/.tmp-*` (its manifest written last), fsync, rename to
`ROOT/vNNNN`, then flip `CURRENT` atomically (temp file, fsync, os.replace, fsync of the root). A
reader resolving CURRENT sees the previous complete version or the new complete one, never a
partial one. What a kill leaves: a `.tmp-*` directory (never a version; the next build or gc
removes it), a `.CURRENT.*` file (gc removes it), or, killed between the rename and the flip, a
complete version that CURRENT does not name (listed, not current, like a version rolled back
from). A version is a vNNNN directory with a manifest (`retrieval.store.reader.list_versions`); listing,
pruning and the server's available versions all go by that. Old versions are pruned to the newest
N; the version CURRENT names is never removed. One builder at a time
holds `ROOT/.lock` (a POSIX record lock: it dies with the builder's process, even on SIGKILL).
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

from index_builder.encode import fsync_path
from retrieval.errors import RetrievalError
from retrieval.store.layout import CURRENT, MANIFEST, VERSION_RE, list_versions, read_current, version_name

log = logging.getLogger(__name__)

LOCK = ".lock"
TMP_PREFIX = ".tmp-"
WORK_PREFIX = ".work-"


class BuildLockedError(RetrievalError):
    """Another builder (or gc) is working on the same index root."""


class RootLock:
    """Exclusive lock on ROOT/.lock for the duration of a build or gc.

    A POSIX record lock (`lockf`, F_SETLK), not `flock`: an flock (and a Linux open-file-description
    lock) belongs to the open file description, which fork() shares with every child, so a DataLoader
    worker forked by the builder kept the lock after the builder was SIGKILLed. A record lock belongs
    to the process: children do not inherit it and the kernel drops it when the process dies. Its
    two traps are within one process, where a second lock on the file succeeds and closing any
    descriptor of the file drops the lock; `_HELD` keeps this process from opening a held lock file
    again, so a second RootLock here fails as one in another process does."""

    _HELD: set[tuple[int, int]] = set()  # (st_dev, st_ino) of the lock files this process holds
    _GUARD = threading.Lock()

    def __init__(self, root: Path):
        self.root = Path(root)
        self.fd: int | None = None
        self._key: tuple[int, int] | None = None

    def _busy(self) -> BuildLockedError:
        return BuildLockedError(f"another index-builder is working on '{self.root}' (its {LOCK} is held)")

    def __enter__(self) -> RootLock:
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / LOCK
        with self._GUARD:
            try:
                st = os.stat(path)
                if (st.st_dev, st.st_ino) in self._HELD:
                    raise self._busy()
            except FileNotFoundError:
                pass
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.EACCES, errno.EAGAIN):
                    raise self._busy() from None
                raise
            st = os.fstat(fd)
            self.fd, self._key = fd, (st.st_dev, st.st_ino)
            self._HELD.add(self._key)
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            with self._GUARD:
                os.close(self.fd)  # closing the descriptor releases the record lock
                self._HELD.discard(self._key)
                self.fd, self._key = None, None


def all_version_dirs(root: Path) -> list[str]:
    """Every vNNNN directory, complete or not, oldest first (a new version's number follows them all)."""
    if not root.is_dir():
        return []
    names = [p.name for p in root.iterdir() if p.is_dir() and VERSION_RE.match(p.name)]
    return sorted(names, key=lambda n: int(VERSION_RE.match(n).group(1)))


def next_version(root: Path) -> str:
    existing = all_version_dirs(root)
    return version_name(int(VERSION_RE.match(existing[-1]).group(1)) + 1 if existing else 1)


def new_temp_dir(root: Path) -> Path:
    path = root / f"{TMP_PREFIX}{uuid.uuid4().hex[:12]}"
    path.mkdir(parents=True)
    return path


def fsync_tree(directory: Path) -> None:
    for path in directory.iterdir():
        if path.is_file():
            fsync_path(path)
    fsync_path(directory)


def write_current(root: Path, name: str) -> None:
    """Point CURRENT at `name` atomically."""
    tmp = root / f".{CURRENT}.{uuid.uuid4().hex[:8]}"
    with open(tmp, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / CURRENT)
    fsync_path(root)


def publish(root: Path, tmp_dir: Path, name: str, keep: int) -> Path:
    """Make the finished `tmp_dir` the live version `name` and prune old versions."""
    fsync_tree(tmp_dir)
    final = root / name
    if final.exists():
        raise RetrievalError(f"{final} already exists; refusing to overwrite a published version")
    os.rename(tmp_dir, final)
    fsync_path(root)
    write_current(root, name)
    log.info("published %s (CURRENT -> %s)", final, name)
    prune(root, keep)
    return final


def prune(root: Path, keep: int) -> list[str]:
    """Remove all but the newest `keep` versions, never the one CURRENT names; returns removed names."""
    if keep < 1:
        raise RetrievalError(f"--keep must be at least 1, got {keep}")
    current = read_current(root)
    versions = list_versions(root)
    doomed = [v for v in versions[: max(0, len(versions) - keep)] if v != current]
    for name in doomed:
        # rename first so a half-deleted directory is never mistaken for a version
        trash = root / f"{TMP_PREFIX}gc-{name}-{uuid.uuid4().hex[:6]}"
        os.rename(root / name, trash)
        shutil.rmtree(trash, ignore_errors=True)
        log.info("removed old version %s", name)
    return doomed


def gc(root: Path, keep: int, work: bool = False) -> dict:
    """Prune versions to `keep`, remove leftover temporary build directories and CURRENT files, and
    with `work` the resumable encoded shards of interrupted builds."""
    root = Path(root)
    if not root.is_dir():
        raise RetrievalError(f"index root '{root}' does not exist")
    with RootLock(root):
        removed = prune(root, keep)
        leftovers = [
            p
            for p in root.iterdir()
            if p.is_dir() and (p.name.startswith(TMP_PREFIX) or (work and p.name.startswith(WORK_PREFIX)))
        ]
        for path in leftovers:
            shutil.rmtree(path, ignore_errors=True)
        for path in root.glob(f".{CURRENT}.*"):  # write_current's temp file, left by a kill before its rename
            path.unlink(missing_ok=True)
    return {
        "removed_versions": removed,
        "removed_dirs": sorted(p.name for p in leftovers),
        "current": read_current(root),
        "versions": list_versions(root),
    }


@dataclass
class VersionInfo:
    name: str
    current: bool
    manifest: dict | None

    def row(self) -> dict:
        m = self.manifest or {}
        return {
            "version": self.name,
            "current": self.current,
            "created_at": m.get("created_at"),
            "model": m.get("model"),
            "num_images": m.get("num_images"),
            "num_texts": m.get("num_texts"),
            "index_factory": m.get("index_factory"),
            "incremental_from": (m.get("incremental") or {}).get("base"),
        }


def list_index(root: Path) -> list[VersionInfo]:
    """The versions under root (`list_versions`), oldest first."""
    root = Path(root)
    if not root.is_dir():
        raise RetrievalError(f"index root '{root}' does not exist")
    current = read_current(root)
    infos = []
    for name in list_versions(root):
        try:
            manifest = json.loads((root / name / MANIFEST).read_text())
        except (OSError, ValueError):
            manifest = None  # a manifest damaged after it was published (the server refuses the version)
        infos.append(VersionInfo(name, name == current, manifest))
    return infos


def incomplete_dirs(root: Path) -> list[str]:
    """vNNNN directories without a manifest: not versions (not made by a publish; left alone)."""
    complete = set(list_versions(root))
    return [name for name in all_version_dirs(Path(root)) if name not in complete]


def work_dirs(root: Path) -> list[str]:
    return (
        sorted(p.name for p in Path(root).iterdir() if p.is_dir() and p.name.startswith(WORK_PREFIX))
        if Path(root).is_dir()
        else []
    )
