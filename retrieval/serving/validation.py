"""What a request may ask, checked before any work: texts, k, embeddings, min_score, min_probability, target
galleries; and which modality a query is of (decided here once)."""
from __future__ import annotations

from typing import Union

import numpy as np

from retrieval.errors import InvalidInputError
from retrieval.hits import Modality
from retrieval.serving.config import Limits
from retrieval.serving.confidence import check_min_probability
from retrieval.sphere import l2_normalize

QueryInput = Union[str, bytes, np.ndarray]  # text, image file bytes, or a raw embedding
# search's arguments: query, target, k, min_score, source (, min_probability)
Query = tuple[QueryInput, Union[Modality, None], int, Union[float, None], Union[Modality, None], Union[float, None]]


def query_modality(query: QueryInput, declared: Modality | None = None) -> Modality | None:
    """What a query encodes: texts and image bytes say so themselves; a raw embedding is what its
    sender declared (None: unknown, so it ranks by the plain cosine)."""
    if isinstance(query, str):
        return "text"
    if isinstance(query, (bytes, bytearray)):
        return "image"
    return declared


class Validator:
    """The checks of one server's `Limits`."""

    def __init__(self, limits: Limits):
        self.limits = limits

    def check_text(self, text: str) -> str:
        if not text or not text.strip():
            raise InvalidInputError("text is empty")
        if len(text) > self.limits.max_text_chars:
            raise InvalidInputError(f"text has {len(text)} characters, over the limit of {self.limits.max_text_chars}")
        return text

    def check_k(self, k: int) -> int:
        if k <= 0 or k > self.limits.max_k:
            raise InvalidInputError(f"k must be between 1 and {self.limits.max_k}, got {k}")
        return k

    @staticmethod
    def check_embedding(values: np.ndarray, dim: int) -> np.ndarray:
        """The unit vector along `values` (any finite magnitude: 1e30 everywhere has a direction)."""
        v = np.asarray(values, dtype=np.float64).reshape(-1)
        if v.shape[0] != dim:
            raise InvalidInputError(f"embedding has dimension {v.shape[0]}, the index expects {dim}")
        if not np.all(np.isfinite(v)):
            raise InvalidInputError("embedding has non-finite values")
        if not np.any(v):
            raise InvalidInputError("embedding has zero norm; it has no direction on the sphere")
        return l2_normalize(v[None])[0]

    @staticmethod
    def check_min_score(min_score: float | None) -> float | None:
        if min_score is not None and not (-1.0 <= min_score <= 1.0):
            raise InvalidInputError(f"min_score is a cosine and must lie in [-1, 1], got {min_score}")
        return min_score

    def validate(self, query: QueryInput, target: Modality | None, k: int, min_score: float | None,
                 source: Modality | None = None, min_probability: float | None = None) -> Modality:
        """Checks what can be checked before any work; returns the gallery to search."""
        self.check_k(k)
        self.check_min_score(min_score)
        check_min_probability(min_probability)
        if target not in (None, "image", "text"):
            raise InvalidInputError(f"unknown target modality {target!r}")
        if source not in (None, "image", "text"):
            raise InvalidInputError(f"unknown embedding modality {source!r}")
        if isinstance(query, str):
            self.check_text(query)
            return target or "image"
        if isinstance(query, (bytes, bytearray)):
            if not query:
                raise InvalidInputError("image bytes are empty")
            return target or "text"
        if isinstance(query, np.ndarray):
            if target is None:
                raise InvalidInputError("a search by embedding must name its target modality (image or text)")
            return target
        raise InvalidInputError("query is empty: give a text, image bytes or an embedding")
