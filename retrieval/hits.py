"""One search result, as the engine produces it and the client receives it (no torch, no grpc)."""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Hit:
    id: int
    score: float        # cosine of the query and the item on the sphere
    angle_deg: float    # arccos(score) in degrees
    modality: str       # "image" or "text"
    uri: str = ""
    caption: str = ""
    image_id: int = -1
    image_uri: str = ""

    def to_dict(self) -> dict:
        """id, score, angle_deg, modality and the metadata that applies (uri, or caption + its image)."""
        d = asdict(self)
        keep = ("uri",) if self.modality == "image" else ("caption", "image_id", "image_uri")
        return {k: v for k, v in d.items() if k in ("id", "score", "angle_deg", "modality") or k in keep}
