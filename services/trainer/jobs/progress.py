"""From the training core's progress events: job progress with an ETA, step timings, and usage."""

from __future__ import annotations

from collections.abc import Callable

from services.trainer.job_spec import JobSpec
from services.trainer.jobs.records import Progress


def examples_per_step(spec: JobSpec) -> int:
    """Examples one optimizer step trains on, over all workers (class images included): the
    unit of the core's samples_per_second."""
    per_worker = spec.train_batch_size * spec.gradient_accumulation_steps
    return per_worker * spec.num_workers * (2 if spec.with_prior_preservation else 1)


class ProgressTracker:
    """Turns the core's progress events into job progress with an ETA, plus step timings.

    Events arrive in bursts (the core forwards them every ~0.1 s), so the ETA uses the average
    pace since the first event of this run, checkpoints and previews included, and the step
    duration comes from the core's own throughput.
    """

    def __init__(self, clock: Callable[[], float], examples_per_step: int) -> None:
        self._clock = clock
        self._examples_per_step = examples_per_step
        self._first: tuple[float, int] | None = None

    def update(
        self, step: int, total: int, loss: float, lr: float, samples_per_second: float
    ) -> tuple[Progress, float | None]:
        now = self._clock()
        if self._first is None:
            self._first = (now, step)
        first_time, first_step = self._first
        eta = 0.0
        if step > first_step:
            eta = (total - step) * (now - first_time) / (step - first_step)
        step_seconds = self._examples_per_step / samples_per_second if samples_per_second > 0 else None
        progress = Progress(
            step=step,
            total_steps=total,
            loss=float(loss),
            learning_rate=float(lr),
            eta_seconds=max(0.0, eta),
            samples_per_second=float(samples_per_second),
        )
        return progress, step_seconds


class StepUsage:
    """A tenant's training usage: worker-seconds of the optimizer steps a job's runs made.

    Steps are timed by the core's own throughput (the tracker's step duration); a resumed run
    starts again from its checkpoint, and the steps it makes again count again (they ran again).
    """

    def __init__(self, workers: int, last_step: int = 0) -> None:
        self._workers = workers
        self._last_step = last_step

    def restart(self, step: int) -> None:
        self._last_step = step

    def add(self, step: int, step_seconds: float | None) -> float:
        """Worker-seconds of the steps made since the last event."""
        new_steps = max(0, step - self._last_step)
        self._last_step = max(self._last_step, step)
        return new_steps * (step_seconds or 0.0) * self._workers
