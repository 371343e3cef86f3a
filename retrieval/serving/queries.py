"""Queries beyond one text or image: stored items ("more like this") and composed queries (weighted
terms), resolved to one unit vector on the sphere, and the options that shape a result list (caps,
diversity, dedup). No gRPC and no engine in here: resolution takes the encoder's `embed` and the
index version.

Modality of a resolved query (it decides whether cross-modal ranking, the inverted softmax's bias,
applies): a text or image is its own; a stored item is its gallery's; an embedding what its sender
declared (else unknown). A composed query is of the modality that holds a strict majority of its
positive weight (terms of unknown modality count for neither); otherwise it is unknown and ranks by
the plain cosine. Negative terms do not vote: they move the point, they do not say what it is.

Exclusion: the stored items a query names (the item of "more like this", item terms of a composed
query with a positive weight) are left out of its results in their own gallery. An image's own
captions are not excluded from a text search: they are true matches, which is what such a search
asks for.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from retrieval.errors import InvalidInputError, NotFoundError
from retrieval.hits import ItemRef, Modality
from retrieval.serving.confidence import check_min_probability
from retrieval.sphere.compose import check_weights, compose_geodesic, compose_linear
from retrieval.store.reader import IndexVersion

Combine = Literal["geodesic", "linear"]


@dataclass(frozen=True)
class Term:
    value: str | bytes | np.ndarray | ItemRef
    weight: float = 1.0
    modality: Modality | None = None  # what an embedding encodes, if its sender said

    @property
    def kind_modality(self) -> Modality | None:
        if isinstance(self.value, str):
            return "text"
        if isinstance(self.value, (bytes, bytearray)):
            return "image"
        if isinstance(self.value, ItemRef):
            return self.value.gallery
        return self.modality


@dataclass(frozen=True)
class Composed:
    terms: tuple[Term, ...]
    combine: Combine = "geodesic"


@dataclass(frozen=True)
class Options:
    """How a result list is shaped: a spherical cap (degrees), MMR's lambda, the dedup angle, and
    the least match probability a text <-> image result must have (`retrieval.serving.confidence`)."""

    max_angle_deg: float | None = None
    diversity: float | None = None
    dedup_angle_deg: float | None = None
    min_probability: float | None = None

    def check(self) -> Options:
        for name in ("max_angle_deg", "dedup_angle_deg"):
            v = getattr(self, name)
            if v is not None and not (math.isfinite(v) and 0 <= v <= 180):
                raise InvalidInputError(f"{name} is an angle and must lie in [0, 180] degrees, got {v}")
        if self.diversity is not None and not (math.isfinite(self.diversity) and 0 <= self.diversity <= 1):
            raise InvalidInputError(f"diversity must lie in [0, 1], got {self.diversity}")
        check_min_probability(self.min_probability)
        return self

    @property
    def reranks(self) -> bool:
        return bool(self.diversity) or self.dedup_angle_deg is not None


NO_OPTIONS = Options()


@dataclass
class Point:
    """A query resolved on the sphere: its unit vector, its modality, and the ids to leave out."""

    vector: np.ndarray
    modality: Modality | None
    exclude: dict[str, set[int]] = field(default_factory=dict)


def composed_modality(terms: tuple[Term, ...]) -> Modality | None:
    """The modality holding a strict majority of the positive weight, else None (see the docstring)."""
    total = sum(t.weight for t in terms if t.weight > 0)
    for modality in ("text", "image"):
        if sum(t.weight for t in terms if t.weight > 0 and t.kind_modality == modality) > total / 2:
            return modality
    return None


def check_composed(query: Composed, max_terms: int, check_term: Callable[[Term], None]) -> None:
    """What can be checked before any work: the number of terms, their weights and each term."""
    if not query.terms:
        raise InvalidInputError("a composed query needs at least one term")
    if len(query.terms) > max_terms:
        raise InvalidInputError(f"a composed query has {len(query.terms)} terms, over the limit of {max_terms}")
    if query.combine not in ("geodesic", "linear"):
        raise InvalidInputError(f"unknown combine {query.combine!r}")
    check_weights(np.array([t.weight for t in query.terms]))
    for i, term in enumerate(query.terms):
        try:
            check_term(term)
        except InvalidInputError as e:
            raise InvalidInputError(f"terms[{i}]: {e}") from None


def item_vector(index: IndexVersion, ref: ItemRef) -> np.ndarray:
    """The stored unit vector of an item (the first D coordinates of its [g, b_g] row)."""
    if ref.gallery not in ("image", "text"):
        raise InvalidInputError("an item reference must name its gallery (image or text)")
    if index.metadata(ref.gallery, [ref.id])[0] is None:
        raise NotFoundError(f"no {ref.gallery} with id {ref.id} in index version {index.name}")
    return index.vectors(ref.gallery, np.array([ref.id]))[0]


Embed = Callable[[str | bytes], Awaitable[np.ndarray]]
CheckEmbedding = Callable[[np.ndarray], np.ndarray]


async def resolve(
    query, source: Modality | None, index: IndexVersion, embed: Embed, check_embedding: CheckEmbedding
) -> Point:
    """One query (text, image bytes, embedding, ItemRef or Composed) -> its Point."""
    if isinstance(query, Composed):
        points = []
        for i, term in enumerate(query.terms):
            try:
                points.append(await resolve(term.value, term.modality, index, embed, check_embedding))
            except (InvalidInputError, NotFoundError) as e:
                raise type(e)(f"terms[{i}]: {e}") from None
        weights = np.array([t.weight for t in query.terms])
        combine = compose_geodesic if query.combine == "geodesic" else compose_linear
        exclude: dict[str, set[int]] = {}
        for point, w in zip(points, weights):
            for gallery, ids in point.exclude.items():
                if w > 0:
                    exclude.setdefault(gallery, set()).update(ids)
        return Point(combine(np.stack([p.vector for p in points]), weights), composed_modality(query.terms), exclude)
    if isinstance(query, ItemRef):
        return Point(item_vector(index, query), query.gallery, {query.gallery: {query.id}})
    if isinstance(query, np.ndarray):
        return Point(check_embedding(query), source)
    return Point(await embed(query), "text" if isinstance(query, str) else "image")
