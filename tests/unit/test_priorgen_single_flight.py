"""Single flight: one execution per key, shared progress and result (or error)."""

from __future__ import annotations

import threading

import pytest

from services.priorgen.single_flight import SingleFlight


def test_followers_share_the_leaders_progress_and_result() -> None:
    flights: SingleFlight[str] = SingleFlight()
    flight, leader = flights.join("k")
    same, follower_leads = flights.join("k")
    assert leader and not follower_leads and same is flight
    seen: dict[str, list[tuple[int, int]]] = {"a": [], "b": []}
    flight.subscribe(lambda d, t: seen["a"].append((d, t)))

    def work(report):  # type: ignore[no-untyped-def]
        report(1, 2)
        flight.subscribe(lambda d, t: seen["b"].append((d, t)))  # a late joiner gets the latest at once
        report(2, 2)
        return "done"

    flights.run("k", flight, work)
    assert flight.future.result() == "done"
    assert seen == {"a": [(1, 2), (2, 2)], "b": [(1, 2), (2, 2)]}
    assert flights.in_flight() == 0
    assert flights.join("k")[1]  # a finished flight is forgotten: the next call leads a new one


def test_an_error_reaches_every_caller_and_the_key_can_be_retried() -> None:
    flights: SingleFlight[str] = SingleFlight()
    flight, _ = flights.join("k")

    def fail(report):  # type: ignore[no-untyped-def]
        raise RuntimeError("boom")

    flights.run("k", flight, fail)
    with pytest.raises(RuntimeError, match="boom"):
        flight.future.result()
    assert flights.join("k")[1]


def test_a_failing_listener_does_not_break_the_flight() -> None:
    flights: SingleFlight[int] = SingleFlight()
    flight, _ = flights.join("k")
    flight.subscribe(lambda d, t: 1 / 0)
    calls: list[int] = []
    unsubscribe = flight.subscribe(lambda d, t: calls.append(d))
    flight.publish(1, 3)
    unsubscribe()
    flight.publish(2, 3)
    done = threading.Event()
    flights.run("k", flight, lambda report: done.set() or 3)
    assert flight.future.result() == 3 and calls == [1]
