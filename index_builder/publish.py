"""Versions under an index root: build in `ROOT/.tmp-*`, fsync, rename to `ROOT/vNNNN`, then flip
`CURRENT` atomically (temp file, fsync, os.replace, fsync of the root). A reader resolving CURRENT
sees the previous complete version or the new complete one, never a partial one. Old versions
are pruned to the newest N; the version CURRENT names is never removed. One builder at a time
holds `ROOT/.lock` (an flock, released by the kernel even when the builder is SIGKILLed).
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from retrieval.errors import RetrievalError
from retrieval.store.reader import CURRENT, MANIFEST, VERSION_RE, list_versions, read_current, version_name

from index_builder.encode import fsync_path

log = logging.getLogger(__name__)

LOCK = ".lock"
TMP_PREFIX = ".tmp-"
WORK_PREFIX = ".work-"


class BuildLockedError(RetrievalError):
    """Another builder (or gc) is working on the same index root."""


class RootLock:
    """Exclusive flock on ROOT/.lock for the duration of a build or gc."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.fd: int | None = None

    def __enter__(self) -> "RootLock":
        self.root.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.root / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            self.fd = None
            raise BuildLockedError(f"another index-builder is working on '{self.root}' (its {LOCK} is held)") from None
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def all_version_dirs(root: Path) -> list[str]:
    """Every vNNNN directory, complete or not, oldest first."""
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
    versions = all_version_dirs(root)
    doomed = [v for v in versions[: max(0, len(versions) - keep)] if v != current]
    for name in doomed:
        # rename first so a half-deleted directory is never mistaken for a version
        trash = root / f"{TMP_PREFIX}gc-{name}-{uuid.uuid4().hex[:6]}"
        os.rename(root / name, trash)
        shutil.rmtree(trash, ignore_errors=True)
        log.info("removed old version %s", name)
    return doomed


def gc(root: Path, keep: int, work: bool = False) -> dict:
    """Prune versions to `keep`, remove leftover temporary build directories, and with `work`
    the resumable encoded shards of interrupted builds."""
    root = Path(root)
    if not root.is_dir():
        raise RetrievalError(f"index root '{root}' does not exist")
    with RootLock(root):
        removed = prune(root, keep)
        leftovers = [p for p in root.iterdir() if p.is_dir() and (p.name.startswith(TMP_PREFIX)
                                                               or (work and p.name.startswith(WORK_PREFIX)))]
        for path in leftovers:
            shutil.rmtree(path, ignore_errors=True)
    return {"removed_versions": removed, "removed_dirs": sorted(p.name for p in leftovers),
            "current": read_current(root), "versions": list_versions(root)}


@dataclass
class VersionInfo:
    name: str
    current: bool
    manifest: dict | None

    def row(self) -> dict:
        m = self.manifest or {}
        return {"version": self.name, "current": self.current, "created_at": m.get("created_at"),
                "model": m.get("model"), "num_images": m.get("num_images"), "num_texts": m.get("num_texts"),
                "index_factory": m.get("index_factory"), "incremental_from": (m.get("incremental") or {}).get("base")}


def list_index(root: Path) -> list[VersionInfo]:
    root = Path(root)
    if not root.is_dir():
        raise RetrievalError(f"index root '{root}' does not exist")
    current = read_current(root)
    infos = []
    for name in all_version_dirs(root):
        try:
            manifest = json.loads((root / name / MANIFEST).read_text())
        except (OSError, ValueError):
            manifest = None  # a version dir without a readable manifest (not loadable)
        infos.append(VersionInfo(name, name == current, manifest))
    return infos


def work_dirs(root: Path) -> list[str]:
    return sorted(p.name for p in Path(root).iterdir() if p.is_dir() and p.name.startswith(WORK_PREFIX)) if Path(root).is_dir() else []
