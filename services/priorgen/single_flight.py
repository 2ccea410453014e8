"""Single flight: concurrent calls for the same key share one execution and its progress."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Generic, TypeVar

R = TypeVar("R")
ProgressFn = Callable[[int, int], None]

log = logging.getLogger(__name__)


@dataclass
class Flight(Generic[R]):
    """One execution: its result future, its listeners and its latest progress."""

    future: Future[R] = field(default_factory=Future)
    listeners: list[ProgressFn] = field(default_factory=list)
    progress: tuple[int, int] | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    waiting: int = 0  # callers attached and not yet released
    abandoned: threading.Event = field(default_factory=threading.Event)  # the last one left early

    def attach(self, listener: ProgressFn | None) -> Callable[[], None]:
        """One more caller waits for this flight; the returned function releases it. When the last
        caller is released before the flight ends (they all cancelled), `abandoned` is set: the
        work stops at its next step instead of rendering a set nobody waits for."""
        with self.lock:
            self.waiting += 1
        unsubscribe = self.subscribe(listener) if listener is not None else (lambda: None)
        released = threading.Event()

        def release() -> None:
            if released.is_set():
                return
            released.set()
            unsubscribe()
            with self.lock:
                self.waiting -= 1
                if self.waiting == 0 and not self.future.done():
                    self.abandoned.set()

        return release

    def subscribe(self, listener: ProgressFn) -> Callable[[], None]:
        with self.lock:
            self.listeners.append(listener)
            progress = self.progress
        if progress is not None:  # a late joiner learns where the flight stands at once
            _notify(listener, *progress)

        def unsubscribe() -> None:
            with self.lock:
                if listener in self.listeners:
                    self.listeners.remove(listener)

        return unsubscribe

    def publish(self, done: int, total: int) -> None:
        with self.lock:
            self.progress = (done, total)
            listeners = list(self.listeners)
        for listener in listeners:
            _notify(listener, done, total)


def _notify(listener: ProgressFn, done: int, total: int) -> None:
    try:
        listener(done, total)
    except Exception:  # a caller that went away must not break the flight for the others
        log.exception("progress listener failed")


class SingleFlight(Generic[R]):
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._flights: dict[str, Flight[R]] = {}

    def join(self, key: str) -> tuple[Flight[R], bool]:
        """The flight for `key` and whether the caller leads it (and must then `run` it)."""
        with self._lock:
            flight = self._flights.get(key)
            if flight is not None:
                return flight, False
            flight = self._flights[key] = Flight()
            return flight, True

    def run(self, key: str, flight: Flight[R], work: Callable[[ProgressFn], R]) -> None:
        """Execute `work` for the leader; the flight ends (and is forgotten) when it returns."""
        try:
            result = work(flight.publish)
        except BaseException as err:
            self._finish(key)
            flight.future.set_exception(err)
        else:
            self._finish(key)
            flight.future.set_result(result)

    def _finish(self, key: str) -> None:
        # Forgotten before the result is published: a call arriving after this starts a new
        # flight, which sees the finished set in the store.
        with self._lock:
            self._flights.pop(key, None)

    def in_flight(self) -> int:
        with self._lock:
            return len(self._flights)
