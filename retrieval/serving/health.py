"""The server's health service: grpc's own (`grpc_health.v1.health.aio.HealthServicer`), whose
Watch streams end, with OK, once they have sent NOT_SERVING in a graceful shutdown.

grpc's Watch streams never end by themselves: a server that stops with one open (a load balancer
or `retrieval health --watch` following it) cancels it when the grace period ends, and grpc logs
each such cancellation as an error with a traceback. A watcher learns all it can from the
NOT_SERVING the shutdown sends, so its stream ends right after it.
"""

from __future__ import annotations

from grpc_health.v1 import health, health_pb2

NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class _StreamEnded(Exception):
    """Raised through grpc's Watch loop to end it after the shutdown's NOT_SERVING is sent."""


class _EndAfterShutdown:
    """A Watch call's context whose write() ends the stream once it has sent NOT_SERVING after
    the shutdown began; every other attribute is the call's own."""

    def __init__(self, context, servicer: HealthServicer):
        self._context, self._servicer = context, servicer

    async def write(self, response: health_pb2.HealthCheckResponse) -> None:
        await self._context.write(response)
        if self._servicer.shutting_down and response.status == NOT_SERVING:
            raise _StreamEnded

    def __getattr__(self, name: str):
        return getattr(self._context, name)


class HealthServicer(health.aio.HealthServicer):
    def __init__(self) -> None:
        super().__init__()
        self.shutting_down = False

    async def Watch(self, request: health_pb2.HealthCheckRequest, context) -> None:
        try:
            await super().Watch(request, _EndAfterShutdown(context, self))
        except _StreamEnded:
            return

    async def enter_graceful_shutdown(self) -> None:
        self.shutting_down = True  # before the watchers wake up to send NOT_SERVING
        await super().enter_graceful_shutdown()
