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
MODALITY_UNSPECIFIED: Modality
MODALITY_IMAGE: Modality
MODALITY_TEXT: Modality

class Embedding(_message.Message):
    __slots__ = ("values", "modality")
    VALUES_FIELD_NUMBER: _ClassVar[int]
    MODALITY_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    modality: Modality
    def __init__(self, values: _Optional[_Iterable[float]] = ..., modality: _Optional[_Union[Modality, str]] = ...) -> None: ...

class Query(_message.Message):
    __slots__ = ("text", "image", "embedding")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    text: str
    image: bytes
    embedding: Embedding
    def __init__(self, text: _Optional[str] = ..., image: _Optional[bytes] = ..., embedding: _Optional[_Union[Embedding, _Mapping]] = ...) -> None: ...

class SearchRequest(_message.Message):
    __slots__ = ("query", "target", "k", "min_score")
    QUERY_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    MIN_SCORE_FIELD_NUMBER: _ClassVar[int]
    query: Query
    target: Modality
    k: int
    min_score: float
    def __init__(self, query: _Optional[_Union[Query, _Mapping]] = ..., target: _Optional[_Union[Modality, str]] = ..., k: _Optional[int] = ..., min_score: _Optional[float] = ...) -> None: ...

class SearchResult(_message.Message):
    __slots__ = ("id", "score", "angle_deg", "modality", "uri", "caption", "image_id", "image_uri")
    ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    ANGLE_DEG_FIELD_NUMBER: _ClassVar[int]
    MODALITY_FIELD_NUMBER: _ClassVar[int]
    URI_FIELD_NUMBER: _ClassVar[int]
    CAPTION_FIELD_NUMBER: _ClassVar[int]
    IMAGE_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGE_URI_FIELD_NUMBER: _ClassVar[int]
    id: int
    score: float
    angle_deg: float
    modality: Modality
    uri: str
    caption: str
    image_id: int
    image_uri: str
    def __init__(self, id: _Optional[int] = ..., score: _Optional[float] = ..., angle_deg: _Optional[float] = ..., modality: _Optional[_Union[Modality, str]] = ..., uri: _Optional[str] = ..., caption: _Optional[str] = ..., image_id: _Optional[int] = ..., image_uri: _Optional[str] = ...) -> None: ...

class SearchResponse(_message.Message):
    __slots__ = ("results", "index_version")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    INDEX_VERSION_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[SearchResult]
    index_version: str
    def __init__(self, results: _Optional[_Iterable[_Union[SearchResult, _Mapping]]] = ..., index_version: _Optional[str] = ...) -> None: ...

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
    __slots__ = ("version", "model", "model_fingerprint", "dim", "image_count", "text_count", "available_versions", "rejected_version", "rejected_reason")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    IMAGE_COUNT_FIELD_NUMBER: _ClassVar[int]
    TEXT_COUNT_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    REJECTED_VERSION_FIELD_NUMBER: _ClassVar[int]
    REJECTED_REASON_FIELD_NUMBER: _ClassVar[int]
    version: str
    model: str
    model_fingerprint: str
    dim: int
    image_count: int
    text_count: int
    available_versions: _containers.RepeatedScalarFieldContainer[str]
    rejected_version: str
    rejected_reason: str
    def __init__(self, version: _Optional[str] = ..., model: _Optional[str] = ..., model_fingerprint: _Optional[str] = ..., dim: _Optional[int] = ..., image_count: _Optional[int] = ..., text_count: _Optional[int] = ..., available_versions: _Optional[_Iterable[str]] = ..., rejected_version: _Optional[str] = ..., rejected_reason: _Optional[str] = ...) -> None: ...
