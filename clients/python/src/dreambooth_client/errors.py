"""The SDK's exceptions: one class per gRPC status code a caller may want to tell apart.

Every exception carries the status `code` and the server's `message` (which names the offending
field for INVALID_ARGUMENT), so callers catch `NotFoundError` instead of inspecting a
`grpc.RpcError`, and the CLI prints one clear line.
"""

from __future__ import annotations

import re

import grpc

# "spec.max_train_steps: must be > 0" -> field "spec.max_train_steps" (the servers' InvalidArgument form).
_FIELD_PREFIX = re.compile(r"^(?P<field>[A-Za-z_][\w.\[\]]*): ")


class DreamBoothError(Exception):
    """A call failed. `code` is the gRPC status code, `message` the server's words."""

    default_code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        self.code = code or self.default_code
        self.message = message
        super().__init__(f"{self.code.name}: {message}" if message else self.code.name)


class InvalidArgumentError(DreamBoothError):
    """The request was wrong; `field` names the offending proto field when the server said so."""

    default_code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message, code)
        match = _FIELD_PREFIX.match(message)
        self.field: str | None = match.group("field") if match else None


class NotFoundError(DreamBoothError):
    default_code = grpc.StatusCode.NOT_FOUND


class AlreadyExistsError(DreamBoothError):
    default_code = grpc.StatusCode.ALREADY_EXISTS


class FailedPreconditionError(DreamBoothError):
    default_code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhaustedError(DreamBoothError):
    """The server is at capacity (queue full, limits reached): try again later."""

    default_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class UnavailableError(DreamBoothError):
    """The server (or a store behind it) could not be reached, even after retries."""

    default_code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceededError(DreamBoothError):
    default_code = grpc.StatusCode.DEADLINE_EXCEEDED


class UnauthenticatedError(DreamBoothError):
    default_code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDeniedError(DreamBoothError):
    default_code = grpc.StatusCode.PERMISSION_DENIED


class CancelledError(DreamBoothError):
    default_code = grpc.StatusCode.CANCELLED


class DataLossError(DreamBoothError):
    """Stored bytes did not match their digest on the server."""

    default_code = grpc.StatusCode.DATA_LOSS


class InternalError(DreamBoothError):
    default_code = grpc.StatusCode.INTERNAL


class JobFailedError(DreamBoothError):
    """`wait()` saw the job end FAILED or CANCELLED; `job` is its final record."""

    default_code = grpc.StatusCode.ABORTED

    def __init__(self, message: str, job: object) -> None:
        super().__init__(message)
        self.job = job

    def __str__(self) -> str:  # not an RPC status: the job's own words read best
        return self.message


ERROR_BY_CODE: dict[grpc.StatusCode, type[DreamBoothError]] = {
    cls.default_code: cls
    for cls in (
        InvalidArgumentError,
        NotFoundError,
        AlreadyExistsError,
        FailedPreconditionError,
        ResourceExhaustedError,
        UnavailableError,
        DeadlineExceededError,
        UnauthenticatedError,
        PermissionDeniedError,
        CancelledError,
        DataLossError,
        InternalError,
    )
}


def error_from_code(code: grpc.StatusCode, message: str) -> DreamBoothError:
    """The SDK exception for a status code (DreamBoothError itself for codes with no class)."""
    return ERROR_BY_CODE.get(code, DreamBoothError)(message, code)


def error_from_rpc(error: grpc.RpcError) -> DreamBoothError:
    """Translate a `grpc.RpcError` (sync or aio) into the SDK's exception for its code."""
    code_fn = getattr(error, "code", None)
    details_fn = getattr(error, "details", None)
    code = code_fn() if callable(code_fn) else None
    message = details_fn() if callable(details_fn) else None
    if not isinstance(code, grpc.StatusCode):
        code = grpc.StatusCode.UNKNOWN
    return error_from_code(code, message or "")
