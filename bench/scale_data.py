"""Data for bench/bench_scale.py: the real Flickr8k vectors (encoded once with the shipped model,
cached) and synthetic galleries of millions of image rows that keep their geometry.

Real vectors (`real_vectors`): every Flickr8k image and caption encoded with `create_model`
(`retrieval.encoding.bulk`), cached in bench/.cache/flickr8k-<model>.npz with the model's query
bank and fingerprint, so later runs need neither the model nor the images.

Synthetic gallery (`make_gallery`): the seeds are the real image vectors outside the test split
(7,091); each synthetic row is a seed g moved by an angle theta along a random direction u of
the tangent space at g, x = cos(theta) g + sin(theta) u, with theta drawn from the real
nearest-neighbour angles between seeds (the angle from each seed to its closest other seed).
Each row then gets the inverted-softmax bias the builder stores ([x, b_x],
`retrieval.embedding.querybank` and `retrieval.store.reader.with_bias`). Queries are real and
held out: the 5,000 test captions (cross-modal, [q, 1]) and the 1,000 test images (same-modal,
[q, 0]). Rows are written to a float32 memory-mapped file (bench/.cache/gallery-<n>.npy), made
block by block from a per-block seed, so a 10M gallery never has to fit in RAM.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from retrieval.embedding.querybank import QueryBank
from retrieval.sphere import l2_normalize
from retrieval.store.vectors import query_rows, with_bias

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / "bench" / ".cache"
BLOCK = 65_536
SEED = 20_251_130


@dataclass
class RealVectors:
    image: np.ndarray  # (8091, D) unit rows
    image_split: np.ndarray  # (8091,) "train" / "dev" / "test" / "" (in no split)
    text: np.ndarray  # (40455, D)
    text_split: np.ndarray  # (40455,) the split of the caption's image
    bank: QueryBank
    fingerprint: str

    @property
    def seeds(self) -> np.ndarray:
        return self.image[self.image_split != "test"]


def real_vectors(data: Path, model_name: str = "lite0-minilm") -> RealVectors:
    """Encode every Flickr8k image and caption, or read them back from the cache (keyed by the model's
    name; the file records its fingerprint: delete bench/.cache after retraining the model)."""
    path = CACHE / f"flickr8k-{model_name.replace('/', '_')}.npz"
    if not path.is_file():
        _encode(data, model_name, path)
    z = np.load(path)
    return RealVectors(
        z["image"],
        z["image_split"],
        z["text"],
        z["text_split"],
        QueryBank(z["text_bank"], z["image_bank"], float(z["beta"])),
        str(z["fingerprint"]),
    )


def _encode(data: Path, model_name: str, path: Path) -> None:
    from retrieval.embedding.factory import create_model
    from retrieval.embedding.querybank import querybank_of
    from retrieval.encoding.bulk import encode_image_files, encode_texts
    from retrieval.encoding.datasets import load_caption_dataset, read_split

    model, preprocess, tokenizer = create_model(model_name)
    ds = load_caption_dataset(data, None)
    split_of = {name: s for s in ("train", "dev", "test") for name in read_split(Path(data), s)}
    image_split = np.asarray([split_of.get(n, "") for n in ds.images])
    images, bad = encode_image_files(model, ds.image_paths(), preprocess, workers=0)
    if bad:
        raise RuntimeError(f"{len(bad)} Flickr8k image(s) did not decode: {list(bad.items())[:3]}")
    texts = encode_texts(model, tokenizer, ds.captions)
    bank = querybank_of(model)
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(
        tmp,
        image=images,
        image_split=image_split,
        text=texts,
        text_split=image_split[ds.caption_image],
        text_bank=bank.text,
        image_bank=bank.image,
        beta=np.float64(bank.beta),
        fingerprint=model.fingerprint(),
    )
    tmp.rename(path)


def nn_angles(vectors: np.ndarray) -> np.ndarray:
    """(N,) angle in radians from each row to its nearest other row."""
    sims = vectors @ vectors.T
    np.fill_diagonal(sims, -np.inf)
    return np.arccos(np.clip(sims.max(axis=1), -1.0, 1.0)).astype(np.float32)


def synthetic_block(seeds: np.ndarray, angles: np.ndarray, count: int, block: int) -> np.ndarray:
    """`count` unit rows sampled around the seeds (deterministic in `block`)."""
    rng = np.random.default_rng([SEED, block])
    g = seeds[rng.integers(0, len(seeds), count)]
    theta = angles[rng.integers(0, len(angles), count)][:, None]
    u = rng.standard_normal(g.shape, dtype=np.float32)
    u -= np.sum(u * g, axis=1, keepdims=True) * g  # the tangent space at g
    u = l2_normalize(u)
    return l2_normalize(np.cos(theta) * g + np.sin(theta) * u).astype(np.float32)


@dataclass
class Gallery:
    rows: np.ndarray  # (n, D+1) float32 memmap: [x, b_x]; ids are row numbers
    path: Path

    @property
    def n(self) -> int:
        return len(self.rows)

    def blocks(self, size: int = BLOCK):
        for start in range(0, self.n, size):
            yield (
                np.arange(start, min(self.n, start + size), dtype=np.int64),
                np.asarray(self.rows[start : start + size]),
            )


def gallery_path(n: int) -> Path:
    return CACHE / f"gallery-{n}.npy"


def make_gallery(real: RealVectors, n: int) -> Gallery:
    """The n-row synthetic gallery, generated once into its memmap (a `.done` marker when whole)."""
    path = gallery_path(n)
    dim = real.image.shape[1] + 1
    done = path.with_suffix(".done")
    if not done.is_file():
        seeds = real.seeds
        angles = nn_angles(seeds)
        log.info(
            "generating %d rows around %d seeds (median nearest-neighbour angle %.1f deg)",
            n,
            len(seeds),
            float(np.degrees(np.median(angles))),
        )
        CACHE.mkdir(parents=True, exist_ok=True)
        rows = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, dim))
        for b, start in enumerate(range(0, n, BLOCK)):
            x = synthetic_block(seeds, angles, min(BLOCK, n - start), b)
            rows[start : start + len(x)] = with_bias(x, real.bank.bias(x, "image"))
        rows.flush()
        del rows
        done.write_text("ok\n")
    return Gallery(np.load(path, mmap_mode="r"), path)


def queries(real: RealVectors, text_count: int, image_count: int) -> dict[str, np.ndarray]:
    """Held-out query rows: test captions as [q, 1] (text->image), test images as [q, 0] (image->image)."""
    rng = np.random.default_rng(SEED)
    texts = real.text[real.text_split == "test"]
    images = real.image[real.image_split == "test"]
    texts = texts[np.sort(rng.choice(len(texts), min(text_count, len(texts)), replace=False))]
    images = images[np.sort(rng.choice(len(images), min(image_count, len(images)), replace=False))]
    return {
        "text_to_image": query_rows(texts, cross_modal=True),
        "image_to_image": query_rows(images, cross_modal=False),
    }
