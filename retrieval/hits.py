"""One search result, as the engine produces it and the client receives it (no torch, no grpc);
the one `Modality` type; the mapping from stored rows to results; and the most bytes results can
take on the wire (what bounds a reply before any search)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np

from retrieval.sphere import angle_deg

Modality = Literal["image", "text"]


@dataclass(frozen=True)
class ItemRef:
    """A stored item of one gallery, by the id results carry ("more like this", a query term)."""

    id: int
    gallery: Modality


@dataclass(frozen=True)
class Hit:
    id: int
    score: float  # cosine of the query and the item on the sphere
    angle_deg: float  # arccos(score) in degrees
    modality: str  # "image" or "text" ("" when a server did not say)
    uri: str = ""
    caption: str = ""
    image_id: int = -1
    image_uri: str = ""
    match_probability: float | None = None  # text <-> image searches with a calibrated model

    def to_dict(self) -> dict:
        """id, score, angle_deg, modality, the metadata that applies (uri, or caption + its image) and
        match_probability when there is one."""
        d = asdict(self)
        keep = ("uri",) if self.modality == "image" else ("caption", "image_id", "image_uri")
        keep += ("match_probability",) if self.match_probability is not None else ()
        return {k: v for k, v in d.items() if k in ("id", "score", "angle_deg", "modality") or k in keep}


def _field(size: int) -> int:
    """Bytes of a length-delimited protobuf field of `size` bytes with a one-byte tag (fields 1-15)."""
    return 1 + max(1, (size.bit_length() + 6) // 7) + size


def result_bytes(longest: dict[str, int]) -> int:
    """Most bytes one SearchResult takes inside its response, given the byte lengths of the longest
    strings it can carry (uri, or caption and image_uri): its numbers at their widest (id and
    image_id 10-byte varints, three floats, the modality) with their tags, plus its strings."""
    numbers = 2 * (1 + 10) + 3 * (1 + 4) + (1 + 1)  # three floats: score, angle, match_probability
    return _field(numbers + sum(_field(n) for n in longest.values()))


def reply_bytes(responses: list[tuple[int, int]], version: str) -> int:
    """Most bytes a BatchSearchResponse (or, within a few bytes over, a SearchResponse) takes, given
    (results, most bytes per result) for each of its responses and the index version they name."""
    return sum(_field(n * per_result + _field(len(version.encode()))) for n, per_result in responses)


def hits_from_rows(
    target: Modality,
    scores: np.ndarray,
    ids: np.ndarray,
    rows: Sequence[dict | None],
    min_score: float | None = None,
    probabilities: np.ndarray | None = None,
) -> list[Hit]:
    """Ranked (k,) cosines and ids with their metadata rows (and match probabilities) -> results,
    skipping padding (-1), unknown ids and cosines under `min_score`."""
    hits = []
    probs = [None] * len(rows) if probabilities is None else np.asarray(probabilities, np.float64).tolist()
    for score, id_, row, prob in zip(np.asarray(scores).tolist(), np.asarray(ids).tolist(), rows, probs):
        if id_ < 0 or row is None or (min_score is not None and score < min_score):
            continue
        extra = (
            {"uri": row.get("uri") or ""}
            if target == "image"
            else {
                "caption": row.get("caption") or "",
                "image_id": int(row.get("image_id") or -1),
                "image_uri": row.get("image_uri") or "",
            }
        )
        hits.append(Hit(int(id_), float(score), float(angle_deg(score)), target, **extra, match_probability=prob))
    return hits
