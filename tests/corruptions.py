"""Planting known corruptions in a caption-dataset folder (what the audit's test and bench measure it
against): near-duplicate images (a copy re-encoded at another JPEG quality, or a crop) and captions
moved to another image. Deterministic for a seed."""

from __future__ import annotations

import csv
import random
from pathlib import Path

from PIL import Image

REENCODE_QUALITY = 30  # (the bench's) Flickr8k's JPEGs are of higher quality: the copy differs in every block
CROP_KEEP = 0.8  # (the bench's) a crop keeps this fraction of each side, at a random offset


def plant(
    dataset: Path,
    split: str,
    reencoded: int,
    cropped: int,
    moved: int,
    seed: int = 0,
    quality: int = REENCODE_QUALITY,
    crop_keep: float = CROP_KEEP,
) -> dict:
    """Adds `reencoded` + `cropped` near-duplicate copies of distinct images of `split` (named
    `dup_<original>`, listed in the split, without captions) and moves `moved` of the split's captions
    to another image of the split (rewriting captions.csv). Returns the truth: {"duplicates": [[original,
    copy, kind]], "moved": [{"caption", "from", "to"}]}."""
    rng = random.Random(seed)
    split_file = dataset / "splits" / f"{split}.txt"
    names = split_file.read_text().split()
    originals = rng.sample(names, reencoded + cropped)
    duplicates = []
    for i, name in enumerate(originals):
        copy = f"dup_{name}"
        with Image.open(dataset / "images" / name) as img:
            img = img.convert("RGB")
            if i < reencoded:
                img.save(dataset / "images" / copy, quality=quality)
                kind = "reencode"
            else:
                w, h = img.size
                cw, ch = int(w * crop_keep), int(h * crop_keep)
                x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
                img.crop((x, y, x + cw, y + ch)).save(dataset / "images" / copy, quality=90)
                kind = "crop"
        duplicates.append([name, copy, kind])
    split_file.write_text("\n".join(names + [c for _, c, _ in duplicates]) + "\n")

    with (dataset / "captions.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    in_split = set(names)
    candidates = [i for i, r in enumerate(rows) if r["image"] in in_split]
    moves = []
    for i in sorted(rng.sample(candidates, moved)):
        source = rows[i]["image"]
        target = rng.choice([n for n in names if n != source])
        rows[i]["image"] = target
        moves.append({"caption": rows[i]["caption"], "from": source, "to": target})
    with (dataset / "captions.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["image", "caption"])
        writer.writeheader()
        writer.writerows({"image": r["image"], "caption": r["caption"]} for r in rows)
    return {"duplicates": duplicates, "moved": moves}
