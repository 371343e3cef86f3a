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
from retrieval.errors import (DatasetError, FingerprintMismatchError, IndexCorruptError, IndexUnavailableError,
                              InvalidInputError, ModelError, RetrievalError, UnauthenticatedError)
from retrieval.embedding.factory import DEFAULT_MODEL, create_model, get_model_config, list_models
from retrieval.embedding.querybank import QueryBank, querybank_of


def __getattr__(name: str):
    # The client pulls in grpc and the generated stubs: import it only when asked for.
    if name == "RetrievalClient":
        from retrieval.client import RetrievalClient

        return RetrievalClient
    raise AttributeError(f"module 'retrieval' has no attribute {name!r}")


__all__ = [
    "DEFAULT_MODEL", "create_model", "get_model_config", "list_models", "QueryBank", "querybank_of", "RetrievalClient",
    "RetrievalError", "InvalidInputError", "DatasetError", "ModelError", "IndexUnavailableError",
    "IndexCorruptError", "FingerprintMismatchError", "UnauthenticatedError",
]
