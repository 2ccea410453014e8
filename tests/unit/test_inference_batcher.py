"""Dynamic batching: which waiting requests run together, and what happens to the others."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from types import SimpleNamespace

import pytest

from services.common.errors import Unavailable
from services.inference.batcher import Batcher
from services.inference.job import Job
from services.inference.params import GenerateParams

DEADLINE_S = 30.0


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


class Recorder:
    """A run_batch that records each batch as the prompts of its jobs."""

    def __init__(self, expected_batches: int, fail_first: bool = False) -> None:
        self.batches: list[list[str]] = []
        self._expected = expected_batches
        self._fail_first = fail_first
        self._done = threading.Event()
        self._lock = threading.Lock()

    def __call__(self, jobs: list[Job]) -> None:
        with self._lock:
            self.batches.append([job.params.prompt for job in jobs])
            if len(self.batches) >= self._expected:
                self._done.set()
            failing = self._fail_first and len(self.batches) == 1
        if failing:
            raise RuntimeError("boom")

    def wait(self) -> list[list[str]]:
        assert self._done.wait(DEADLINE_S), f"only {self.batches} ran"
        return self.batches


def make_job(
    loop: asyncio.AbstractEventLoop, prompt: str, images: int = 1, model: str = "a", steps: int = 4
) -> Job:
    params = GenerateParams(model, prompt, num_images=images, width=64, height=64, steps=steps, seed=1)
    return Job(params, SimpleNamespace(digest=model), loop)  # type: ignore[arg-type]


def outcome(loop: asyncio.AbstractEventLoop, job: Job) -> BaseException | None:
    async def drain() -> BaseException | None:
        try:
            async for _ in job.events():
                pass
        except BaseException as err:
            return err
        return None

    return loop.run_until_complete(asyncio.wait_for(drain(), DEADLINE_S))


def run(batcher: Batcher, jobs: list[Job]) -> None:
    """Queue everything first, then start: the workers see all of it at once."""
    for job in jobs:
        batcher.submit(job)
    batcher.start()


def test_requests_with_the_same_key_share_a_batch(loop: asyncio.AbstractEventLoop) -> None:
    recorder = Recorder(expected_batches=2)
    batcher = Batcher(recorder, max_batch=8, max_wait_s=0)
    jobs = [make_job(loop, "a1"), make_job(loop, "b1", model="b"), make_job(loop, "a2", images=3)]
    run(batcher, jobs)
    assert recorder.wait() == [["a1", "a2"], ["b1"]]  # the oldest request's key goes first
    batcher.stop()
    assert [outcome(loop, job) for job in jobs] == [None, None, None]


def test_requests_differing_in_steps_do_not_share(loop: asyncio.AbstractEventLoop) -> None:
    recorder = Recorder(expected_batches=2)
    batcher = Batcher(recorder, max_batch=8, max_wait_s=0)
    run(batcher, [make_job(loop, "x", steps=4), make_job(loop, "y", steps=5)])
    assert recorder.wait() == [["x"], ["y"]]
    batcher.stop()


def test_max_batch_counts_images_and_later_small_requests_fill_the_gap(
    loop: asyncio.AbstractEventLoop,
) -> None:
    recorder = Recorder(expected_batches=2)
    batcher = Batcher(recorder, max_batch=8, max_wait_s=0)
    run(batcher, [make_job(loop, name, images=n) for name, n in [("p", 3), ("q", 3), ("r", 3), ("s", 2)]])
    assert recorder.wait() == [["p", "q", "s"], ["r"]]
    batcher.stop()


def test_a_request_larger_than_max_batch_runs_alone(loop: asyncio.AbstractEventLoop) -> None:
    recorder = Recorder(expected_batches=2)
    batcher = Batcher(recorder, max_batch=4, max_wait_s=0)
    run(batcher, [make_job(loop, "big", images=6), make_job(loop, "small")])
    assert recorder.wait() == [["big"], ["small"]]
    batcher.stop()


def test_an_idle_worker_waits_for_companions_until_the_batch_is_full(loop: asyncio.AbstractEventLoop) -> None:
    recorder = Recorder(expected_batches=1)
    batcher = Batcher(recorder, max_batch=4, max_wait_s=DEADLINE_S * 10)
    batcher.start()
    batcher.submit(make_job(loop, "first"))
    batcher.submit(make_job(loop, "second", images=3))  # fills the batch: it runs at once
    assert recorder.wait() == [["first", "second"]]
    batcher.stop()


def test_cancelled_waiting_requests_never_run(loop: asyncio.AbstractEventLoop) -> None:
    recorder = Recorder(expected_batches=1)
    batcher = Batcher(recorder, max_batch=8, max_wait_s=0)
    gone, kept = make_job(loop, "gone"), make_job(loop, "kept")
    gone.cancel()
    run(batcher, [gone, kept])
    assert recorder.wait() == [["kept"]]
    batcher.stop()
    assert not gone.started and kept.started


def test_a_failed_batch_fails_its_requests_and_the_worker_goes_on(loop: asyncio.AbstractEventLoop) -> None:
    recorder = Recorder(expected_batches=2, fail_first=True)
    batcher = Batcher(recorder, max_batch=8, max_wait_s=0)
    first, second = make_job(loop, "first", model="a"), make_job(loop, "second", model="b")
    run(batcher, [first, second])
    assert recorder.wait() == [["first"], ["second"]]
    batcher.stop()
    assert isinstance(outcome(loop, first), RuntimeError)
    assert outcome(loop, second) is None


def test_stop_fails_waiting_requests_and_refuses_new_ones(loop: asyncio.AbstractEventLoop) -> None:
    batcher = Batcher(Recorder(expected_batches=1), max_batch=8, max_wait_s=0)
    waiting = make_job(loop, "waiting")
    batcher.submit(waiting)  # never started: no worker runs
    batcher.stop()
    assert isinstance(outcome(loop, waiting), Unavailable)
    with pytest.raises(Unavailable):
        batcher.submit(make_job(loop, "late"))
