"""Shared fixtures: the Flickr8k folder (tests that need it skip with a message when it is
absent), a small real caption dataset cut from it, the default model loaded once, and a
self-signed TLS certificate and key."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

FLICKR8K = Path(
    os.environ.get("FLICKR8K_DIR", Path(__file__).resolve().parents[2] / "shared" / "datasets" / "flickr8k")
)


def require_flickr8k() -> Path:
    if not (FLICKR8K / "captions.csv").is_file():
        pytest.skip(f"Flickr8k not found at {FLICKR8K} (set FLICKR8K_DIR); this test needs real photos")
    return FLICKR8K


def make_mini_dataset(dest: Path, per_split: dict[str, int]) -> Path:
    """A caption-dataset folder with the first N images of each official split (copied) and
    all their captions: real data, small enough for a test."""
    src = require_flickr8k()
    (dest / "images").mkdir(parents=True)
    (dest / "splits").mkdir()
    chosen: dict[str, list[str]] = {}
    for split, n in per_split.items():
        names = (src / "splits" / f"{split}.txt").read_text().split()[:n]
        chosen[split] = names
        (dest / "splits" / f"{split}.txt").write_text("\n".join(names) + "\n")
        for name in names:
            shutil.copyfile(src / "images" / name, dest / "images" / name)
    wanted = {n for names in chosen.values() for n in names}
    with (src / "captions.csv").open(newline="") as f, (dest / "captions.csv").open("w", newline="") as g:
        writer = csv.writer(g)
        writer.writerow(["image", "caption"])
        for row in csv.DictReader(f):
            if row["image"] in wanted:
                writer.writerow([row["image"], row["caption"]])
    return dest


def make_tiny_open_clip(folder: Path, name: str = "tiny-test-clip"):
    """A tiny open_clip architecture registered as `name` (random weights, no download), and a
    local `pretrained=` file of its seeded weights: (the reference model in eval mode, that file)."""
    import json

    import open_clip
    import torch

    cfg_dir = folder / "configs"
    cfg_dir.mkdir()
    (cfg_dir / f"{name}.json").write_text(
        json.dumps(
            {
                "embed_dim": 32,
                "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16, "head_width": 32},
                "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
            }
        )
    )
    open_clip.add_model_config(cfg_dir)
    torch.manual_seed(0)
    reference = open_clip.create_model(name)
    ckpt = folder / "tiny.pt"
    torch.save({"state_dict": reference.state_dict()}, ckpt)
    return reference.eval(), ckpt


def build_index(root: str | Path, *source: str) -> Path:
    """`index-builder build --out ROOT SOURCE...` in this process, as a user runs it, with one
    decode thread and no progress bars; fails the test if the build fails. SOURCE: `--dataset DIR
    [--split S]` or `--images DIR --captions FILE`, and any other flag. Returns ROOT."""
    from index_builder.cli import main

    argv = ["-q", "build", "--out", str(root), *source, "--workers", "0", "--no-progress"]
    assert main(argv) == 0, f"index-builder {' '.join(argv)} failed (its log is above)"
    return Path(root)


@pytest.fixture(scope="session")
def flickr_mini(tmp_path_factory) -> Path:
    """48 train / 16 dev / 32 test real Flickr8k images with their 5 captions each."""
    return make_mini_dataset(tmp_path_factory.mktemp("flickr_mini"), {"train": 48, "dev": 16, "test": 32})


@pytest.fixture(scope="session")
def default_model():
    """(model, preprocess, tokenizer) of the shipped default, loaded once per session."""
    from retrieval.embedding.factory import create_model

    return create_model("lite0-minilm")


@pytest.fixture(scope="session")
def tls_pair(tmp_path_factory) -> tuple[Path, Path]:
    """(cert.pem, key.pem): a self-signed certificate for localhost and its unencrypted key."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed; it makes the test's self-signed certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost",
        ],
        check=True,
        capture_output=True,
    )
    return cert, key
