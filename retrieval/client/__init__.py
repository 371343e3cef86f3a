"""Clients of the retrieval service, sync and async, with a deadline on every call.

from retrieval.client import RetrievalClient
with RetrievalClient("localhost:50051") as client:
    hits = client.search_text("a dog running on the beach", k=5)
"""

from retrieval.client.aio import AsyncRetrievalClient
from retrieval.client.base import DEFAULT_ADDRESS, DEFAULT_TIMEOUT_S, SearchAnswer, search_request
from retrieval.client.sync import RetrievalClient

__all__ = [
    "DEFAULT_ADDRESS",
    "DEFAULT_TIMEOUT_S",
    "AsyncRetrievalClient",
    "RetrievalClient",
    "SearchAnswer",
    "search_request",
]
