"""The one server interceptor: domain errors -> gRPC status codes, plus request metrics.

Servicers just raise `DomainError`s (DESIGN §9); this is the only place that knows which status
code each one means. Anything else becomes INTERNAL with a generic message and a reference that
points at the logged traceback, so no internal detail reaches a client.

A streaming RPC is timed over its whole stream: the wrapper wraps the response *iterator*, not the
handler call, which returns at once (DESIGN §11). Errors raised mid-stream are mapped the same way.

Requests that are not valid protobuf frames are INVALID_ARGUMENT, not gRPC's INTERNAL/UNKNOWN: the
request deserializer is wrapped so a bad frame becomes a marker that the guard turns into an error.
Every message a client sees is bounded in length (a 20 KB name echoed into an error must not
outgrow gRPC's metadata limit) and carries no Python object reprs (heap addresses).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from types import TracebackType
from typing import Any

import grpc
import grpc.aio

from services.common import errors
from services.common.metrics import RequestMetrics

log = logging.getLogger(__name__)

# Most specific first: the first class in an error's MRO that is listed here decides its code.
STATUS_BY_ERROR: dict[type[errors.DomainError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.DataCorruption: grpc.StatusCode.DATA_LOSS,
}

# Infrastructure RPCs (probes poll them constantly) are neither counted nor wrapped.
UNINSTRUMENTED_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)


MAX_MESSAGE_CHARS = 1000  # far below gRPC's 8 KiB metadata limit, long enough for any real message
_OBJECT_REPR = re.compile(r"<[\w.]+ object at 0x[0-9a-fA-F]+>")


def client_message(text: str) -> str:
    """What a client may read of an error message: no object reprs, at most MAX_MESSAGE_CHARS."""
    text = _OBJECT_REPR.sub("the data", text)
    if len(text) > MAX_MESSAGE_CHARS:
        text = text[: MAX_MESSAGE_CHARS - 20] + f"... ({len(text)} chars)"
    return text


class _MalformedRequest:
    """What a request frame that does not parse as its message becomes (see _tolerant)."""

    def __init__(self, message_name: str) -> None:
        self.message_name = message_name

    def error(self) -> errors.InvalidArgument:
        return errors.InvalidArgument("request", f"is not a valid {self.message_name} protobuf frame")


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None
    owner = getattr(deserializer, "__self__", None)
    name = getattr(getattr(owner, "DESCRIPTOR", None), "full_name", "request")

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception:  # DecodeError, RecursionError on deep nesting, ...: all the client's fault
            return _MalformedRequest(name)

    return deserialize


async def _checked_requests(requests: Any) -> AsyncIterator[Any]:
    """A request stream that raises InvalidArgument at the first malformed frame."""
    async for request in _as_async_iterator(requests):
        if isinstance(request, _MalformedRequest):
            raise request.error()
        yield request


def _checked(request_or_iterator: Any, streaming: bool) -> Any:
    if streaming:
        return _checked_requests(request_or_iterator)
    if isinstance(request_or_iterator, _MalformedRequest):
        raise request_or_iterator.error()
    return request_or_iterator


def status_for(error: errors.DomainError) -> grpc.StatusCode:
    """The status code of a domain error; a DomainError of no listed kind is INTERNAL."""
    for cls in type(error).__mro__:
        if cls in STATUS_BY_ERROR:
            return STATUS_BY_ERROR[cls]
    return grpc.StatusCode.INTERNAL


def short_method_name(full_method: str) -> str:
    """`/dreambooth.v1.InferenceService/Generate` -> `Generate` (a bounded metric label)."""
    return full_method.rsplit("/", 1)[-1] or full_method


def _code_name(code: Any) -> str | None:
    """The name of what `ServicerContext.code()` returns (a StatusCode, an int, or None)."""
    if code is None:
        return None
    if isinstance(code, grpc.StatusCode):
        return code.name
    for status in grpc.StatusCode:
        if status.value[0] == code:
            return status.name
    return None


def _deadline_passed(context: grpc.aio.ServicerContext) -> bool:
    remaining = context.time_remaining()
    return remaining is not None and remaining <= 0


class _RpcGuard:
    """Times one RPC, tracks it in flight, records its final code and maps what it raised."""

    def __init__(self, metrics: RequestMetrics, method: str, context: grpc.aio.ServicerContext) -> None:
        self._metrics = metrics
        self._method = method
        self._context = context
        self._start = 0.0

    async def __aenter__(self) -> None:
        self._metrics.in_flight_requests.labels(method=self._method).inc()
        self._start = time.perf_counter()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        abort_with: tuple[grpc.StatusCode, str] | None = None
        try:
            if exc is None:
                code = _code_name(self._context.code()) or "OK"
            elif isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
                # The client went away, its deadline passed, or the grace ran out: nothing to send.
                code = "DEADLINE_EXCEEDED" if _deadline_passed(self._context) else "CANCELLED"
            elif isinstance(exc, grpc.aio.AbortError):
                # The servicer aborted by itself; its code is already on the context.
                code = _code_name(self._context.code()) or "UNKNOWN"
            elif isinstance(exc, errors.DomainError):
                status = status_for(exc)
                if status is grpc.StatusCode.INTERNAL:
                    abort_with = self._internal(exc_type, exc, tb)
                else:
                    abort_with = (status, client_message(str(exc)))
                    log.info(
                        "rpc failed",
                        extra={"method": self._method, "code": status.name, "error": str(exc)},
                    )
                code = abort_with[0].name
            elif isinstance(exc, Exception):
                abort_with = self._internal(exc_type, exc, tb)
                code = abort_with[0].name
            else:  # KeyboardInterrupt, SystemExit: let them through untouched
                code = "UNKNOWN"
        finally:
            self._metrics.record(self._method, code, time.perf_counter() - self._start)
            self._metrics.in_flight_requests.labels(method=self._method).dec()
        if abort_with is not None:
            await self._context.abort(*abort_with)  # raises AbortError: replaces the original error
        return False

    def _internal(
        self, exc_type: type[BaseException] | None, exc: BaseException, tb: TracebackType | None
    ) -> tuple[grpc.StatusCode, str]:
        ref = uuid.uuid4().hex[:12]
        log.error(
            "rpc failed with an unexpected error",
            exc_info=(exc_type or type(exc), exc, tb),
            extra={"method": self._method, "code": "INTERNAL", "ref": ref},
        )
        return grpc.StatusCode.INTERNAL, f"internal error; see server logs (ref {ref})"


async def _as_async_iterator(result: Any) -> AsyncIterator[Any]:
    if hasattr(result, "__aiter__"):
        async for item in result:
            yield item
    else:
        for item in result:
            yield item


class ErrorMappingMetricsInterceptor(grpc.aio.ServerInterceptor):
    """Maps DomainErrors to status codes and records request metrics, for all four RPC shapes."""

    def __init__(self, metrics: RequestMetrics) -> None:
        self._metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        full_method: str = handler_call_details.method  # type: ignore[attr-defined]
        if full_method.startswith(UNINSTRUMENTED_PREFIXES):
            return await continuation(handler_call_details)
        method = short_method_name(full_method)
        try:
            handler = await continuation(handler_call_details)
        except errors.DomainError as err:  # an inner interceptor (e.g. auth) refused the call
            return self._refusing_handler(method, err)
        if handler is None:  # unknown method: gRPC answers UNIMPLEMENTED itself
            return handler
        return self._wrap(method, handler)

    def _guard(self, method: str, context: grpc.aio.ServicerContext) -> _RpcGuard:
        return _RpcGuard(self._metrics, method, context)

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        codec = {
            "request_deserializer": _tolerant(handler.request_deserializer),
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(method, handler.unary_unary, streaming=False), **codec
            )
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                self._unary(method, handler.stream_unary, streaming=True), **codec
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._stream(method, handler.unary_stream, streaming=False), **codec
            )
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(
                self._stream(method, handler.stream_stream, streaming=True), **codec
            )
        return handler

    def _unary(
        self, method: str, behavior: Callable[..., Any], *, streaming: bool
    ) -> Callable[..., Awaitable[Any]]:
        """Unary response (the request may be a stream): time the awaited call."""

        async def guarded(request_or_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
            async with self._guard(method, context):
                return await behavior(_checked(request_or_iterator, streaming), context)

        return guarded

    def _stream(
        self, method: str, behavior: Callable[..., Any], *, streaming: bool
    ) -> Callable[..., AsyncIterator[Any]]:
        """Streamed response: time and guard the iteration, which is where the work happens."""

        async def guarded(request_or_iterator: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            async with self._guard(method, context):
                result = behavior(_checked(request_or_iterator, streaming), context)
                if inspect.isawaitable(result):  # a coroutine handler that uses context.write()
                    await result
                    return
                async for item in _as_async_iterator(result):
                    yield item

        return guarded

    def _refusing_handler(self, method: str, error: errors.DomainError) -> grpc.RpcMethodHandler:
        async def refuse(_request: Any, context: grpc.aio.ServicerContext) -> Any:
            async with self._guard(method, context):
                raise error

        return grpc.unary_unary_rpc_method_handler(refuse)
