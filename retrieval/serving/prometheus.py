"""Prometheus metrics of the server, in their own registry (several servers can live in one
process, as in the tests), exposed over HTTP by prometheus-client."""
from __future__ import annotations

import re

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("retrieval_requests", "RPCs handled, by method and status code",
                                ["method", "code"], registry=self.registry)
        self.latency = Histogram("retrieval_request_latency_seconds", "RPC latency inside the server, by method",
                                 ["method"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.batch_size = Histogram("retrieval_encoder_batch_size", "items per encoder forward pass, by modality",
                                    ["modality"], buckets=_BATCH_BUCKETS, registry=self.registry)
        self.index_version = Gauge("retrieval_index_version", "number of the index version being served (0: none)",
                                   registry=self.registry)
        self.index_items = Gauge("retrieval_index_items", "items in the served index version, by modality",
                                 ["modality"], registry=self.registry)
        self.swaps = Counter("retrieval_index_swaps", "index versions loaded (startup and hot swaps)",
                             registry=self.registry)
        self._http = None

    def observe_request(self, method: str, code: str, seconds: float) -> None:
        self.requests.labels(method, code).inc()
        self.latency.labels(method).observe(seconds)

    def observe_batch(self, modality: str, size: int) -> None:
        self.batch_size.labels(modality).observe(size)

    def observe_index(self, index) -> None:
        m = re.match(r"v(\d+)$", index.name)
        self.index_version.set(int(m.group(1)) if m else 0)
        for modality in ("image", "text"):
            self.index_items.labels(modality).set(index.count(modality))
        self.swaps.inc()

    def serve_http(self, host: str, port: int) -> int:
        """Start the /metrics endpoint; returns its port (useful with port 0)."""
        self._http, _thread = start_http_server(port, addr=host, registry=self.registry)
        return self._http.server_port

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
