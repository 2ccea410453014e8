"""Per-job event logs for WatchTrainingJob: numbered events in memory, the useful part in the store.

Every event gets the next sequence number of its job (from 1). Watchers read what they missed
(`after_sequence`) and then wait for more; the stream ends once the job is final.

What survives a restart (`jobs/{id}/events.jsonl` in the job's tenant's view of the store,
rewritten atomically):
- every state change (with the whole job), every validation preview (its JPEG is a separate
  object, `jobs/{id}/previews/step-{step:08d}-{n:04d}.jpg`, read back when a watcher needs it);
- training and prior progress thinned to one event per `persist_seconds` (plus the newest
  `MAX_PERSISTED_PROGRESS` of those), so the file stays small on long jobs.
The other progress events live in memory only. So that a watcher who saw one of them never misses
what comes after a restart, sequence numbers are handed out in blocks: the file records the end
of the current block (`next_sequence`) and is rewritten before the block runs out; a restarted
trainer continues after the recorded block, leaving a gap rather than reusing a number.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

from services.common.errors import NotFound
from services.common.namespaced_store import scoped_store
from services.common.object_store import ObjectStore
from services.trainer.jobs.records import Job, Progress

log = logging.getLogger(__name__)

SEQUENCE_BLOCK = 1000
MAX_PERSISTED_PROGRESS = 1000
MAX_CACHED_FINISHED_LOGS = 64
PREVIEWS_IN_MEMORY = 16


@dataclass(frozen=True)
class PriorProgressInfo:
    images_done: int
    images_total: int


@dataclass(frozen=True)
class Preview:
    step: int
    prompt: str
    image_key: str  # where the JPEG is kept in the store
    jpeg: bytes | None = None  # None when only in the store (after a restart)


Payload = Job | Progress | PriorProgressInfo | Preview


@dataclass(frozen=True)
class JobEvent:
    sequence: int
    time: float  # seconds since the epoch
    payload: Payload
    durable: bool = True  # kept in events.jsonl

    @property
    def kind(self) -> str:
        return _KINDS[type(self.payload)]

    def to_json(self) -> dict[str, object]:
        payload = self.payload.to_json() if isinstance(self.payload, Job) else asdict(self.payload)
        if isinstance(self.payload, Preview):
            payload.pop("jpeg")
        return {"sequence": self.sequence, "time": self.time, "kind": self.kind, "payload": payload}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> JobEvent:
        kind, raw = data["kind"], data["payload"]
        payload: Payload
        if kind == "state":
            payload = Job.from_json(raw)
        elif kind == "progress":
            payload = Progress(**raw)
        elif kind == "prior_progress":
            payload = PriorProgressInfo(**raw)
        elif kind == "preview":
            payload = Preview(**raw)
        else:
            raise ValueError(f"unknown event kind {kind!r}")
        return cls(sequence=int(data["sequence"]), time=float(data["time"]), payload=payload)


_KINDS: dict[type, str] = {
    Job: "state",
    Progress: "progress",
    PriorProgressInfo: "prior_progress",
    Preview: "preview",
}


def events_key(job_id: str) -> str:
    return f"jobs/{job_id}/events.jsonl"


def preview_key(job_id: str, step: int, number: int) -> str:
    return f"jobs/{job_id}/previews/step-{step:08d}-{number:04d}.jpg"


class JobEventLog:
    """The events of one job. Appends come from any thread; watchers are asyncio tasks."""

    def __init__(
        self,
        job_id: str,
        store: ObjectStore,
        *,
        persist_seconds: float = 5.0,
        events: list[JobEvent] | None = None,
        next_sequence: int = 1,
        final: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.job_id = job_id
        self.store = store
        self.persist_seconds = persist_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._persist_lock = threading.Lock()
        self._events: list[JobEvent] = list(events or [])
        self._next = max(next_sequence, self._events[-1].sequence + 1 if self._events else 1)
        self._reserved = self._next - 1  # sequences up to here are recorded as handed out
        self._final = final
        self._last_durable_progress = 0.0
        self._previews = sum(isinstance(e.payload, Preview) for e in self._events)
        self._waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()

    @property
    def final(self) -> bool:
        return self._final

    @property
    def last_sequence(self) -> int:
        with self._lock:
            return self._next - 1

    # Appending

    def state_changed(self, job: Job) -> JobEvent:
        """Records a state change (the whole job); a final state closes the log."""
        event = self._append(job, durable=True, final=job.state.is_final)
        self._persist()
        return event

    def progress(self, progress: Progress | PriorProgressInfo, *, force_durable: bool = False) -> JobEvent:
        now = self._clock()
        durable = force_durable or now - self._last_durable_progress >= self.persist_seconds
        if durable:
            self._last_durable_progress = now
        event = self._append(progress, durable=durable)
        if durable or event.sequence >= self._reserved:
            self._persist()
        return event

    def preview(self, step: int, prompt: str, jpeg: bytes) -> JobEvent:
        with self._lock:
            self._previews += 1
            key = preview_key(self.job_id, step, self._previews)
        self.store.put_bytes(key, jpeg)  # before the event that points at it
        event = self._append(Preview(step=step, prompt=prompt, image_key=key, jpeg=jpeg), durable=True)
        self._forget_old_preview_bytes()
        self._persist()
        return event

    def _forget_old_preview_bytes(self) -> None:
        """Keep the JPEGs of the newest previews in memory; older ones are read back on demand."""
        with self._lock:
            holding = [
                i for i, e in enumerate(self._events) if isinstance(e.payload, Preview) and e.payload.jpeg
            ]
            for index in holding[:-PREVIEWS_IN_MEMORY]:
                event = self._events[index]
                preview = event.payload
                assert isinstance(preview, Preview)
                self._events[index] = replace(event, payload=replace(preview, jpeg=None))

    def _append(self, payload: Payload, *, durable: bool, final: bool = False) -> JobEvent:
        with self._lock:
            if self._final:
                raise RuntimeError(f"job {self.job_id}: event after the final state")
            event = JobEvent(sequence=self._next, time=self._clock(), payload=payload, durable=durable)
            self._next += 1
            self._events.append(event)
            self._final = final
            waiters = list(self._waiters)
        for loop, waiter in waiters:
            with contextlib.suppress(RuntimeError):  # the watcher's loop is gone
                loop.call_soon_threadsafe(waiter.set)
        return event

    def _persist(self) -> None:
        """Rewrite events.jsonl with the durable events and a fresh block of sequence numbers."""
        with self._persist_lock:
            with self._lock:
                durable = [event for event in self._events if event.durable]
                reserved = self._next - 1 + (0 if self._final else SEQUENCE_BLOCK)
            progress = [e for e in durable if isinstance(e.payload, Progress | PriorProgressInfo)]
            dropped = {e.sequence for e in progress[:-MAX_PERSISTED_PROGRESS]}
            lines = [json.dumps({"format": 1, "next_sequence": reserved + 1})]
            lines += [json.dumps(e.to_json()) for e in durable if e.sequence not in dropped]
            self.store.put_bytes(events_key(self.job_id), ("\n".join(lines) + "\n").encode())
            with self._lock:
                self._reserved = max(self._reserved, reserved)

    def mark_final(self) -> None:
        with self._lock:
            self._final = True

    # Reading

    def read(self, after: int = 0) -> tuple[list[JobEvent], bool]:
        """Events with a sequence above `after`, and whether the log is closed."""
        with self._lock:
            start = _first_after(self._events, after)
            return self._events[start:], self._final

    def load_preview(self, event: JobEvent) -> JobEvent:
        """The event with its JPEG, read from the store when only the key is in memory."""
        payload = event.payload
        if not isinstance(payload, Preview) or payload.jpeg is not None:
            return event
        try:
            jpeg = self.store.get_bytes(payload.image_key)
        except NotFound:
            jpeg = b""
        return replace(event, payload=replace(payload, jpeg=jpeg))

    async def watch(self, after: int = 0) -> AsyncIterator[JobEvent]:
        """Events after `after`, then new ones as they come, until the final state."""
        loop = asyncio.get_running_loop()
        waiter = asyncio.Event()
        entry = (loop, waiter)
        with self._lock:
            self._waiters.add(entry)
        try:
            while True:
                waiter.clear()
                events, closed = self.read(after)
                for event in events:
                    if isinstance(event.payload, Preview) and event.payload.jpeg is None:
                        event = await asyncio.to_thread(self.load_preview, event)
                    yield event
                    after = event.sequence
                if closed and not events:
                    return
                if not events:
                    await waiter.wait()
        finally:
            with self._lock:
                self._waiters.discard(entry)


def _first_after(events: list[JobEvent], after: int) -> int:
    low, high = 0, len(events)
    while low < high:
        middle = (low + high) // 2
        if events[middle].sequence <= after:
            low = middle + 1
        else:
            high = middle
    return low


class EventLogs:
    """The logs of every job: created with the job, or loaded from the store after a restart."""

    def __init__(
        self, store: ObjectStore, *, persist_seconds: float = 5.0, clock: Callable[[], float] = time.time
    ) -> None:
        self.store = store
        self.persist_seconds = persist_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._load_lock = threading.Lock()
        self._logs: OrderedDict[str, JobEventLog] = OrderedDict()

    def _new(self, job: Job, events: list[JobEvent], next_sequence: int) -> JobEventLog:
        return JobEventLog(
            job.job_id,
            scoped_store(self.store, job.tenant),
            persist_seconds=self.persist_seconds,
            events=events,
            next_sequence=next_sequence,
            clock=self._clock,
        )

    def forget(self, job_id: str) -> None:
        """Drop a deleted job's log from memory (its keys are removed with the job's)."""
        with self._lock:
            self._logs.pop(job_id, None)

    def get(self, job: Job) -> JobEventLog:
        """The job's log; loaded (or rebuilt from the record) when not in memory."""
        return self._get(job, sync=True)

    def _get(self, job: Job, *, sync: bool) -> JobEventLog:
        with self._lock:
            existing = self._logs.get(job.job_id)
            if existing is not None:
                self._logs.move_to_end(job.job_id)
                return existing
        with self._load_lock:  # one load per job, never two copies of a log
            with self._lock:
                existing = self._logs.get(job.job_id)
            if existing is not None:
                return existing
            loaded = self._load(job, sync=sync)
            with self._lock:
                self._logs[job.job_id] = loaded
                self._evict()
        return loaded

    def _load(self, job: Job, *, sync: bool) -> JobEventLog:
        try:
            raw = scoped_store(self.store, job.tenant).get_bytes(events_key(job.job_id)).decode()
        except NotFound:
            raw = ""
        events: list[JobEvent] = []
        next_sequence = 1
        for number, line in enumerate(raw.splitlines()):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
                if number == 0 and "next_sequence" in data:
                    next_sequence = int(data["next_sequence"])
                else:
                    events.append(JobEvent.from_json(data))
            except (ValueError, KeyError, TypeError) as err:
                log.warning("skipping a bad event line", extra={"job_id": job.job_id, "error": str(err)})
        event_log = self._new(job, events=events, next_sequence=next_sequence)
        # The record is the truth: a crash between writing it and the log loses the last state event.
        states = [e.payload for e in events if isinstance(e.payload, Job)]
        if sync and (not states or states[-1].state != job.state):
            event_log.state_changed(job)
        elif states and states[-1].state.is_final:
            event_log.mark_final()
        return event_log

    def _evict(self) -> None:
        finished = [job_id for job_id, event_log in self._logs.items() if event_log.final]
        for job_id in finished[: max(0, len(finished) - MAX_CACHED_FINISHED_LOGS)]:
            del self._logs[job_id]

    def state_changed(self, job: Job) -> None:
        self._get(job, sync=False).state_changed(job)
