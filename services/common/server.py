"""The one way every service starts its gRPC aio server.

    app = GrpcServerApp("inference", settings.server, auth=open_authenticator(...))
    app.add_service(inference_pb2_grpc.add_InferenceServiceServicer_to_server, servicer,
                    "dreambooth.v1.InferenceService")
    await app.start()                # health NOT_SERVING, reflection, interceptor, metrics HTTP
    await app.set_serving(True)      # once the service is ready (models loaded, store reachable)
    await app.run_until_signal()     # SIGTERM/SIGINT -> NOT_SERVING -> stop with grace

Health and shutdown follow the grpc examples (health_checking, async_greeter_server_with_graceful_
shutdown): readiness is the health status, and on SIGTERM the health flips to NOT_SERVING before
the server stops accepting RPCs and gives in-flight ones `grace_seconds` to finish.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIServer

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry, start_http_server

from services.common.auth import Authenticator, AuthInterceptor
from services.common.interceptors import ErrorMappingMetricsInterceptor
from services.common.metrics import MetricFactory, RequestMetrics, metric_namespace
from services.common.reflection_v1 import enable_reflection
from services.common.settings import ServerSettings

log = logging.getLogger(__name__)

AddServicerFn = Callable[[Any, grpc.aio.Server], None]

_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class GrpcServerApp:
    """A grpc.aio server with health, reflection, the error/metrics interceptor and metrics HTTP.

    Every RPC but health and reflection is authenticated by `auth` (services/common/auth.py;
    None = no keys file: the one implicit tenant). The auth interceptor and `interceptors` run
    inside the error/metrics interceptor, so a DomainError they raise (Unauthenticated) is mapped
    and counted like any other.
    """

    def __init__(
        self,
        service_name: str,
        settings: ServerSettings,
        *,
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
        auth: Authenticator | None = None,
    ) -> None:
        self.service_name = service_name
        self.settings = settings
        self.registry = CollectorRegistry()
        self.metrics_namespace = metric_namespace(service_name)
        self.metrics = MetricFactory(self.registry, self.metrics_namespace)
        self.request_metrics = RequestMetrics.create(self.registry, self.metrics_namespace)
        self.auth = auth or Authenticator()
        self._extra_interceptors = (AuthInterceptor(self.auth), *interceptors)
        self._services: list[tuple[AddServicerFn, Any, str]] = []
        self._server: grpc.aio.Server | None = None
        self._health: health.aio.HealthServicer | None = None
        self._port: int | None = None
        self._metrics_httpd: WSGIServer | None = None
        self._metrics_thread: threading.Thread | None = None
        self._stop_task: asyncio.Task[None] | None = None
        self._stopped: asyncio.Event | None = None

    # ---- set-up -------------------------------------------------------------------------------

    def add_service(self, add_fn: AddServicerFn, servicer: Any, full_name: str) -> None:
        """Register a servicer before start().

        e.g. (add_InferenceServiceServicer_to_server, servicer, "dreambooth.v1.InferenceService").
        """
        if self._server is not None:
            raise RuntimeError("add_service() must be called before start()")
        self._services.append((add_fn, servicer, full_name))

    @property
    def service_names(self) -> list[str]:
        return [full_name for _, _, full_name in self._services]

    async def start(self) -> None:
        """Bind, start serving (health NOT_SERVING until set_serving(True)) and expose metrics."""
        if self._server is not None:
            raise RuntimeError(f"{self.service_name} server already started")
        tls = self._tls_enabled  # a half-configured TLS fails here, before anything listens
        self._stopped = asyncio.Event()
        self._start_metrics_http()
        try:
            await self._start_grpc()
        except BaseException:
            self._stop_metrics_http()
            raise
        log.info(
            "server started",
            extra={
                "service": self.service_name,
                "address": f"{self.settings.host}:{self._port}",
                "tls": tls,
                "mtls": tls and bool(self.settings.tls_client_ca_file),
                "api_keys": self.auth.enabled,
                "metrics_address": f"{self.settings.metrics_host}:{self.metrics_port}",
            },
        )

    async def _start_grpc(self) -> None:
        max_bytes = self.settings.max_message_bytes
        server = grpc.aio.server(
            interceptors=[ErrorMappingMetricsInterceptor(self.request_metrics), *self._extra_interceptors],
            options=[
                ("grpc.max_send_message_length", max_bytes),
                ("grpc.max_receive_message_length", max_bytes),
                # Without this a second server could silently share a fixed port with the first.
                ("grpc.so_reuseport", 0),
            ],
        )
        for add_fn, servicer, _ in self._services:
            add_fn(servicer, server)

        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        for name in ("", *self.service_names):
            await health_servicer.set(name, _NOT_SERVING)
        enable_reflection((*self.service_names, health.SERVICE_NAME), server)

        address = _join_host_port(self.settings.host, self.settings.port)
        try:
            if self._tls_enabled:
                port = server.add_secure_port(address, self._server_credentials())
            else:
                port = server.add_insecure_port(address)
        except RuntimeError as err:  # grpc raises RuntimeError("Failed to bind ...")
            raise OSError(f"{self.service_name}: cannot listen on {address}: {err}") from err
        if port == 0:
            raise OSError(f"{self.service_name}: cannot listen on {address}")
        await server.start()
        self._server, self._health, self._port = server, health_servicer, port

    @property
    def _tls_enabled(self) -> bool:
        cert, key = self.settings.tls_cert_file, self.settings.tls_key_file
        if bool(cert) != bool(key):
            raise ValueError("TLS needs both tls_cert_file and tls_key_file (or neither)")
        if self.settings.tls_client_ca_file and not cert:
            raise ValueError("tls_client_ca_file (mTLS) needs TLS: set tls_cert_file and tls_key_file")
        return bool(cert)

    def _server_credentials(self) -> grpc.ServerCredentials:
        key = Path(self.settings.tls_key_file).read_bytes()
        cert = Path(self.settings.tls_cert_file).read_bytes()
        if not self.settings.tls_client_ca_file:
            return grpc.ssl_server_credentials([(key, cert)])
        client_ca = Path(self.settings.tls_client_ca_file).read_bytes()
        return grpc.ssl_server_credentials(
            [(key, cert)], root_certificates=client_ca, require_client_auth=True
        )

    def _start_metrics_http(self) -> None:
        httpd, thread = start_http_server(
            self.settings.metrics_port, self.settings.metrics_host, registry=self.registry
        )
        self._metrics_httpd, self._metrics_thread = httpd, thread

    def _stop_metrics_http(self) -> None:
        httpd, thread = self._metrics_httpd, self._metrics_thread
        self._metrics_httpd = self._metrics_thread = None
        if httpd is not None:
            httpd.shutdown()  # waits for serve_forever() to return
            httpd.server_close()
        if thread is not None:
            thread.join(timeout=5)

    # ---- state --------------------------------------------------------------------------------

    @property
    def started(self) -> bool:
        return self._server is not None

    @property
    def port(self) -> int:
        """The bound gRPC port (the real one when settings say 0)."""
        if self._port is None:
            raise RuntimeError("server not started")
        return self._port

    @property
    def metrics_port(self) -> int:
        """The bound metrics HTTP port (the real one when settings say 0)."""
        if self._metrics_httpd is None:
            raise RuntimeError("metrics server not running")
        return int(self._metrics_httpd.server_port)

    @property
    def address(self) -> str:
        """`host:port` a client on this machine can dial."""
        return _join_host_port(self.settings.host, self.port)

    async def set_serving(self, serving: bool) -> None:
        """Report readiness through the health service, for "" and every added service."""
        if self._health is None:
            raise RuntimeError("server not started")
        status = _SERVING if serving else _NOT_SERVING
        for name in ("", *self.service_names):
            await self._health.set(name, status)  # ignored once shutdown has begun

    # ---- shutdown -----------------------------------------------------------------------------

    async def stop(self, grace: float | None = None) -> None:
        """NOT_SERVING, then refuse new RPCs and give in-flight ones `grace` seconds. Idempotent."""
        if self._server is None:
            self._stop_metrics_http()
            return
        if self._stop_task is None:
            grace_s = self.settings.grace_seconds if grace is None else grace
            self._stop_task = asyncio.ensure_future(self._stop(grace_s))
        await asyncio.shield(self._stop_task)

    async def _stop(self, grace: float) -> None:
        assert self._server is not None and self._health is not None
        log.info("server stopping", extra={"service": self.service_name, "grace_seconds": grace})
        await self._health.enter_graceful_shutdown()
        await self._server.stop(grace)
        await asyncio.to_thread(self._stop_metrics_http)
        if self._stopped is not None:
            self._stopped.set()
        log.info("server stopped", extra={"service": self.service_name})

    async def run_until_signal(self) -> None:
        """Serve until SIGTERM/SIGINT (or stop() from elsewhere), then stop gracefully.

        Starts the server first if start() was not called (health stays NOT_SERVING until
        set_serving(True)).
        """
        if self._server is None:
            await self.start()
        assert self._stopped is not None
        loop = asyncio.get_running_loop()
        signalled = asyncio.Event()
        installed: list[signal.Signals] = []
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, _on_signal, sig, signalled, self.service_name)
                installed.append(sig)
            except (NotImplementedError, RuntimeError, ValueError):  # not the main thread / platform
                log.warning("cannot handle signal", extra={"signal": sig.name})
        try:
            waits = [asyncio.ensure_future(signalled.wait()), asyncio.ensure_future(self._stopped.wait())]
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiter in waits:
                    waiter.cancel()
            await self.stop()
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)


def _on_signal(sig: signal.Signals, signalled: asyncio.Event, service_name: str) -> None:
    log.info("signal received", extra={"service": service_name, "signal": sig.name})
    signalled.set()


def _join_host_port(host: str, port: int) -> str:
    if ":" in host and not host.startswith("["):  # bare IPv6 literal
        return f"[{host}]:{port}"
    return f"{host}:{port}"
