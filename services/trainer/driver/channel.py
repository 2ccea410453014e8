"""The line between the driver and rank 0: a JobChannel actor that holds rank 0's events and the
cancel flag, and the driver's pump thread that drains it into the job's listener."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from services.trainer.training_events import ProgressEvent, PublishedEvent, StartedEvent, TrainingEvent

log = logging.getLogger(__name__)

POLL_SECONDS = 0.25  # how often the driver drains progress and forwards a cancel


class JobChannel:
    """Ray actor between the driver and rank 0. A plain (ordered, single-threaded) actor: rank 0's
    fire-and-forget pushes arrive in the order they were sent."""

    def __init__(self) -> None:
        self._events: list[TrainingEvent] = []
        self._cancelled = False

    def push_many(self, events: list[TrainingEvent]) -> None:
        self._events.extend(events)

    def take(self) -> list[TrainingEvent]:
        events, self._events = self._events, []
        return events

    def cancel(self) -> None:
        self._cancelled = True

    def cancelled(self) -> bool:
        return self._cancelled


class Pump:
    """Driver thread: channel messages -> on_event (in order), cancel.set() -> channel.cancel()."""

    def __init__(
        self, channel: Any, on_event: Callable[[TrainingEvent], None], cancel: threading.Event
    ) -> None:
        self.channel = channel
        self.on_event = on_event
        self.cancel = cancel
        self.starts: list[int] = []  # the step each worker-group start resumed from
        self.published_step: int | None = None  # set when rank 0 reports the model published
        self._last_step = 0
        self._stop = threading.Event()
        self._cancel_sent = False
        self._thread = threading.Thread(target=self._run, name="training-events", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def finish(self) -> None:
        """Stop the thread, then deliver whatever is still in the channel."""
        import ray

        self._stop.set()
        self._thread.join()
        try:
            self._deliver(ray.get(self.channel.take.remote()))
        except Exception:  # never hide how the run itself ended
            log.exception("cannot read the last training events")

    def _run(self) -> None:
        import ray

        while not self._stop.is_set():
            if self.cancel.is_set() and not self._cancel_sent:
                ray.get(self.channel.cancel.remote())
                self._cancel_sent = True
            try:
                self._deliver(ray.get(self.channel.take.remote()))
            except Exception:  # the channel is gone only when the run is over
                log.exception("cannot read training events")
                return
            self._stop.wait(POLL_SECONDS)

    def _deliver(self, events: list[TrainingEvent]) -> None:
        for event in events:
            if not self._forward(event):
                continue
            try:
                self.on_event(event)
            except Exception:  # a listener's bug must not stop the run
                log.exception("training event handler failed")

    def _forward(self, event: TrainingEvent) -> bool:
        """Record what the driver itself needs; False for events the listener must not see."""
        if isinstance(event, StartedEvent):
            self.starts.append(event.step)
            return False
        if isinstance(event, PublishedEvent):
            self.published_step = event.step
            return False
        if isinstance(event, ProgressEvent):
            # After a retry the steps since the last checkpoint run again: report only new ones.
            if event.step <= self._last_step:
                return False
            self._last_step = event.step
        return True
