from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Modality(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODALITY_UNSPECIFIED: _ClassVar[Modality]
    MODALITY_IMAGE: _ClassVar[Modality]
    MODALITY_TEXT: _ClassVar[Modality]

class Combine(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    COMBINE_UNSPECIFIED: _ClassVar[Combine]
    COMBINE_GEODESIC: _ClassVar[Combine]
    COMBINE_LINEAR: _ClassVar[Combine]
MODALITY_UNSPECIFIED: Modality
MODALITY_IMAGE: Modality
MODALITY_TEXT: Modality
COMBINE_UNSPECIFIED: Combine
COMBINE_GEODESIC: Combine
COMBINE_LINEAR: Combine

class Embedding(_message.Message):
    __slots__ = ("values", "modality")
    VALUES_FIELD_NUMBER: _ClassVar[int]
    MODALITY_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    modality: Modality
    def __init__(self, values: _Optional[_Iterable[float]] = ..., modality: _Optional[_Union[Modality, str]] = ...) -> None: ...

class Query(_message.Message):
    __slots__ = ("text", "image", "embedding", "item", "composed")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    ITEM_FIELD_NUMBER: _ClassVar[int]
    COMPOSED_FIELD_NUMBER: _ClassVar[int]
    text: str
    image: bytes
    embedding: Embedding
    item: ItemRef
    composed: ComposedQuery
    def __init__(self, text: _Optional[str] = ..., image: _Optional[bytes] = ..., embedding: _Optional[_Union[Embedding, _Mapping]] = ..., item: _Optional[_Union[ItemRef, _Mapping]] = ..., composed: _Optional[_Union[ComposedQuery, _Mapping]] = ...) -> None: ...

class ItemRef(_message.Message):
    __slots__ = ("id", "gallery")
    ID_FIELD_NUMBER: _ClassVar[int]
    GALLERY_FIELD_NUMBER: _ClassVar[int]
    id: int
    gallery: Modality
    def __init__(self, id: _Optional[int] = ..., gallery: _Optional[_Union[Modality, str]] = ...) -> None: ...

class QueryTerm(_message.Message):
    __slots__ = ("text", "image", "embedding", "item", "weight")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    ITEM_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    text: str
    image: bytes
    embedding: Embedding
    item: ItemRef
    weight: float
    def __init__(self, text: _Optional[str] = ..., image: _Optional[bytes] = ..., embedding: _Optional[_Union[Embedding, _Mapping]] = ..., item: _Optional[_Union[ItemRef, _Mapping]] = ..., weight: _Optional[float] = ...) -> None: ...

class ComposedQuery(_message.Message):
    __slots__ = ("terms", "combine")
    TERMS_FIELD_NUMBER: _ClassVar[int]
    COMBINE_FIELD_NUMBER: _ClassVar[int]
    terms: _containers.RepeatedCompositeFieldContainer[QueryTerm]
    combine: Combine
    def __init__(self, terms: _Optional[_Iterable[_Union[QueryTerm, _Mapping]]] = ..., combine: _Optional[_Union[Combine, str]] = ...) -> None: ...

class Filter(_message.Message):
    __slots__ = ("field", "equals", "any_of", "range")
    FIELD_FIELD_NUMBER: _ClassVar[int]
    EQUALS_FIELD_NUMBER: _ClassVar[int]
    ANY_OF_FIELD_NUMBER: _ClassVar[int]
    RANGE_FIELD_NUMBER: _ClassVar[int]
    field: str
    equals: Value
    any_of: ValueList
    range: Range
    def __init__(self, field: _Optional[str] = ..., equals: _Optional[_Union[Value, _Mapping]] = ..., any_of: _Optional[_Union[ValueList, _Mapping]] = ..., range: _Optional[_Union[Range, _Mapping]] = ...) -> None: ...

class Value(_message.Message):
    __slots__ = ("string_value", "number_value", "date_value")
    STRING_VALUE_FIELD_NUMBER: _ClassVar[int]
    NUMBER_VALUE_FIELD_NUMBER: _ClassVar[int]
    DATE_VALUE_FIELD_NUMBER: _ClassVar[int]
    string_value: str
    number_value: float
    date_value: str
    def __init__(self, string_value: _Optional[str] = ..., number_value: _Optional[float] = ..., date_value: _Optional[str] = ...) -> None: ...

class ValueList(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedCompositeFieldContainer[Value]
    def __init__(self, values: _Optional[_Iterable[_Union[Value, _Mapping]]] = ...) -> None: ...

class Range(_message.Message):
    __slots__ = ("min", "max")
    MIN_FIELD_NUMBER: _ClassVar[int]
    MAX_FIELD_NUMBER: _ClassVar[int]
    min: Value
    max: Value
    def __init__(self, min: _Optional[_Union[Value, _Mapping]] = ..., max: _Optional[_Union[Value, _Mapping]] = ...) -> None: ...

class SearchRequest(_message.Message):
    __slots__ = ("query", "target", "k", "min_score", "max_angle_deg", "filters", "page_size", "page_token", "diversity", "dedup_angle_deg", "min_probability")
    QUERY_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    MIN_SCORE_FIELD_NUMBER: _ClassVar[int]
    MAX_ANGLE_DEG_FIELD_NUMBER: _ClassVar[int]
    FILTERS_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    DIVERSITY_FIELD_NUMBER: _ClassVar[int]
    DEDUP_ANGLE_DEG_FIELD_NUMBER: _ClassVar[int]
    MIN_PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    query: Query
    target: Modality
    k: int
    min_score: float
    max_angle_deg: float
    filters: _containers.RepeatedCompositeFieldContainer[Filter]
    page_size: int
    page_token: str
    diversity: float
    dedup_angle_deg: float
    min_probability: float
    def __init__(self, query: _Optional[_Union[Query, _Mapping]] = ..., target: _Optional[_Union[Modality, str]] = ..., k: _Optional[int] = ..., min_score: _Optional[float] = ..., max_angle_deg: _Optional[float] = ..., filters: _Optional[_Iterable[_Union[Filter, _Mapping]]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., diversity: _Optional[float] = ..., dedup_angle_deg: _Optional[float] = ..., min_probability: _Optional[float] = ...) -> None: ...

class SearchResult(_message.Message):
    __slots__ = ("id", "score", "angle_deg", "modality", "uri", "caption", "image_id", "image_uri", "match_probability")
    ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    ANGLE_DEG_FIELD_NUMBER: _ClassVar[int]
    MODALITY_FIELD_NUMBER: _ClassVar[int]
    URI_FIELD_NUMBER: _ClassVar[int]
    CAPTION_FIELD_NUMBER: _ClassVar[int]
    IMAGE_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGE_URI_FIELD_NUMBER: _ClassVar[int]
    MATCH_PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    id: int
    score: float
    angle_deg: float
    modality: Modality
    uri: str
    caption: str
    image_id: int
    image_uri: str
    match_probability: float
    def __init__(self, id: _Optional[int] = ..., score: _Optional[float] = ..., angle_deg: _Optional[float] = ..., modality: _Optional[_Union[Modality, str]] = ..., uri: _Optional[str] = ..., caption: _Optional[str] = ..., image_id: _Optional[int] = ..., image_uri: _Optional[str] = ..., match_probability: _Optional[float] = ...) -> None: ...

class SearchResponse(_message.Message):
    __slots__ = ("results", "index_version", "no_confident_match", "next_page_token")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    INDEX_VERSION_FIELD_NUMBER: _ClassVar[int]
    NO_CONFIDENT_MATCH_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[SearchResult]
    index_version: str
    no_confident_match: bool
    next_page_token: str
    def __init__(self, results: _Optional[_Iterable[_Union[SearchResult, _Mapping]]] = ..., index_version: _Optional[str] = ..., no_confident_match: _Optional[bool] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class BatchSearchRequest(_message.Message):
    __slots__ = ("requests",)
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[SearchRequest]
    def __init__(self, requests: _Optional[_Iterable[_Union[SearchRequest, _Mapping]]] = ...) -> None: ...

class BatchSearchResponse(_message.Message):
    __slots__ = ("responses",)
    RESPONSES_FIELD_NUMBER: _ClassVar[int]
    responses: _containers.RepeatedCompositeFieldContainer[SearchResponse]
    def __init__(self, responses: _Optional[_Iterable[_Union[SearchResponse, _Mapping]]] = ...) -> None: ...

class EmbedRequest(_message.Message):
    __slots__ = ("text", "image")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    text: str
    image: bytes
    def __init__(self, text: _Optional[str] = ..., image: _Optional[bytes] = ...) -> None: ...

class EmbedResponse(_message.Message):
    __slots__ = ("embedding", "model", "model_fingerprint")
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    embedding: Embedding
    model: str
    model_fingerprint: str
    def __init__(self, embedding: _Optional[_Union[Embedding, _Mapping]] = ..., model: _Optional[str] = ..., model_fingerprint: _Optional[str] = ...) -> None: ...

class GetIndexInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class IndexInfo(_message.Message):
    __slots__ = ("version", "model", "model_fingerprint", "dim", "image_count", "text_count", "available_versions", "rejected_version", "rejected_reason", "geometry", "filter_fields", "calibrated")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    IMAGE_COUNT_FIELD_NUMBER: _ClassVar[int]
    TEXT_COUNT_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    REJECTED_VERSION_FIELD_NUMBER: _ClassVar[int]
    REJECTED_REASON_FIELD_NUMBER: _ClassVar[int]
    GEOMETRY_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELDS_FIELD_NUMBER: _ClassVar[int]
    CALIBRATED_FIELD_NUMBER: _ClassVar[int]
    version: str
    model: str
    model_fingerprint: str
    dim: int
    image_count: int
    text_count: int
    available_versions: _containers.RepeatedScalarFieldContainer[str]
    rejected_version: str
    rejected_reason: str
    geometry: Geometry
    filter_fields: _containers.RepeatedScalarFieldContainer[str]
    calibrated: bool
    def __init__(self, version: _Optional[str] = ..., model: _Optional[str] = ..., model_fingerprint: _Optional[str] = ..., dim: _Optional[int] = ..., image_count: _Optional[int] = ..., text_count: _Optional[int] = ..., available_versions: _Optional[_Iterable[str]] = ..., rejected_version: _Optional[str] = ..., rejected_reason: _Optional[str] = ..., geometry: _Optional[_Union[Geometry, _Mapping]] = ..., filter_fields: _Optional[_Iterable[str]] = ..., calibrated: _Optional[bool] = ...) -> None: ...

class Geometry(_message.Message):
    __slots__ = ("alignment", "uniformity_image", "uniformity_text", "modality_gap", "hubness_image", "hubness_text")
    ALIGNMENT_FIELD_NUMBER: _ClassVar[int]
    UNIFORMITY_IMAGE_FIELD_NUMBER: _ClassVar[int]
    UNIFORMITY_TEXT_FIELD_NUMBER: _ClassVar[int]
    MODALITY_GAP_FIELD_NUMBER: _ClassVar[int]
    HUBNESS_IMAGE_FIELD_NUMBER: _ClassVar[int]
    HUBNESS_TEXT_FIELD_NUMBER: _ClassVar[int]
    alignment: float
    uniformity_image: float
    uniformity_text: float
    modality_gap: float
    hubness_image: float
    hubness_text: float
    def __init__(self, alignment: _Optional[float] = ..., uniformity_image: _Optional[float] = ..., uniformity_text: _Optional[float] = ..., modality_gap: _Optional[float] = ..., hubness_image: _Optional[float] = ..., hubness_text: _Optional[float] = ...) -> None: ...

class WalkRequest(_message.Message):
    __slots__ = ("start", "end", "target", "steps", "k")
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    start: Query
    end: Query
    target: Modality
    steps: int
    k: int
    def __init__(self, start: _Optional[_Union[Query, _Mapping]] = ..., end: _Optional[_Union[Query, _Mapping]] = ..., target: _Optional[_Union[Modality, str]] = ..., steps: _Optional[int] = ..., k: _Optional[int] = ...) -> None: ...

class WalkStep(_message.Message):
    __slots__ = ("step", "t", "angle_deg", "results", "index_version")
    STEP_FIELD_NUMBER: _ClassVar[int]
    T_FIELD_NUMBER: _ClassVar[int]
    ANGLE_DEG_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    INDEX_VERSION_FIELD_NUMBER: _ClassVar[int]
    step: int
    t: float
    angle_deg: float
    results: _containers.RepeatedCompositeFieldContainer[SearchResult]
    index_version: str
    def __init__(self, step: _Optional[int] = ..., t: _Optional[float] = ..., angle_deg: _Optional[float] = ..., results: _Optional[_Iterable[_Union[SearchResult, _Mapping]]] = ..., index_version: _Optional[str] = ...) -> None: ...
