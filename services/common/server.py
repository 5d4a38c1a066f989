"""Server bootstrap shared by every service: health, reflection, signals, graceful shutdown."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable, Iterable
from typing import TypeVar

import grpc
import uvloop
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from services.common.channels import SERVER_OPTIONS
from services.common.errors import AnswersMeshErrors
from services.common.gc_pauses import freeze_startup_heap
from services.common.internal_tls import CallerPolicy
from services.common.logging import configure_logging
from services.common.malformed import MalformedRequestInterceptor
from services.common.served_calls import ServedCalls
from services.common.settings import ServiceSettings
from services.common.shedding import LoadShedder, Metadata
from services.common.telemetry import server_interceptors, setup_tracing, shutdown_tracing

log = logging.getLogger(__name__)
ServiceSettingsT = TypeVar("ServiceSettingsT", bound=ServiceSettings)

def new_server(interceptors: Iterable[grpc.aio.ServerInterceptor] = (),
               answered: Iterable[grpc.aio.ServerInterceptor] = ()) -> grpc.aio.Server:
    """`interceptors` run before the error interceptor (they abort with errors.abort); `answered` run inside it
    (they raise MeshError, e.g. authentication)."""
    # Tracing outermost, so its span is the parent of everything the call does (when tracing is on).
    return grpc.aio.server(options=SERVER_OPTIONS, interceptors=[
        *server_interceptors(), *interceptors, AnswersMeshErrors(), *answered, MalformedRequestInterceptor()])


class ServiceHost:
    """Owns a service's grpc.aio server with grpc.health.v1 and reflection, and its Prometheus endpoint; keeps its
    health in step with its dependencies; stops gracefully on SIGTERM/SIGINT."""

    def __init__(self, name: str, settings: ServiceSettings, max_in_flight: int = 0, *, party_share: float = 1.0,
                 party_of: Callable[[Metadata], str | None] | None = None,
                 answered: Iterable[grpc.aio.ServerInterceptor] = ()) -> None:
        self.name = name
        self.shedder = LoadShedder(name, max_in_flight, party_share=party_share, party_of=party_of) \
            if max_in_flight else None
        address, tls = settings.address, settings.tls
        tls.check_listen_address(address)
        # The caller policy inside ServedCalls: refused calls are counted as PERMISSION_DENIED.
        self.server = new_server([ServedCalls(name, self.shedder), *([CallerPolicy(name)] if tls.enabled else [])],
                                 answered)
        self.health = health.aio.HealthServicer()
        self._grace_s = settings.shutdown_grace_s
        self._drain_delay_s = settings.drain_delay_s
        if settings.metrics_port:
            start_http_server(settings.metrics_port, addr=settings.host)
        self._service_names: list[str] = [health_pb2.DESCRIPTOR.services_by_name["Health"].full_name]
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.port = self.server.add_secure_port(address, tls.server_credentials()) if tls.enabled \
            else self.server.add_insecure_port(address)
        self.address = f"{address.rsplit(':', 1)[0]}:{self.port}"
        self._stop = asyncio.Event()

    @property
    def stopping(self) -> bool:
        """Asked to stop (draining): health says NOT_SERVING from here on."""
        return self._stop.is_set()

    def expose(self, service_full_names: Iterable[str]) -> None:
        self._service_names.extend(service_full_names)

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ["", *self._service_names]:
            await self.health.set(name, status)

    def serving_while(self, check: Callable[[], Awaitable[bool]],
                      interval_s: float = 1.0) -> Callable[[], Awaitable[None]]:
        """A background job for run(): SERVING while `check` says the service can do useful work. A check that
        raises counts as not serving: whatever failed, the dependency did not answer."""
        async def follow() -> None:
            serving: bool | None = None
            while True:
                try:
                    now = await check()
                except Exception as exc:  # any failure to check is a failed check
                    now = False
                    if serving is not False:
                        log.warning("health check failed", extra={"service": self.name, "error": repr(exc)})
                if now != serving:
                    log.info("serving" if now else "not serving", extra={"service": self.name})
                    serving = now
                await self.set_serving(now)
                await asyncio.sleep(interval_s)
        return follow

    async def run(self, background: Iterable[Callable[[], Awaitable[None]]] = ()) -> None:
        """Serve until SIGTERM/SIGINT, then: NOT_SERVING for the drain delay, then refuse new RPCs and let
        in-flight ones finish within the grace period."""
        reflection.enable_server_reflection([*self._service_names, reflection.SERVICE_NAME], self.server)
        await self.set_serving(False)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        await self.server.start()
        frozen = freeze_startup_heap()
        log.info("listening", extra={"address": self.address, "service": self.name, "gc_frozen_objects": frozen})
        tasks = [asyncio.create_task(job()) for job in background]
        try:
            await self._stop.wait()
        finally:
            log.info("shutting down", extra={"grace_s": self._grace_s})
            await self.health.enter_graceful_shutdown()
            await asyncio.sleep(self._drain_delay_s)
            await self.server.stop(self._grace_s)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            log.info("stopped")


def run_service(name: str, settings_factory: Callable[[], ServiceSettingsT],
                serve: Callable[[ServiceSettingsT], Awaitable[None]]) -> None:
    """A service's `main`: settings from file and environment, JSON logs, then serve until stopped."""
    settings = settings_factory()
    configure_logging(name, settings.log_level)
    setup_tracing(name)
    try:
        if settings.event_loop == "uvloop":
            uvloop.run(serve(settings))
        else:
            asyncio.run(serve(settings))
    finally:
        shutdown_tracing()
