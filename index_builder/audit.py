"""Auditing a published version's collection from its own vectors (`index-builder audit ROOT`): what a
curator should look at, each flag with its evidence.

- Near-duplicate images: images within `near_duplicate_angle` degrees of each other, grouped by
  connected components (scipy) of the exact k-nearest-neighbour graph of the images (FAISS). The
  sphere is semantic, not a pixel hash: on Flickr8k (bench/results/audit.md) copies re-encoded at
  JPEG quality 30 land 10-31 degrees from their original and 80% crops 12-28, while the nearest
  other photo of a distinct one is under 20 degrees for 0.2% of them (two photos of one sled-dog
  team) and under 24 for 0.7%. The default, 20 degrees, is where distinct photos start to fall
  within: it finds 6 of 10 such copies and flags one pair of distinct (near-identical) shots.
  Lighter edits sit closer (quality 95: about 3 degrees).
- Captions that do not describe their image: the caption's cosine to its image and its mean cosine
  to the image's other captions, each as a robust z-score over the collection ((x - median) /
  (1.4826 MAD)); a caption is flagged when the mean of the two (the first alone for an image with
  one caption) is below -`caption_z` AND its image is not among the caption's `k` nearest images.
  The evidence names the images it is nearest to (what it seems to describe).
- Outlier images: low density on the sphere, scored by the mean angle to an image's `k` nearest
  other images; flagged when that score's robust z-score exceeds `outlier_z`. The angles are
  bounded, so the tail is light: on Flickr8k's test split the largest z is 2.1.

Vectors are read back from the version's indexes (exact for Flat, HNSW*,Flat and IVF*,Flat storage;
PQ codes cannot give them back and are refused). Neighbours are exact (a flat inner-product search),
and each caption is compared with every image (chunked), so an audit costs O(N^2) vector products:
seconds for tens of thousands of items, hours for millions.
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from retrieval.errors import DatasetError, IndexFormatError
from retrieval.sphere import angle_deg, is_unit_norm
from retrieval.store.layout import META
from retrieval.store.reader import IndexVersion
from retrieval.store.schema import TABLES, read_hashes
from retrieval.store.vectors import reconstruct

DEFAULT_NEAR_DUPLICATE_ANGLE = 20.0
CHUNK = 2048


@dataclass(frozen=True)
class AuditConfig:
    near_duplicate_angle: float = DEFAULT_NEAR_DUPLICATE_ANGLE  # degrees
    k: int = 10  # neighbours for density and caption ranks
    caption_z: float = 3.0  # flag a caption whose combined robust z-score is below -caption_z ...
    outlier_z: float = 2.0  # flag an image whose density score's robust z-score is above outlier_z
    evidence: int = 3  # neighbours listed per flag

    def validate(self) -> None:
        if not 0 <= self.near_duplicate_angle < 90:
            raise DatasetError(f"--near-duplicate-angle must be in [0, 90) degrees, got {self.near_duplicate_angle}")
        if self.k < 1 or self.evidence < 1:
            raise DatasetError(f"k and evidence must be at least 1, got {self.k} and {self.evidence}")


def robust_z(x: np.ndarray) -> np.ndarray:
    """(x - median) / (1.4826 * median absolute deviation): a z-score that the outliers themselves
    do not drag (1.4826 makes it the standard deviation for normal data)."""
    med = np.median(x)
    mad = 1.4826 * np.median(np.abs(x - med))
    return (x - med) / (mad if mad > 0 else 1.0)


def read_vectors(version: IndexVersion, modality: str) -> tuple[np.ndarray, np.ndarray]:
    """(ids sorted, unit vectors (n, D)) of a modality, read back from its index."""
    ids = np.asarray(sorted(read_hashes(version.path / META, TABLES[modality])), np.int64)
    if len(ids) == 0:
        return ids, np.zeros((0, version.dim), np.float32)
    try:
        vecs = np.concatenate(
            [
                reconstruct(version.indexes[modality], ids[s : s + 8192])[:, : version.dim]
                for s in range(0, len(ids), 8192)
            ]
        )
    except RuntimeError as e:
        raise IndexFormatError(
            f"{version.name}: the {modality} index cannot give its vectors back ({e}); "
            f"an audit needs Flat, HNSW*,Flat or IVF*,Flat storage"
        ) from None
    if not is_unit_norm(vecs):
        raise IndexFormatError(
            f"{version.name}: the {modality} index stores compressed codes (PQ), which do not give "
            f"the vectors back; an audit needs Flat, HNSW*,Flat or IVF*,Flat storage"
        )
    return ids, np.ascontiguousarray(vecs, np.float32)


def image_neighbours(images: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(cosines (n, k), rows (n, k)) of each image's k nearest other images (exact; -1 pads)."""
    n = len(images)
    index = faiss.IndexFlatIP(images.shape[1])
    index.add(images)
    cos, rows = index.search(images, min(k + 1, n))
    own = rows == np.arange(n)[:, None]
    keep = np.where(own.any(1, keepdims=True), ~own, np.arange(rows.shape[1]) < rows.shape[1] - 1)  # drop self
    cos = cos[keep].reshape(n, -1)[:, :k]
    rows = rows[keep].reshape(n, -1)[:, :k]
    return cos, rows


def near_duplicates(cos: np.ndarray, rows: np.ndarray, max_angle: float) -> list[np.ndarray]:
    """Groups (rows, sorted) of images joined by neighbour edges within `max_angle` degrees."""
    n = len(cos)
    src, dst = np.nonzero((angle_deg(cos) <= max_angle) & (rows >= 0))
    graph = coo_matrix((np.ones(len(src)), (src, rows[src, dst])), shape=(n, n))
    _, label = connected_components(graph, directed=False)
    sizes = np.bincount(label)
    return [np.flatnonzero(label == g) for g in np.flatnonzero(sizes > 1)]


def density_scores(cos: np.ndarray) -> np.ndarray:
    """Mean angle (degrees) from each image to its nearest others: high where the sphere is empty."""
    return angle_deg(cos).mean(1)


@dataclass(frozen=True)
class CaptionScores:
    pair_cos: np.ndarray  # cosine of each caption to its image
    rank: np.ndarray  # 1-based rank of its image among all images for the caption
    siblings_cos: np.ndarray  # mean cosine to the image's other captions (nan when it has none)
    z: np.ndarray  # the combined robust z-score (low: the caption does not fit its image)


def caption_scores(images: np.ndarray, captions: np.ndarray, caption_image: np.ndarray) -> CaptionScores:
    """Scores of captions (rows of `captions`) paired with images (rows of `images`, by `caption_image`)."""
    paired = images[caption_image]
    pair_cos = np.einsum("ij,ij->i", captions, paired)
    rank = np.empty(len(captions), np.int64)
    for s in range(0, len(captions), CHUNK):
        sims = captions[s : s + CHUNK] @ images.T
        rank[s : s + CHUNK] = 1 + (sims > pair_cos[s : s + CHUNK, None]).sum(1)
    # mean cosine to siblings: (sum of the image's caption vectors - own) . own / (count - 1)
    sums = np.zeros_like(images, dtype=np.float64)
    np.add.at(sums, caption_image, captions)
    counts = np.bincount(caption_image, minlength=len(images))[caption_image]
    with np.errstate(invalid="ignore", divide="ignore"):
        siblings = (np.einsum("ij,ij->i", sums[caption_image], captions) - 1.0) / (counts - 1)
    siblings = np.where(counts > 1, siblings, np.nan)
    z_pair = robust_z(pair_cos)
    z = z_pair.copy()
    has = counts > 1
    if has.any():
        z[has] = (z_pair[has] + robust_z(siblings[has])) / 2
    return CaptionScores(pair_cos, rank, siblings, z)


def _ref(version: IndexVersion, modality: str, ids: list[int], angles: list[float] | None = None) -> list[dict]:
    rows = version.metadata(modality, ids)
    key = "uri" if modality == "image" else "caption"
    out = [{"id": i, key: (r or {}).get(key)} for i, r in zip(ids, rows)]
    for item, a in zip(out, angles or []):
        item["angle_deg"] = round(float(a), 2)
    return out


def audit(version: IndexVersion, cfg: AuditConfig = AuditConfig()) -> dict:
    """The audit of one opened version: {"version", "config", "counts", "near_duplicates",
    "mismatched_captions", "outlier_images", "near_duplicate_angles"} (JSON-ready)."""
    cfg.validate()
    img_ids, images = read_vectors(version, "image")
    txt_ids, captions = read_vectors(version, "text")
    report: dict = {
        "version": version.name,
        "config": cfg.__dict__.copy(),
        "near_duplicates": [],
        "mismatched_captions": [],
        "outlier_images": [],
    }
    k = min(cfg.k, max(len(images) - 1, 0))
    if k >= 1:
        cos, rows = image_neighbours(images, k)
        first = angle_deg(cos[:, 0])
        report["nearest_image_angle_deg"] = {q: round(float(np.percentile(first, q)), 2) for q in (0.1, 1, 5, 50)}
        for group in near_duplicates(cos, rows, cfg.near_duplicate_angle):
            sims = images[group] @ images[group].T
            pairs = [
                [int(img_ids[group[a]]), int(img_ids[group[b]]), round(float(angle_deg(sims[a, b])), 2)]
                for a in range(len(group))
                for b in range(a + 1, len(group))
            ]
            report["near_duplicates"].append(
                {
                    "images": _ref(version, "image", img_ids[group].tolist()),
                    "max_angle_deg": max(p[2] for p in pairs),
                    "pairs": pairs,
                }
            )
        score = density_scores(cos)
        z = robust_z(score)
        for r in np.argsort(-z):
            if z[r] <= cfg.outlier_z:
                break
            near = rows[r, : cfg.evidence]
            report["outlier_images"].append(
                {
                    **_ref(version, "image", [int(img_ids[r])])[0],
                    "mean_angle_to_neighbours_deg": round(float(score[r]), 2),
                    "z": round(float(z[r]), 2),
                    "median_mean_angle_deg": round(float(np.median(score)), 2),
                    "nearest": _ref(
                        version, "image", img_ids[near].tolist(), angle_deg(cos[r, : cfg.evidence]).tolist()
                    ),
                }
            )
    report["mismatched_captions"] = _captions(version, cfg, img_ids, images, txt_ids, captions)
    report["counts"] = {
        "images": int(len(img_ids)),
        "captions": int(len(txt_ids)),
        "near_duplicate_groups": len(report["near_duplicates"]),
        "images_in_near_duplicate_groups": sum(len(g["images"]) for g in report["near_duplicates"]),
        "mismatched_captions": len(report["mismatched_captions"]),
        "outlier_images": len(report["outlier_images"]),
    }
    return report


def _captions(
    version: IndexVersion,
    cfg: AuditConfig,
    img_ids: np.ndarray,
    images: np.ndarray,
    txt_ids: np.ndarray,
    captions: np.ndarray,
) -> list[dict]:
    meta = version.metadata("text", txt_ids.tolist())
    row_of = {int(i): r for r, i in enumerate(img_ids)}
    paired = [r for r, m in enumerate(meta) if m and m["image_id"] is not None and int(m["image_id"]) in row_of]
    if not paired or len(images) < 2:
        return []
    image_row = np.asarray([row_of[int(meta[r]["image_id"])] for r in paired])
    s = caption_scores(images, captions[paired], image_row)
    flags = []
    for j in np.argsort(s.z):
        if s.z[j] >= -cfg.caption_z:
            break
        if s.rank[j] <= cfg.k:
            continue
        near = np.argsort(-(images @ captions[paired[j]]))[: cfg.evidence]
        flags.append(
            {
                "id": int(txt_ids[paired[j]]),
                "caption": meta[paired[j]]["caption"],
                "image": _ref(version, "image", [int(img_ids[image_row[j]])])[0],
                "angle_to_image_deg": round(float(angle_deg(s.pair_cos[j])), 2),
                "rank_of_image": int(s.rank[j]),
                "mean_angle_to_sibling_captions_deg": (
                    None if np.isnan(s.siblings_cos[j]) else round(float(angle_deg(s.siblings_cos[j])), 2)
                ),
                "z": round(float(s.z[j]), 2),
                "nearest_images": _ref(
                    version, "image", img_ids[near].tolist(), angle_deg(images[near] @ captions[paired[j]]).tolist()
                ),
            }
        )
    return flags


def render(report: dict) -> str:
    """The audit as a readable markdown report, every flag with its evidence."""
    c, cfg = report["counts"], report["config"]
    out = [
        f"# Audit of {report['version']}",
        "",
        f"{c['images']} images, {c['captions']} captions. Flags: {c['near_duplicate_groups']} near-duplicate "
        f"group(s) ({c['images_in_near_duplicate_groups']} images), {c['mismatched_captions']} caption(s) that "
        f"do not fit their image, {c['outlier_images']} outlier image(s).",
        "",
        f"## Near-duplicate images (within {cfg['near_duplicate_angle']} degrees)",
        "",
    ]
    for g in report["near_duplicates"]:
        out.append(
            f"- {len(g['images'])} images, at most {g['max_angle_deg']} degrees apart: "
            + ", ".join(f"`{i['uri']}`" for i in g["images"])
        )
    out += [
        "",
        f"## Captions that do not describe their image (combined z < -{cfg['caption_z']}, "
        f"image not among the caption's {cfg['k']} nearest)",
        "",
    ]
    for f in report["mismatched_captions"]:
        near = ", ".join(f"`{n['uri']}` ({n['angle_deg']} deg)" for n in f["nearest_images"])
        out.append(
            f"- \"{f['caption']}\" on `{f['image']['uri']}`: {f['angle_to_image_deg']} degrees from it, its "
            f"image ranks {f['rank_of_image']}, {f['mean_angle_to_sibling_captions_deg']} degrees from its "
            f"other captions on average, z {f['z']}; nearest images: {near}"
        )
    out += ["", f"## Outlier images (mean angle to the {cfg['k']} nearest images, robust z > {cfg['outlier_z']})", ""]
    for f in report["outlier_images"]:
        near = ", ".join(f"`{n['uri']}` ({n['angle_deg']} deg)" for n in f["nearest"])
        out.append(
            f"- `{f['uri']}`: {f['mean_angle_to_neighbours_deg']} degrees from its neighbours on average "
            f"(median image: {f['median_mean_angle_deg']}), z {f['z']}; nearest: {near}"
        )
    return "\n".join(out) + "\n"
