"""Error translation and retry backoff of the SDK (no server)."""

from __future__ import annotations

import grpc
import pytest
from dreambooth_client import errors
from dreambooth_client.retry import Backoff, RetryPolicy, is_retryable


class FakeRpcError(grpc.RpcError):
    """What grpc raises: an RpcError that is also a Call with code() and details()."""

    def __init__(self, code: grpc.StatusCode, details: str | None) -> None:
        self._code = code
        self._details = details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str | None:
        return self._details


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, errors.InvalidArgumentError),
        (grpc.StatusCode.NOT_FOUND, errors.NotFoundError),
        (grpc.StatusCode.ALREADY_EXISTS, errors.AlreadyExistsError),
        (grpc.StatusCode.FAILED_PRECONDITION, errors.FailedPreconditionError),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, errors.ResourceExhaustedError),
        (grpc.StatusCode.UNAVAILABLE, errors.UnavailableError),
        (grpc.StatusCode.DEADLINE_EXCEEDED, errors.DeadlineExceededError),
        (grpc.StatusCode.UNAUTHENTICATED, errors.UnauthenticatedError),
        (grpc.StatusCode.PERMISSION_DENIED, errors.PermissionDeniedError),
        (grpc.StatusCode.CANCELLED, errors.CancelledError),
        (grpc.StatusCode.DATA_LOSS, errors.DataLossError),
        (grpc.StatusCode.INTERNAL, errors.InternalError),
        (grpc.StatusCode.UNIMPLEMENTED, errors.DreamBoothError),
    ],
)
def test_each_status_code_maps_to_its_exception(code: grpc.StatusCode, cls: type) -> None:
    error = errors.error_from_rpc(FakeRpcError(code, "what the server said"))
    assert type(error) is cls
    assert isinstance(error, errors.DreamBoothError)
    assert error.code is code
    assert error.message == "what the server said"
    assert str(error) == f"{code.name}: what the server said"


def test_invalid_argument_names_the_field() -> None:
    error = errors.error_from_rpc(
        FakeRpcError(grpc.StatusCode.INVALID_ARGUMENT, "spec.resolution: must be a multiple of 8")
    )
    assert isinstance(error, errors.InvalidArgumentError)
    assert error.field == "spec.resolution"
    no_field = errors.error_from_rpc(FakeRpcError(grpc.StatusCode.INVALID_ARGUMENT, "bad request, sorry"))
    assert no_field.field is None  # type: ignore[attr-defined]


def test_missing_details_still_give_a_readable_error() -> None:
    error = errors.error_from_rpc(FakeRpcError(grpc.StatusCode.INTERNAL, None))
    assert str(error) == "INTERNAL"


def test_job_failed_error_reads_as_the_job_message() -> None:
    error = errors.JobFailedError("trainingJobs/x ended FAILED: out of memory", job={"name": "x"})
    assert str(error) == "trainingJobs/x ended FAILED: out of memory"
    assert error.job == {"name": "x"}


def test_only_unavailable_is_retryable() -> None:
    assert is_retryable(FakeRpcError(grpc.StatusCode.UNAVAILABLE, ""))
    for code in (
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.INTERNAL,
    ):
        assert not is_retryable(FakeRpcError(code, ""))
    assert not is_retryable(ValueError("not an rpc error"))


def test_backoff_grows_is_capped_and_stops() -> None:
    now = [0.0]
    policy = RetryPolicy(max_attempts=6, initial_backoff=1.0, max_backoff=3.0, multiplier=2.0, max_total=100)
    backoff = Backoff(policy, clock=lambda: now[0], rng=lambda: 1.0)  # rng 1.0: the cap itself
    assert [backoff.next_delay() for _ in range(6)] == [1.0, 2.0, 3.0, 3.0, 3.0, None]
    backoff.reset()
    assert backoff.next_delay() == 1.0


def test_backoff_respects_the_total_time_budget() -> None:
    now = [0.0]
    policy = RetryPolicy(max_attempts=100, initial_backoff=1.0, max_total=5.0)
    backoff = Backoff(policy, clock=lambda: now[0], rng=lambda: 1.0)
    assert backoff.next_delay() == 1.0
    now[0] = 4.5
    assert backoff.next_delay() is None  # a 2 s sleep would end past the 5 s budget


def test_retry_policy_validates() -> None:
    with pytest.raises(ValueError):
        RetryPolicy(max_attempts=0)
    with pytest.raises(ValueError):
        RetryPolicy(initial_backoff=-1)
