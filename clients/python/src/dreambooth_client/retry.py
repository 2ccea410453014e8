"""When and how long to wait before retrying a call that failed with UNAVAILABLE.

Only idempotent calls are retried (the SDK decides which): reads, cancels, content-addressed
uploads, and creates that carry a `request_id`. The backoff is capped exponential with full
jitter, bounded in attempts and in total time, so a client never hangs long on a dead server and
many clients hit by one outage do not come back in lock-step.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc

RETRYABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE})


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 5  # including the first try; 1 turns retries off
    initial_backoff: float = 0.2  # seconds; cap of the first sleep
    max_backoff: float = 5.0  # cap of any single sleep
    multiplier: float = 2.0
    max_total: float = 30.0  # no new attempt starts once this many seconds have passed

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        if min(self.initial_backoff, self.max_backoff, self.max_total) < 0 or self.multiplier < 1:
            raise ValueError("backoffs and max_total must be >= 0, multiplier >= 1")


NO_RETRY = RetryPolicy(max_attempts=1)


class Backoff:
    """The attempts of one operation: call `next_delay()` after each retryable failure."""

    def __init__(
        self,
        policy: RetryPolicy,
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.policy = policy
        self._clock = clock
        self._rng = rng
        self._start = clock()
        self.attempts = 1

    def reset(self) -> None:
        """Progress was made (e.g. a stream delivered events): the next outage gets a full budget."""
        self._start = self._clock()
        self.attempts = 1

    def next_delay(self) -> float | None:
        """Seconds to sleep before the next attempt, or None when the budget is spent."""
        policy = self.policy
        if self.attempts >= policy.max_attempts:
            return None
        cap = min(policy.max_backoff, policy.initial_backoff * policy.multiplier ** (self.attempts - 1))
        delay = cap * self._rng()
        if self._clock() - self._start + delay >= policy.max_total:
            return None
        self.attempts += 1
        return delay


def is_retryable(error: BaseException) -> bool:
    """True for a gRPC failure worth retrying on an idempotent call."""
    code = getattr(error, "code", None)
    return isinstance(error, grpc.RpcError) and callable(code) and code() in RETRYABLE_CODES
