"""What a request may ask, checked before any work: texts, k, embeddings, min_score, min_probability,
target galleries, composed queries and items, caps and diversity; and which modality a query is of
(decided here once)."""

from __future__ import annotations

import numpy as np

from retrieval.errors import InvalidInputError
from retrieval.hits import Modality
from retrieval.serving.config import Limits
from retrieval.serving.queries import NO_OPTIONS, Composed, ItemRef, Options, Term, check_composed, composed_modality
from retrieval.sphere import l2_normalize

# text, image file bytes, a raw embedding, a stored item, or weighted terms
QueryInput = str | bytes | np.ndarray | ItemRef | Composed
# search's arguments: query, target, k, min_score, the embedding's declared modality, options
Query = tuple[QueryInput, Modality | None, int, float | None, Modality | None, Options]


def query_modality(query: QueryInput, declared: Modality | None = None) -> Modality | None:
    """What a query encodes: texts and image bytes say so themselves; a raw embedding is what its
    sender declared (None: unknown, so it ranks by the plain cosine)."""
    if isinstance(query, str):
        return "text"
    if isinstance(query, (bytes, bytearray)):
        return "image"
    if isinstance(query, ItemRef):
        return query.gallery
    if isinstance(query, Composed):
        return composed_modality(query.terms)
    return declared


_OTHER = {"text": "image", "image": "text"}


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

    def check_term(self, term: Term) -> None:
        """One term of a composed query, as a query of its own."""
        if isinstance(term.value, (Composed, type(None))):
            raise InvalidInputError("a term is a text, image, embedding or stored item")
        self.check_query(term.value, "text", term.modality)

    def validate(
        self,
        query: QueryInput,
        target: Modality | None,
        k: int,
        min_score: float | None,
        source: Modality | None = None,
        options: Options = NO_OPTIONS,
    ) -> Modality:
        """Checks what can be checked before any work; returns the gallery to search."""
        self.check_k(k)
        self.check_min_score(min_score)
        options.check()
        return self.check_query(query, target, source)

    def check_query(self, query: QueryInput, target: Modality | None, source: Modality | None = None) -> Modality:
        """Checks one query; returns the gallery to search (the other modality by default; a
        stored item's own gallery, "more like this")."""
        if target not in (None, "image", "text"):
            raise InvalidInputError(f"unknown target modality {target!r}")
        if source not in (None, "image", "text"):
            raise InvalidInputError(f"unknown embedding modality {source!r}")
        if isinstance(query, ItemRef):
            if query.gallery not in ("image", "text"):
                raise InvalidInputError("an item reference must name its gallery (image or text)")
            return target or query.gallery
        if isinstance(query, Composed):
            check_composed(query, self.limits.max_terms, self.check_term)
            modality = composed_modality(query.terms)
            if target is None and modality is None:
                raise InvalidInputError("a composed query without a majority modality must name its target")
            return target or _OTHER[modality]
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
