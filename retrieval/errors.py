"""Typed exceptions raised at the project's boundaries.

Library code raises these; the gRPC layer maps them to status codes in one place
(`retrieval.serving.status`), and the CLIs print their message without a traceback.
"""

from __future__ import annotations


class RetrievalError(Exception):
    """Base class: an error whose message is meant for a person."""


class ConfigError(RetrievalError):
    """A setting (command-line flag or environment variable) is invalid; the message names it."""


class InvalidInputError(RetrievalError):
    """A query or input item is malformed (empty text, undecodable image, bad k, bad vector)."""


class DatasetError(RetrievalError):
    """A dataset folder or captions file cannot be used as given."""


class ModelError(RetrievalError):
    """A model name, config or checkpoint cannot be loaded."""


class NotFoundError(RetrievalError):
    """A request names a stored item (by id) that the live index version does not hold."""


class IndexUnavailableError(RetrievalError):
    """No published index version exists (yet) under the index root."""


class IndexCorruptError(RetrievalError):
    """A published index version is inconsistent (checksum, manifest, dimension)."""


class IndexFormatError(IndexCorruptError):
    """A published index version was written in another format (by another version of the builder)."""


class StalePageTokenError(RetrievalError):
    """A page token names an index version the server no longer serves: its ranking is gone."""


class FingerprintMismatchError(RetrievalError):
    """The model loaded does not match the one the index was built with."""


class UnauthenticatedError(RetrievalError):
    """A request lacks the bearer token the server requires."""


class DeadlineExceededError(RetrievalError):
    """The caller's deadline passed, or it cancelled, before its work was done: the work was dropped."""


class BatchItemError(RetrievalError):
    """One query of a batch failed: `position` names it, `cause` (also `__cause__`) says why."""

    def __init__(self, position: int, cause: BaseException):
        super().__init__(f"requests[{position}]: {cause}")
        self.position, self.cause = position, cause
