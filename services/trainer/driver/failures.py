"""A failed Ray Train run, told in words a user can act on: the workers' own exceptions, not
Ray's wrapping."""

from __future__ import annotations

from services.common.errors import DomainError


def describe_failure(err: BaseException) -> str:
    """A one-paragraph reason from Ray's error: the workers' own exceptions, not Ray's wrapping."""
    failures = getattr(err, "worker_failures", None)
    if failures:
        rank, cause = sorted(failures.items())[0]
        cause = _root_cause(cause)
        return (
            _advice(cause) or f"training failed on worker {rank}: {type(cause).__name__}: {_last_line(cause)}"
        )
    controller = getattr(err, "controller_failure", None)
    if controller is not None:
        return f"training failed in Ray Train's controller: {_last_line(_root_cause(controller))}"
    return f"training failed: {type(err).__name__}: {_last_line(err)}"


def _root_cause(err: BaseException) -> BaseException:
    seen = set()
    while id(err) not in seen:
        seen.add(id(err))
        inner = getattr(err, "cause", None) or err.__cause__
        if inner is None:
            break
        err = inner
    return err


def _advice(err: BaseException) -> str | None:
    text = str(err)
    if isinstance(err, DomainError):
        return text
    if "out of memory" in text.lower():
        return (
            "the GPU ran out of memory: lower train_batch_size or resolution, or turn on "
            "gradient_checkpointing, mixed_precision or use_lora"
        )
    return None


def _last_line(err: BaseException) -> str:
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__
