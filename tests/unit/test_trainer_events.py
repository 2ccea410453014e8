"""Per-job event logs: sequence numbers, watching, resuming, and what survives a restart."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from pathlib import Path

import pytest

from services.common.local_store import LocalObjectStore
from services.trainer.job_spec import JobSpec
from services.trainer.jobs.events import (
    PREVIEWS_IN_MEMORY,
    SEQUENCE_BLOCK,
    EventLogs,
    Preview,
    PriorProgressInfo,
    events_key,
)
from services.trainer.jobs.records import Job, JobState, Progress

SPEC = JobSpec(base_model="tiny-sd", dataset="a" * 64, instance_prompt="a photo of sks dog")


class ManualClock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def job(state: JobState = JobState.QUEUED) -> Job:
    return Job(job_id="0123456789ab", spec=SPEC, state=state)


@pytest.fixture
def store(tmp_path: Path) -> LocalObjectStore:
    return LocalObjectStore(tmp_path / "store")


def test_events_are_numbered_from_one_and_read_after_a_sequence(store: LocalObjectStore) -> None:
    logs = EventLogs(store, persist_seconds=5.0)
    logs.state_changed(job())
    log = logs.get(job())
    log.progress(PriorProgressInfo(images_done=1, images_total=2))
    log.progress(Progress(step=1, total_steps=10, loss=0.5))
    events, closed = log.read()
    assert [e.sequence for e in events] == [1, 2, 3]
    assert [e.kind for e in events] == ["state", "prior_progress", "progress"]
    assert not closed
    assert [e.sequence for e in log.read(after=2)[0]] == [3]
    assert log.read(after=3)[0] == []


def test_a_final_state_closes_the_log(store: LocalObjectStore) -> None:
    logs = EventLogs(store)
    logs.state_changed(job())
    logs.state_changed(job(JobState.CANCELLED))
    log = logs.get(job(JobState.CANCELLED))
    assert log.final and log.read()[1]
    with pytest.raises(RuntimeError):
        log.progress(Progress(step=1))


def test_watch_replays_then_follows_live_events_until_the_end(store: LocalObjectStore) -> None:
    logs = EventLogs(store)
    logs.state_changed(job())
    log = logs.get(job())

    async def scenario() -> list[tuple[int, str]]:
        seen: list[tuple[int, str]] = []
        first = asyncio.Event()

        async def watch() -> None:
            async for event in log.watch(after=0):
                seen.append((event.sequence, event.kind))
                first.set()

        task = asyncio.create_task(watch())
        await asyncio.wait_for(first.wait(), 10)

        def produce() -> None:  # from another thread, as the training core does
            log.progress(Progress(step=1, total_steps=2))
            logs.state_changed(job(JobState.TRAINING))
            logs.state_changed(job(JobState.SUCCEEDED))

        threading.Thread(target=produce).start()
        await asyncio.wait_for(task, 10)
        return seen

    assert asyncio.run(scenario()) == [(1, "state"), (2, "progress"), (3, "state"), (4, "state")]


def test_watch_of_a_finished_job_after_its_last_event_ends_at_once(store: LocalObjectStore) -> None:
    logs = EventLogs(store)
    logs.state_changed(job())
    logs.state_changed(job(JobState.FAILED))

    async def collect(after: int) -> list[int]:
        return [event.sequence async for event in logs.get(job(JobState.FAILED)).watch(after)]

    assert asyncio.run(asyncio.wait_for(collect(1), 10)) == [2]
    assert asyncio.run(asyncio.wait_for(collect(2), 10)) == []
    assert asyncio.run(asyncio.wait_for(collect(100), 10)) == []


def test_a_restart_keeps_states_previews_and_thinned_progress(store: LocalObjectStore) -> None:
    clock = ManualClock()
    logs = EventLogs(store, persist_seconds=5.0, clock=clock)
    logs.state_changed(job())
    logs.state_changed(job(JobState.TRAINING))
    log = logs.get(job(JobState.TRAINING))
    for step in range(1, 11):
        clock.now += 1.0
        log.progress(Progress(step=step, total_steps=10))
    preview = log.preview(10, "a photo of sks dog", b"\xff\xd8jpeg")
    assert store.get_bytes(preview.payload.image_key) == b"\xff\xd8jpeg"
    live = [(e.sequence, e.kind) for e in log.read()[0]]

    restarted = EventLogs(store, persist_seconds=5.0, clock=clock).get(job(JobState.TRAINING))
    kept, closed = restarted.read()
    assert not closed
    kinds = [(e.sequence, e.kind) for e in kept]
    assert set(kinds) <= set(live)
    assert [k for k in kinds if k[1] != "progress"] == [k for k in live if k[1] != "progress"]
    progress_kept = [e.payload.step for e in kept if e.kind == "progress"]
    assert 1 <= len(progress_kept) < 10  # thinned: one per persist interval
    # The preview's bytes come back from the store when a watcher needs them.
    restored = restarted.load_preview(kept[-1])
    assert isinstance(restored.payload, Preview) and restored.payload.jpeg == b"\xff\xd8jpeg"
    # New events never reuse a number a watcher may have seen before the restart.
    new = restarted.progress(Progress(step=11, total_steps=10))
    assert new.sequence > live[-1][0]
    assert new.sequence == live[-1][0] + SEQUENCE_BLOCK + 1  # after the block recorded at the last write


def test_sequences_stay_unique_past_a_block_of_unpersisted_events(store: LocalObjectStore) -> None:
    clock = ManualClock()
    logs = EventLogs(store, persist_seconds=1e9, clock=clock)  # progress never durable by time
    logs.state_changed(job(JobState.TRAINING))
    log = logs.get(job(JobState.TRAINING))
    for step in range(SEQUENCE_BLOCK + 5):
        log.progress(Progress(step=step))
    last = log.last_sequence
    restarted = EventLogs(store, clock=clock).get(job(JobState.TRAINING))
    assert restarted.progress(Progress(step=0)).sequence > last


def test_the_record_wins_over_a_log_that_missed_the_last_state(store: LocalObjectStore) -> None:
    """A crash between writing job.json and events.jsonl: the log gets the record's state."""
    EventLogs(store).state_changed(job())
    restarted = EventLogs(store).get(job(JobState.FAILED))
    events, closed = restarted.read()
    assert [e.payload.state for e in events] == [JobState.QUEUED, JobState.FAILED]
    assert closed


def test_a_job_without_a_log_gets_one_from_its_record(store: LocalObjectStore) -> None:
    log = EventLogs(store).get(job(JobState.SUCCEEDED))
    events, closed = log.read()
    assert [e.kind for e in events] == ["state"] and closed
    assert store.exists(events_key(job().job_id))


def test_event_json_round_trip() -> None:
    from services.trainer.jobs.events import JobEvent

    for payload in (
        job(JobState.TRAINING),
        Progress(
            step=3, total_steps=9, loss=0.25, learning_rate=1e-4, eta_seconds=6.0, samples_per_second=2.0
        ),
        PriorProgressInfo(images_done=2, images_total=8),
        Preview(step=5, prompt="p", image_key="jobs/x/previews/00000001.jpg"),
    ):
        event = JobEvent(sequence=4, time=12.5, payload=payload)
        assert JobEvent.from_json(event.to_json()) == dataclasses.replace(event)


def test_only_the_newest_previews_keep_their_bytes_in_memory(store: LocalObjectStore) -> None:
    logs = EventLogs(store)
    logs.state_changed(job(JobState.TRAINING))
    log = logs.get(job(JobState.TRAINING))
    for step in range(PREVIEWS_IN_MEMORY + 3):
        log.preview(step, "sks dog", f"jpeg-{step}".encode())
    previews = [e for e in log.read()[0] if e.kind == "preview"]
    assert [e.payload.jpeg is None for e in previews] == [True] * 3 + [False] * PREVIEWS_IN_MEMORY
    assert log.load_preview(previews[0]).payload.jpeg == b"jpeg-0"

    async def first_preview() -> bytes | None:
        async for event in log.watch(after=0):
            if event.kind == "preview":
                return event.payload.jpeg
        return None

    assert asyncio.run(asyncio.wait_for(first_preview(), 10)) == b"jpeg-0"
