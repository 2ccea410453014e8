"""Retries with capped exponential backoff and full jitter, bounded in attempts AND total time.

Full jitter (sleep uniformly in [0, backoff]) spreads the retries of many clients hit by the same
outage, so they do not come back in lock-step; the total-time bound keeps a caller from hanging
far past its own deadline when a dependency is down.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 5  # including the first try
    initial_backoff: float = 0.2  # seconds; the cap of the first sleep
    max_backoff: float = 3.0  # cap of any single sleep
    multiplier: float = 2.0
    max_total: float = 15.0  # no new attempt starts once this many seconds have passed

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        if self.initial_backoff < 0 or self.max_backoff < 0 or self.max_total < 0:
            raise ValueError("backoff and total time must be >= 0")


class Backoff:
    """The attempts of one operation. Call `next_delay()` after each failure."""

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
        self.attempts = 1  # the first attempt is running

    @property
    def elapsed(self) -> float:
        return self._clock() - self._start

    def next_delay(self) -> float | None:
        """Seconds to sleep before the next attempt, or None when the budget is spent."""
        policy = self.policy
        if self.attempts >= policy.max_attempts:
            return None
        cap = min(policy.max_backoff, policy.initial_backoff * policy.multiplier ** (self.attempts - 1))
        delay = cap * self._rng()
        if self.elapsed + delay >= policy.max_total:
            return None
        self.attempts += 1
        return delay


def call_with_retry(
    operation: Callable[[], T],
    policy: RetryPolicy,
    is_retryable: Callable[[Exception], bool],
    *,
    give_up: Callable[[Exception, Backoff], Exception] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Run `operation`, retrying the failures `is_retryable` accepts while the policy allows.

    When it stops, it raises `give_up(last_error, backoff)` (chained to the error) if given,
    else the last error itself: the caller knows what failed and where, so it words the error.
    `give_up` may return the error itself to let it through unchanged.
    """
    backoff = Backoff(policy)
    while True:
        try:
            return operation()
        except Exception as err:
            delay = backoff.next_delay() if is_retryable(err) else None
            if delay is None:
                mapped = err if give_up is None else give_up(err, backoff)
                if mapped is err:
                    raise
                raise mapped from err
            sleep(delay)
