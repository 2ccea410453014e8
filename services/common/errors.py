"""Domain errors. Cores raise these; one interceptor maps them to gRPC status codes.

Nothing here imports grpc: cores stay testable without a server.
"""

from __future__ import annotations


class DomainError(Exception):
    """Base of every error a user may see. `str(err)` is safe to show to a client."""


class InvalidArgument(DomainError):
    """A request field is wrong. Maps to INVALID_ARGUMENT and always names the field."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


class NotFound(DomainError):
    """A model, job, dataset or object does not exist. Maps to NOT_FOUND."""

    def __init__(self, what: str, message: str | None = None) -> None:
        self.what = what
        super().__init__(message or f"{what} not found")


class AlreadyExists(DomainError):
    """Maps to ALREADY_EXISTS."""


class FailedPrecondition(DomainError):
    """The resource is in the wrong state for this call. Maps to FAILED_PRECONDITION."""


class ResourceExhausted(DomainError):
    """Overloaded (queue full, limits reached). Maps to RESOURCE_EXHAUSTED."""


class Unavailable(DomainError):
    """A dependency (object store, another service) is down. Maps to UNAVAILABLE."""


class DeadlineExceeded(DomainError):
    """A client-side stream stalled past the server's idle limit. Maps to DEADLINE_EXCEEDED."""


class Unauthenticated(DomainError):
    """No or unknown credentials. Maps to UNAUTHENTICATED."""


class PermissionDenied(DomainError):
    """Credentials are valid but may not touch this resource. Maps to PERMISSION_DENIED."""


class DataCorruption(DomainError):
    """Stored bytes do not match their recorded digest. Maps to DATA_LOSS; names the file."""
