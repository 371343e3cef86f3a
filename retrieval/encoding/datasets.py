"""Caption-dataset folders: `images/`, `captions.csv` (header `image,caption`) and
`splits/{train,dev,test}.txt` (one image name a line), the layout of Flickr8k.

Structural problems (no captions.csv, unknown split, a split naming images that have no
captions) raise one DatasetError. Item-level problems (an empty caption, an image file that is
missing) are skipped, counted and reported in `skipped`; images that exist but do not decode
are found, skipped and reported when they are encoded.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from retrieval.errors import DatasetError


@dataclass
class CaptionDataset:
    root: Path
    split: str | None
    images: list[str]  # names relative to root/images, in split order
    captions: list[str]  # (C,)
    caption_image: np.ndarray  # (C,) int64 index into `images`
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (item, reason)

    def image_paths(self) -> list[Path]:
        return [self.root / "images" / name for name in self.images]

    def drop_images(self, bad: dict[int, str]) -> CaptionDataset:
        """A copy without the images at indices `bad` (and their captions), reasons recorded."""
        if not bad:
            return self
        keep = [i for i in range(len(self.images)) if i not in bad]
        remap = np.full(len(self.images), -1, np.int64)
        remap[keep] = np.arange(len(keep))
        cap_keep = remap[self.caption_image] >= 0
        return CaptionDataset(
            self.root,
            self.split,
            [self.images[i] for i in keep],
            [c for c, k in zip(self.captions, cap_keep) if k],
            remap[self.caption_image[cap_keep]],
            self.skipped + [(self.images[i], reason) for i, reason in sorted(bad.items())],
        )


def read_split(root: Path, split: str) -> list[str]:
    path = root / "splits" / f"{split}.txt"
    if not path.is_file():
        known = sorted(p.stem for p in (root / "splits").glob("*.txt")) if (root / "splits").is_dir() else []
        raise DatasetError(f"split '{split}' not found at {path}; available splits: {known or 'none'}")
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not names:
        raise DatasetError(f"split file {path} names no images")
    return names


def load_caption_dataset(root: str | Path, split: str | None = None) -> CaptionDataset:
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset folder '{root}' does not exist")
    csv_path = root / "captions.csv"
    if not csv_path.is_file():
        raise DatasetError(f"'{root}' has no captions.csv (expected a CSV with header 'image,caption')")
    by_image: dict[str, list[str]] = {}
    skipped: list[tuple[str, str]] = []
    with csv_path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"image", "caption"} <= set(reader.fieldnames):
            raise DatasetError(f"{csv_path} must have the header 'image,caption', found {reader.fieldnames}")
        for line, row in enumerate(reader, start=2):
            image, caption = (row["image"] or "").strip(), (row["caption"] or "").strip()
            if not image:
                skipped.append((f"captions.csv:{line}", "no image name"))
            elif not caption:
                skipped.append((f"captions.csv:{line}", f"empty caption for {image}"))
            else:
                by_image.setdefault(image, []).append(caption)
    names = read_split(root, split) if split else sorted(by_image)
    unknown = [n for n in names if n not in by_image]
    if unknown:
        raise DatasetError(
            f"split '{split}' names {len(unknown)} image(s) with no captions in {csv_path}, e.g. {unknown[:3]}"
        )
    present = []
    for name in names:
        if (root / "images" / name).is_file():
            present.append(name)
        else:
            skipped.append((name, "image file is missing"))
    captions, owner = [], []
    for i, name in enumerate(present):
        captions += by_image[name]
        owner += [i] * len(by_image[name])
    if not present:
        raise DatasetError(f"no usable image in '{root}' (split {split}); {len(skipped)} item(s) skipped")
    return CaptionDataset(root, split, present, captions, np.asarray(owner, np.int64), skipped)
