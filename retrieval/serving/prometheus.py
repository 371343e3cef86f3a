"""Prometheus metrics of the server, in their own registry (several servers can live in one
process, as in the tests) with the standard process, platform and GC collectors, exposed over
HTTP at /metrics (prometheus-client's WSGI app; every other path is 404)."""

from __future__ import annotations

import re
import socket
import threading
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    make_wsgi_app,
)
from prometheus_client.exposition import ThreadingWSGIServer

from retrieval.errors import ConfigError

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "retrieval_requests", "RPCs handled, by method and status code", ["method", "code"], registry=self.registry
        )
        self.latency = Histogram(
            "retrieval_request_latency_seconds",
            "RPC latency inside the server, by method",
            ["method"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "retrieval_encoder_batch_size",
            "items per encoder forward pass, by modality",
            ["modality"],
            buckets=_BATCH_BUCKETS,
            registry=self.registry,
        )
        self.index_version = Gauge(
            "retrieval_index_version", "number of the index version being served (0: none)", registry=self.registry
        )
        self.index_items = Gauge(
            "retrieval_index_items",
            "items in the served index version, by modality",
            ["modality"],
            registry=self.registry,
        )
        self.swaps = Counter(
            "retrieval_index_swaps", "index versions loaded (startup and hot swaps)", registry=self.registry
        )
        self.rejections = Counter(
            "retrieval_index_rejections",
            "published index versions refused (corrupt, "
            "untrusted or for another model); each is retried once its files change",
            registry=self.registry,
        )
        self.rejected_version = Gauge(
            "retrieval_index_rejected_version",
            "number of the last refused index version (0: none since the last swap; GetIndexInfo says why)",
            registry=self.registry,
        )
        self.geometry = Gauge(
            "retrieval_index_geometry",
            "the served version's geometry as measured when it was "
            "built (alignment, uniformity_image, uniformity_text, modality_gap, hubness_image, "
            "hubness_text, ...); absent for versions built before it was measured",
            ["metric"],
            registry=self.registry,
        )
        self._register_standard_collectors()
        self._http: ThreadingWSGIServer | None = None

    def _register_standard_collectors(self) -> None:
        """process_* (CPU, memory, open files), python_info and python_gc_*: what the default
        registry would export, in this server's own registry."""
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)

    def observe_refused_call(self, method: str, code: str) -> None:
        """A call refused before its handler ran (e.g. a missing bearer token): counted, not timed."""
        self.requests.labels(method, code).inc()

    def observe_request(self, method: str, code: str, seconds: float) -> None:
        self.requests.labels(method, code).inc()
        self.latency.labels(method).observe(seconds)

    def observe_batch(self, modality: str, size: int) -> None:
        self.batch_size.labels(modality).observe(size)

    def observe_index(self, index) -> None:
        self.index_version.set(_version_number(index.name))
        for modality in ("image", "text"):
            self.index_items.labels(modality).set(index.count(modality))
        self.swaps.inc()
        self.rejected_version.set(0)
        self.geometry.clear()  # the previous version's metrics do not describe this one
        for metric, value in (index.manifest.geometry or {}).items():
            self.geometry.labels(metric).set(value)

    def observe_rejection(self, version: str, reason: str) -> None:
        self.rejections.inc()
        self.rejected_version.set(_version_number(version))

    def serve_http(self, host: str, port: int) -> int:
        """Serve /metrics from a daemon thread; returns the port (useful with port 0).
        (prometheus-client's own start_http_server answers every path with the metrics.)"""
        try:
            family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
            server_class = type("MetricsServer", (ThreadingWSGIServer,), {"address_family": family})
            self._http = make_server(
                host, port, _only_metrics(make_wsgi_app(self.registry)), server_class, handler_class=_QuietHandler
            )
        except OSError as e:
            raise ConfigError(f"cannot serve metrics on {host}:{port}: {e.strerror or e}") from None
        threading.Thread(target=self._http.serve_forever, name="retrieval-metrics", daemon=True).start()
        return self._http.server_port

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


def _version_number(name: str) -> int:
    m = re.match(r"v(\d+)$", name)
    return int(m.group(1)) if m else 0


def _only_metrics(app):
    """The WSGI `app` at /metrics, 404 everywhere else."""

    def wsgi(environ, start_response):
        if environ.get("PATH_INFO") == "/metrics":
            return app(environ, start_response)
        start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
        return [b"not found: the metrics are at /metrics\n"]

    return wsgi


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args) -> None:  # noqa: A002 - the base class's signature
        """Scrapes are not logged (one line per scrape on stderr otherwise)."""
