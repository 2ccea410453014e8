"""Dynamic batching: requests that agree on a BatchKey share one batch run.

Worker threads (torch releases the GIL; the event loop never runs torch) take the oldest waiting
request and everything waiting with the same key, up to `max_batch` images, once the batch is
full or the oldest request has waited `max_wait_s`. Requests are never split: one larger than
`max_batch` runs alone. A request cancelled while waiting is dropped; one cancelled while
running leaves its batch at the next step (the sampler checks). Requests arriving while every
worker is busy simply wait and join the next batch, so batches grow with load.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from services.inference.job import Job, shutting_down

log = logging.getLogger(__name__)

RunBatch = Callable[[list[Job]], None]


class Batcher:
    def __init__(
        self,
        run_batch: RunBatch,
        *,
        max_batch: int,
        max_wait_s: float,
        workers: int = 1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._run_batch = run_batch
        self._max_batch = max_batch
        self._max_wait_s = max_wait_s
        self._clock = clock
        self._cond = threading.Condition()
        self._waiting: list[Job] = []
        self._running = 0  # jobs in batches being sampled now
        self._stopping = False
        self._threads = [
            threading.Thread(target=self._work, name=f"inference-worker-{i}", daemon=True)
            for i in range(workers)
        ]
        self._started = False

    def start(self) -> None:
        if not self._started:
            self._started = True
            for thread in self._threads:
                thread.start()

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._stopping:
                raise shutting_down()
            self._waiting.append(job)
            self._cond.notify_all()

    def waiting(self) -> int:
        with self._cond:
            return len(self._waiting)

    def running(self) -> int:
        with self._cond:
            return self._running

    def stop(self, timeout: float = 30.0) -> None:
        """Fail the waiting jobs, let running batches end, join the workers."""
        with self._cond:
            self._stopping = True
            dropped, self._waiting = self._waiting, []
            self._cond.notify_all()
        for job in dropped:
            job.finish(shutting_down())
        if self._started:
            for thread in self._threads:
                thread.join(timeout)

    # ---- workers ------------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            for job in batch:
                job.start()
            try:
                self._run_batch(batch)
            except BaseException as err:  # a failed batch fails its requests, never the worker
                log.exception("batch run failed", extra={"requests": len(batch)})
                for job in batch:
                    job.finish(err)
            else:
                for job in batch:
                    job.finish()
            finally:
                with self._cond:
                    self._running -= len(batch)

    def _next_batch(self) -> list[Job] | None:
        with self._cond:
            while True:
                if self._stopping:
                    return None
                self._waiting = [job for job in self._waiting if not job.cancelled]
                if not self._waiting:
                    self._cond.wait()
                    continue
                oldest = self._waiting[0]
                same_key = [job for job in self._waiting if job.key == oldest.key]
                images = sum(job.num_images for job in same_key)
                wait_left = oldest.enqueued_at + self._max_wait_s - self._clock()
                if images < self._max_batch and wait_left > 0:
                    self._cond.wait(wait_left)
                    continue
                batch = self._take(same_key)
                taken = set(map(id, batch))
                self._waiting = [job for job in self._waiting if id(job) not in taken]
                self._running += len(batch)
                return batch

    def _take(self, candidates: list[Job]) -> list[Job]:
        """Oldest first, up to max_batch images; the first is always taken, whatever its size."""
        batch: list[Job] = []
        images = 0
        for job in candidates:
            if batch and images + job.num_images > self._max_batch:
                continue  # a smaller, later request may still fit
            batch.append(job)
            images += job.num_images
        return batch
