"""The gRPC server: `serve(config)` runs it until SIGTERM/SIGINT; `RetrievalServer` is the
same server as an object (start/stop inside a running event loop), and `ServerThread` runs one
in a background thread (tests, notebooks, the demo).

Startup: the port opens with health NOT_SERVING; the model and the CURRENT index version load
off the event loop; health turns SERVING. A fingerprint mismatch stops the server with its
message. A watcher swaps to each newly published version. Shutdown: health NOT_SERVING, then
`stop(grace)` lets in-flight requests finish.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import logging
import signal
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from retrieval.errors import ConfigError, UnauthenticatedError
from retrieval.serving.config import ServeConfig
from retrieval.serving.encoder import cached_model
from retrieval.serving.engine import Engine
from retrieval.serving.health import HealthServicer
from retrieval.serving.preflight import check_can_listen
from retrieval.serving.prometheus import ServerMetrics
from retrieval.serving.servicer import SERVICE_NAME, RetrievalServicer, add_to_server
from retrieval.serving.status import status_for

log = logging.getLogger("retrieval.serving.server")
MiB = 1 << 20


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Requires `authorization: Bearer TOKEN` on the retrieval service; health checks and
    reflection stay open (orchestrators probe them without credentials)."""

    OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")

    def __init__(self, token: str, on_denied: Callable[[str, str], None] | None = None):
        self._expected = f"Bearer {token}".encode()
        self._on_denied = on_denied  # (method, status code name): denied calls count in the metrics

        async def deny(request, context):
            code, message = status_for(
                UnauthenticatedError("missing or wrong bearer token: send metadata 'authorization: Bearer <token>'"),
                "auth",
            )
            await context.abort(code, message)

        self._deny = grpc.unary_unary_rpc_method_handler(deny)

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        if details.method.startswith(self.OPEN_PREFIXES):
            return await continuation(details)
        sent = dict(details.invocation_metadata or ()).get("authorization", "")
        sent = sent.encode() if isinstance(sent, str) else sent
        if hmac.compare_digest(sent, self._expected):
            return await continuation(details)
        if self._on_denied is not None:
            self._on_denied(details.method.rsplit("/", 1)[-1], grpc.StatusCode.UNAUTHENTICATED.name)
        return self._deny


class RetrievalServer:
    def __init__(self, config: ServeConfig, model_loader: Callable[[str], tuple] | None = None):
        self.config = config.validate()
        model_loader = model_loader or functools.partial(cached_model, device=config.device)
        self.metrics = ServerMetrics()
        self.executor = ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="retrieval")
        self.engine = Engine(
            config.index,
            config.limits,
            self.executor,
            model=config.model,
            model_loader=model_loader,
            verify=config.verify,
            on_batch=self.metrics.observe_batch,
            on_swap=self.metrics.observe_index,
            on_reject=self.metrics.observe_rejection,
        )
        self.health = HealthServicer()
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._stop_watching = asyncio.Event()
        self._watcher: asyncio.Task | None = None

    async def _set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def start(self) -> None:
        """Listen (health NOT_SERVING), load the model and the CURRENT version, turn SERVING, watch
        for new versions. A ConfigError when the server cannot listen as configured."""
        try:
            await self._listen()
            loaded = await asyncio.get_running_loop().run_in_executor(self.executor, self.engine.load)
        except BaseException:
            await self._close(grace=0)
            raise
        if loaded:
            await self._set_serving(True)
        self._watcher = asyncio.get_running_loop().create_task(self._watch())

    async def _listen(self) -> None:
        cfg = self.config
        max_bytes = int(cfg.max_message_mb * MiB)
        self._server = grpc.aio.server(
            interceptors=[BearerTokenInterceptor(cfg.token, self.metrics.observe_refused_call)] if cfg.token else None,
            # no SO_REUSEPORT: a port another server holds is an error, not a silently shared port
            options=[
                ("grpc.so_reuseport", 0),
                ("grpc.max_receive_message_length", max_bytes),
                ("grpc.max_send_message_length", max_bytes),
            ],
        )
        add_to_server(RetrievalServicer(self.engine, self.metrics, cfg.max_batch_queries), self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self._server)
        await self._set_serving(False)
        check_can_listen(cfg.host, cfg.port)
        if cfg.metrics_port >= 0:
            check_can_listen(cfg.host, cfg.metrics_port, "metrics")
        address = f"{cfg.host}:{cfg.port}"
        try:  # grpc raises RuntimeError, or returns port 0, when it cannot bind after all
            if cfg.tls_cert:
                creds = grpc.ssl_server_credentials([(Path(cfg.tls_key).read_bytes(), Path(cfg.tls_cert).read_bytes())])
                self.port = self._server.add_secure_port(address, creds)
            else:
                self.port = self._server.add_insecure_port(address)
        except RuntimeError:
            self.port = 0
        if not self.port:
            raise ConfigError(f"cannot listen for gRPC on {address}")
        await self._server.start()
        log.info("listening on %s:%d (%s)", cfg.host, self.port, "TLS" if cfg.tls_cert else "plaintext")
        if cfg.metrics_port >= 0:
            self.metrics_port = self.metrics.serve_http(cfg.host, cfg.metrics_port)
            log.info("metrics on http://%s:%d/metrics", cfg.host, self.metrics_port)

    async def _watch(self) -> None:
        while not self._stop_watching.is_set():
            if await self.engine.poll_once():
                await self._set_serving(True)
            try:
                await asyncio.wait_for(self._stop_watching.wait(), self.config.watch_interval_s)
            except asyncio.TimeoutError:
                pass

    async def stop(self, grace: float | None = None) -> None:
        """Health NOT_SERVING, then stop accepting and let in-flight calls finish within `grace`."""
        grace = self.config.grace_s if grace is None else grace
        log.info("shutting down (grace %.1fs)", grace)
        await self.health.enter_graceful_shutdown()
        await self._close(grace)

    async def _close(self, grace: float) -> None:
        self._stop_watching.set()
        if self._watcher is not None:
            await self._watcher
        if self._server is not None:
            await self._server.stop(grace)
        self.metrics.close()
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def wait_for_termination(self) -> None:
        await self._server.wait_for_termination()


async def _serve(config: ServeConfig) -> None:
    server = RetrievalServer(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    await stop.wait()
    await server.stop()


def serve(config: ServeConfig) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully."""
    asyncio.run(_serve(config))


class ServerThread:
    """A RetrievalServer on its own event loop in a daemon thread.

    with ServerThread(ServeConfig(index=root, port=0, metrics_port=-1)) as srv:
        client = RetrievalClient(srv.address)
    """

    def __init__(self, config: ServeConfig, model_loader: Callable[[str], tuple] | None = None):
        self.config, self.model_loader = config, model_loader
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="retrieval-server", daemon=True)
        self.server: RetrievalServer | None = None

    def _call(self, coro, timeout: float | None = None):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self, timeout: float = 300) -> ServerThread:
        self.thread.start()

        async def make_and_start():
            self.server = RetrievalServer(self.config, self.model_loader)
            await self.server.start()

        try:
            self._call(make_and_start(), timeout)
        except BaseException:
            self._halt()
            raise
        return self

    @property
    def address(self) -> str:
        return (
            f"{'localhost' if self.config.host in ('0.0.0.0', '::', '[::]') else self.config.host}:{self.server.port}"
        )

    def stop(self, grace: float | None = None) -> None:
        if self.server is not None and self.thread.is_alive():
            self._call(self.server.stop(grace), timeout=60)
        self._halt()

    def _halt(self) -> None:
        if self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=10)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop(grace=0)
