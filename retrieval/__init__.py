"""Cross-modal retrieval on a unit hypersphere.

    from retrieval import create_model
    model, preprocess, tokenizer = create_model("lite0-minilm")
    img = model.encode_image(preprocess(pil_image)[None])   # (1, D) unit vector
    txt = model.encode_text(tokenizer(["a dog on a beach"]))  # (1, D) unit vector
    cosine = (img @ txt.T).item()
"""
from retrieval.errors import (DatasetError, FingerprintMismatchError, IndexCorruptError, IndexUnavailableError,
                              InvalidInputError, ModelError, RetrievalError, UnauthenticatedError)
from retrieval.factory import DEFAULT_MODEL, create_model, get_model_config, list_models

__all__ = [
    "DEFAULT_MODEL", "create_model", "get_model_config", "list_models",
    "RetrievalError", "InvalidInputError", "DatasetError", "ModelError", "IndexUnavailableError",
    "IndexCorruptError", "FingerprintMismatchError", "UnauthenticatedError",
]
