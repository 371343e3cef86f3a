"""Cross-modal retrieval on a unit hypersphere.

from retrieval import create_model
model, preprocess, tokenizer = create_model("lite0-minilm")
img = model.encode_image(preprocess(pil_image)[None])   # (1, D) unit vector
txt = model.encode_text(tokenizer(["a dog on a beach"]))  # (1, D) unit vector
cosine = (img @ txt.T).item()

# rank a gallery of image vectors (N, D) for text queries as the service does: cosine plus
# each image's inverted-softmax bias from the model's query bank
from retrieval import querybank_of
scores = txt.numpy() @ gallery.T + querybank_of(model).bias(gallery, "image")
"""

from retrieval.errors import (
    DatasetError,
    FingerprintMismatchError,
    IndexCorruptError,
    IndexUnavailableError,
    InvalidInputError,
    ModelError,
    RetrievalError,
    UnauthenticatedError,
)

# Imported when first asked for: the model pulls in torch, the client grpc, and a light command
# such as `retrieval health` (a container's probe, every few seconds) needs neither.
_LAZY = {
    "DEFAULT_MODEL": "retrieval.embedding.factory",
    "create_model": "retrieval.embedding.factory",
    "get_model_config": "retrieval.embedding.factory",
    "list_models": "retrieval.embedding.factory",
    "QueryBank": "retrieval.embedding.querybank",
    "querybank_of": "retrieval.embedding.querybank",
    "RetrievalClient": "retrieval.client",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'retrieval' has no attribute {name!r}")


__all__ = [
    "DEFAULT_MODEL",
    "create_model",
    "get_model_config",
    "list_models",
    "QueryBank",
    "querybank_of",
    "RetrievalClient",
    "RetrievalError",
    "InvalidInputError",
    "DatasetError",
    "ModelError",
    "IndexUnavailableError",
    "IndexCorruptError",
    "FingerprintMismatchError",
    "UnauthenticatedError",
]
