"""The one mapping from the project's typed exceptions to gRPC status codes.

The servicer and the auth interceptor translate errors here and nowhere else. A client sees a
status code and a message meant for a person; anything unexpected becomes INTERNAL with a
generic message while the traceback goes to the server log, never to the client. Messages reach
clients without host paths (`client_message`); the log keeps them whole.
"""

from __future__ import annotations

import logging
import re

import grpc

from retrieval.errors import (
    BatchItemError,
    DeadlineExceededError,
    FingerprintMismatchError,
    IndexCorruptError,
    IndexUnavailableError,
    InvalidInputError,
    ModelError,
    NotFoundError,
    RetrievalError,
    StalePageTokenError,
    UnauthenticatedError,
)
from retrieval.store.layout import VERSION_RE

log = logging.getLogger("retrieval.serving.server")

STATUS_FOR: dict[type[RetrievalError], grpc.StatusCode] = {
    InvalidInputError: grpc.StatusCode.INVALID_ARGUMENT,
    NotFoundError: grpc.StatusCode.NOT_FOUND,
    UnauthenticatedError: grpc.StatusCode.UNAUTHENTICATED,
    IndexUnavailableError: grpc.StatusCode.UNAVAILABLE,
    IndexCorruptError: grpc.StatusCode.FAILED_PRECONDITION,
    FingerprintMismatchError: grpc.StatusCode.FAILED_PRECONDITION,
    ModelError: grpc.StatusCode.FAILED_PRECONDITION,
    StalePageTokenError: grpc.StatusCode.FAILED_PRECONDITION,
    DeadlineExceededError: grpc.StatusCode.DEADLINE_EXCEEDED,
}
# not logged
CLIENT_ERRORS = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.DEADLINE_EXCEEDED)
QUIET = (StalePageTokenError,)  # FAILED_PRECONDITION of a client's own making: not logged either

INTERNAL_MESSAGE = "internal server error (details are in the server log)"


def status_for(exc: BaseException, method: str = "") -> tuple[grpc.StatusCode, str]:
    """(code, message) to send for `exc`; logs what the client does not see. A failed item of a
    batch gets its cause's status, its message prefixed with the item's position."""
    if isinstance(exc, BatchItemError):
        code, message = status_for(exc.cause, method)
        return code, f"requests[{exc.position}]: {message}"
    for cls in type(exc).__mro__:
        if cls in STATUS_FOR:
            if STATUS_FOR[cls] not in CLIENT_ERRORS and not isinstance(exc, QUIET):
                log.warning("%s: %s: %s", method, type(exc).__name__, exc)
            return STATUS_FOR[cls], client_message(str(exc))
    if isinstance(exc, RetrievalError):
        log.warning("%s: %s: %s", method, type(exc).__name__, exc)
        return grpc.StatusCode.FAILED_PRECONDITION, client_message(str(exc))
    log.error("%s failed", method, exc_info=exc)
    return grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE


# An absolute path: a '/' that does not continue a word, a relative path or a URL, up to a space,
# quote, bracket, colon or comma.
_HOST_PATH = re.compile(r"(?<![\w.~:/-])/[^\s'\"`,;:()\[\]{}<>]+")


def client_message(message: str) -> str:
    """`message` with every absolute host path shortened to its file name (after its version
    directory, if it is in one: `v0007/images.faiss`), so a client learns which file is meant but
    nothing of the host's layout."""

    def short(match: re.Match) -> str:
        parts = [p for p in match.group(0).split("/") if p]
        return "/".join(parts[-2:] if len(parts) >= 2 and VERSION_RE.match(parts[-2]) else parts[-1:])

    return _HOST_PATH.sub(short, message)


# A client's deadline timer fires about one network trip before the server's own (which starts
# when the request arrives), so its cancellation can reach the server just before that deadline.
DEADLINE_SLACK_S = 0.1


def cancelled_status(context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    """What a call cancelled under its handler ended with, for the metrics: DEADLINE_EXCEEDED when
    its deadline has (about) passed, else CANCELLED (the client gave up or went away)."""
    remaining = context.time_remaining()
    if remaining is not None and remaining <= DEADLINE_SLACK_S:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.CANCELLED
