"""The one mapping from the project's typed exceptions to gRPC status codes.

The servicer and the auth interceptor translate errors here and nowhere else. A client sees a
status code and a message meant for a person; anything unexpected becomes INTERNAL with a
generic message while the traceback goes to the server log, never to the client.
"""
from __future__ import annotations

import logging

import grpc

from retrieval.errors import (FingerprintMismatchError, IndexCorruptError, IndexUnavailableError, InvalidInputError,
                              ModelError, RetrievalError, UnauthenticatedError)

log = logging.getLogger("retrieval.serving.server")

STATUS_FOR: dict[type[RetrievalError], grpc.StatusCode] = {
    InvalidInputError: grpc.StatusCode.INVALID_ARGUMENT,
    UnauthenticatedError: grpc.StatusCode.UNAUTHENTICATED,
    IndexUnavailableError: grpc.StatusCode.UNAVAILABLE,
    IndexCorruptError: grpc.StatusCode.FAILED_PRECONDITION,
    FingerprintMismatchError: grpc.StatusCode.FAILED_PRECONDITION,
    ModelError: grpc.StatusCode.FAILED_PRECONDITION,
}

INTERNAL_MESSAGE = "internal server error (details are in the server log)"


def status_for(exc: BaseException, method: str = "") -> tuple[grpc.StatusCode, str]:
    """(code, message) to send for `exc`; logs what the client does not see."""
    for cls in type(exc).__mro__:
        if cls in STATUS_FOR:
            if STATUS_FOR[cls] is not grpc.StatusCode.INVALID_ARGUMENT:
                log.warning("%s: %s: %s", method, type(exc).__name__, exc)
            return STATUS_FOR[cls], str(exc)
    if isinstance(exc, RetrievalError):
        log.warning("%s: %s: %s", method, type(exc).__name__, exc)
        return grpc.StatusCode.FAILED_PRECONDITION, str(exc)
    log.error("%s failed", method, exc_info=exc)
    return grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE
