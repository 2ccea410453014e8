"""Who is calling: one interceptor authenticates every RPC except health and reflection.

- `authorization: Bearer <key>` (or `x-api-key: <key>`, deprecated, accepted for one release)
  -> the key's tenant, from the keys file (services/common/api_keys.py);
- no key, but an mTLS client certificate whose common name a tenant lists in `certificate_names`
  -> that tenant (service identities: the trainer calling priorgen);
- no keys file at all: every caller is the implicit tenant (the zero-config default; with mTLS,
  the transport has already refused anyone without a certificate signed by the client CA).

No key, or a key that is unknown, malformed or revoked, is UNAUTHENTICATED with one message
(which of those it was is not revealed). The servicer reads the resolved tenant with `caller()`.

Before serving, `open_authenticator` refuses to run open: a service bound to a non-loopback
address needs a keys file or mTLS, unless DREAMBOOTH_ALLOW_UNAUTHENTICATED=true says otherwise.
"""

from __future__ import annotations

import contextvars
import inspect
import ipaddress
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from services.common.errors import Unauthenticated
from services.common.key_ring import KeyRing
from services.common.settings import AuthSettings, ConfigError, ServerSettings
from services.common.tenancy import IMPLICIT_TENANT, Tenant

log = logging.getLogger(__name__)

AUTHORIZATION = "authorization"
LEGACY_API_KEY = "x-api-key"  # deprecated: clients send `authorization: Bearer <key>`
OPEN_PREFIXES = (  # probes and tools call these without credentials
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)
MISSING = "missing credentials: send the header 'authorization: Bearer <API key>'"
INVALID = "invalid API key"

_CALLER: contextvars.ContextVar[Tenant | None] = contextvars.ContextVar("dreambooth_caller", default=None)


def caller() -> Tenant:
    """The tenant of the RPC being served (set by AuthInterceptor for this RPC's task)."""
    tenant = _CALLER.get()
    if tenant is None:  # fail closed: never serve as anyone by default
        raise RuntimeError("no authenticated caller: the server has no AuthInterceptor")
    return tenant


class Authenticator:
    """Maps an RPC's metadata and client certificate to a tenant."""

    def __init__(self, keys: KeyRing | None = None) -> None:
        self.keys = keys
        self._warned_legacy: set[str] = set()

    @property
    def enabled(self) -> bool:
        return self.keys is not None

    def tenant_names(self) -> list[str]:
        """Every tenant the keys file names (with quotas or keys); none without a keys file."""
        if self.keys is None:
            return []
        keys = self.keys.current()
        return sorted({*keys.tenants, *(entry.tenant for entry in keys.keys.values())})

    def authenticate(
        self, metadata: Iterable[tuple[str, Any]], certificate_names: Iterable[str] = ()
    ) -> Tenant:
        if self.keys is None:
            return IMPLICIT_TENANT
        token, legacy = _token(metadata)
        keys = self.keys.current()
        if token is not None:
            tenant = keys.verify(token)
            if tenant is None:
                raise Unauthenticated(INVALID)
            if legacy:
                self._warn_legacy(tenant)
            return tenant
        for name in certificate_names:
            tenant = keys.by_certificate(name)
            if tenant is not None:
                return tenant
        raise Unauthenticated(MISSING)

    def _warn_legacy(self, tenant: Tenant) -> None:
        if tenant.name not in self._warned_legacy:
            self._warned_legacy.add(tenant.name)
            log.warning(
                "x-api-key is deprecated; send 'authorization: Bearer <key>'", extra={"tenant": tenant.label}
            )


def _token(metadata: Iterable[tuple[str, Any]]) -> tuple[str | None, bool]:
    """(the key, whether it came in the deprecated header); (None, False) when there is none."""
    legacy = None
    for name, value in metadata:
        text = value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)
        if name == AUTHORIZATION:
            scheme, _, token = text.strip().partition(" ")
            return (token.strip() if scheme.lower() == "bearer" else ""), False
        if name == LEGACY_API_KEY:
            legacy = text.strip()
    return (legacy, True) if legacy is not None else (None, False)


def certificate_names(context: grpc.aio.ServicerContext) -> list[str]:
    """Common names of the peer's verified client certificate (empty without mTLS)."""
    values = context.auth_context().get("x509_common_name", [])
    return [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in values]


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates before the servicer runs (client streams too: before their first message)."""

    def __init__(self, authenticator: Authenticator) -> None:
        self._authenticator = authenticator

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method  # type: ignore[attr-defined]
        if handler is None or method.startswith(OPEN_PREFIXES):
            return handler
        return _authenticated(handler, self._resolve)

    def _resolve(self, context: grpc.aio.ServicerContext) -> None:
        tenant = self._authenticator.authenticate(
            context.invocation_metadata() or (), certificate_names(context)
        )
        _CALLER.set(tenant)  # this RPC's task has its own context: no reset needed


def _authenticated(
    handler: grpc.RpcMethodHandler, resolve: Callable[[grpc.aio.ServicerContext], None]
) -> grpc.RpcMethodHandler:
    codec = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }

    def unary(behavior: Callable[..., Any]) -> Callable[..., Awaitable[Any]]:
        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            resolve(context)
            return await behavior(request, context)

        return call

    def stream(behavior: Callable[..., Any]) -> Callable[..., AsyncIterator[Any]]:
        async def call(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            resolve(context)
            result = behavior(request, context)
            if inspect.isawaitable(result):  # a coroutine handler that uses context.write()
                await result
                return
            if hasattr(result, "__aiter__"):
                async for item in result:
                    yield item
            else:
                for item in result:
                    yield item

        return call

    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(unary(handler.unary_unary), **codec)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(unary(handler.stream_unary), **codec)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(stream(handler.unary_stream), **codec)
    if handler.stream_stream is not None:
        return grpc.stream_stream_rpc_method_handler(stream(handler.stream_stream), **codec)
    return handler


# ---- start-up -----------------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    host = host.strip().strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name (or "" = every interface): not provably loopback
        return False


def open_authenticator(service: str, auth: AuthSettings, server: ServerSettings) -> Authenticator:
    """The service's authenticator, or ConfigError (one line) when it must not start.

    A keys file that cannot be read or parsed stops the service here, naming the line and field.
    """
    keys = KeyRing(Path(auth.api_keys_file)) if auth.api_keys_file else None
    if keys is None and not server.tls_client_ca_file and not is_loopback(server.host):
        if not auth.allow_unauthenticated:
            raise ConfigError(
                f"refusing to serve {server.host} without authentication: set "
                "DREAMBOOTH_API_KEYS_FILE (or a client CA for mTLS), or "
                "DREAMBOOTH_ALLOW_UNAUTHENTICATED=true to let anyone who can reach the port in"
            )
        log.warning(
            "serving without authentication: anyone who can reach the port may use every resource",
            extra={"service": service, "host": server.host, "reason": "DREAMBOOTH_ALLOW_UNAUTHENTICATED"},
        )
    return Authenticator(keys)
