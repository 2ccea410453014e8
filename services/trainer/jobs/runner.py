"""Runs jobs: a bounded number at once, each through its lifecycle, the rest waiting QUEUED.

    QUEUED -> GENERATING_PRIORS (only with prior preservation) -> TRAINING -> PUBLISHING
           -> SUCCEEDED | FAILED | CANCELLED

Each running job has a thread of its own (training is a blocking Ray Train run) and a cancel
event. A user's cancel ends the job CANCELLED; a trainer shutdown stops the run too but leaves
the job in its state, so the next trainer process recovers it: back to QUEUED, priors again
(priorgen's cache answers at once), training from the newest checkpoint (run_training resumes by
itself), or straight to SUCCEEDED when the model was already published.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from services.common.errors import DomainError
from services.common.settings import StoreSettings
from services.common.tenancy import namespace_of
from services.trainer.job_spec import JobSpec, concepts
from services.trainer.jobs.events import EventLogs, PriorProgressInfo
from services.trainer.jobs.metrics import TrainerMetrics
from services.trainer.jobs.priors import PriorsCancelled, PriorsProvider
from services.trainer.jobs.progress import ProgressTracker, StepUsage, examples_per_step
from services.trainer.jobs.records import Job, JobRepository, JobState, Progress
from services.trainer.settings import TrackingSettings
from services.trainer.training_events import (
    CheckpointEvent,
    PreviewEvent,
    ProgressEvent,
    PublishingEvent,
    StartedEvent,
    TrainingCancelled,
    TrainingFailed,
)

log = logging.getLogger(__name__)

MAX_ERROR_CHARS = 2000


class TrainFn(Protocol):
    """`services.trainer.driver.run.run_training`, or a stand-in in unit tests."""

    def __call__(
        self,
        job_id: str,
        spec: JobSpec,
        *,
        store_settings: StoreSettings,
        prior_prefix: str | None,
        on_event: Callable[[Any], None],
        cancel: threading.Event,
        storage_path: str | None = None,
        max_failures: int = 1,
        tracking: TrackingSettings | None = None,
        additional_prior_prefixes: tuple[str, ...] = (),
    ) -> Any: ...


class PublishedModels(Protocol):
    def published_by(self, model_id: str, training_job: str) -> bool:
        """ModelStore.published_by: False, True, or AlreadyExists when another model has the id."""


TenantModels = Callable[[str], PublishedModels]  # a tenant's name -> its models (ModelStore.for_tenant)


@dataclass(frozen=True)
class RunnerSettings:
    max_concurrent_jobs: int = 1
    store_settings: StoreSettings = field(default_factory=StoreSettings)
    storage_path: str | None = None  # Ray Train's run storage
    max_failures: int = 1
    progress_persist_seconds: float = 5.0
    shutdown_timeout_seconds: float = 60.0
    tracking: TrackingSettings = field(default_factory=TrackingSettings)  # MLflow, when configured


class JobCancelled(Exception):
    """A cancel arrived between two phases of a job."""


def is_cancellation(err: BaseException) -> bool:
    """Ours, PriorsCancelled, or the training core's TrainingCancelled."""
    return isinstance(err, JobCancelled | PriorsCancelled | TrainingCancelled)


class JobRunner:
    def __init__(
        self,
        *,
        repo: JobRepository,
        events: EventLogs,
        priors: PriorsProvider,
        train: TrainFn,
        models: TenantModels,
        settings: RunnerSettings,
        metrics: TrainerMetrics | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.repo = repo
        self.events = events
        self.priors = priors
        self.train = train
        self.models = models
        self.settings = settings
        self.metrics = metrics
        self._clock = clock
        self._lock = threading.Lock()
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._cancels: dict[str, threading.Event] = {}
        self._user_cancelled: set[str] = set()
        self._shutting_down = False
        self._threads: list[threading.Thread] = []

    # Control

    def start(self) -> None:
        for index in range(self.settings.max_concurrent_jobs):
            thread = threading.Thread(target=self._work, name=f"job-slot-{index}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def submit(self, job_id: str) -> None:
        self._queue.put(job_id)

    def recover(self, jobs: list[Job]) -> list[Job]:
        """Queue again the unfinished jobs a previous trainer left (oldest first)."""
        recovered = []
        for job in jobs:
            if job.state.is_final:
                continue
            if job.state != JobState.QUEUED:
                job = self.repo.transition(job.job_id, JobState.QUEUED)
            log.info("recovering job", extra={"job_id": job.job_id, "step": job.progress.step})
            self.submit(job.job_id)
            recovered.append(job)
        return recovered

    def cancel(self, job_id: str) -> Job:
        """QUEUED: CANCELLED at once. Running: asks the run to stop (CANCELLED within seconds).
        Final: unchanged."""
        with self._lock:
            job = self.repo.get(job_id)
            if job.state.is_final:
                return job
            if job.state == JobState.QUEUED and job_id not in self._cancels:
                return self.repo.transition(job_id, JobState.CANCELLED)
            self._user_cancelled.add(job_id)
            cancel = self._cancels.get(job_id)
        if cancel is not None:
            cancel.set()
            log.info("cancelling job", extra={"job_id": job_id})
        return job

    def shutdown(self, timeout: float | None = None) -> None:
        """Stop every run without ending its job; the next trainer process resumes them."""
        with self._lock:
            self._shutting_down = True
            cancels = list(self._cancels.values())
        for cancel in cancels:
            cancel.set()
        for _ in self._threads:
            self._queue.put(None)
        deadline = time.monotonic() + (self.settings.shutdown_timeout_seconds if timeout is None else timeout)
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def running_jobs(self) -> list[str]:
        with self._lock:
            return list(self._cancels)

    # Work

    def _work(self) -> None:
        while True:
            job_id = self._queue.get()
            if job_id is None:
                return
            try:
                self._run(job_id)
            except Exception:  # a bug here must not kill the slot
                log.exception("job runner error", extra={"job_id": job_id})

    def _run(self, job_id: str) -> None:
        with self._lock:
            job = self.repo.get(job_id)
            if job.state.is_final or self._shutting_down:
                return
            cancel = threading.Event()
            self._cancels[job_id] = cancel
        started = self._clock()
        try:
            self._execute(job, cancel)
        except BaseException as err:
            self._finish_after_error(job_id, err, started)
        finally:
            with self._lock:
                self._cancels.pop(job_id, None)
                self._user_cancelled.discard(job_id)

    def _execute(self, job: Job, cancel: threading.Event) -> None:
        job_id, spec = job.job_id, job.spec
        job = self.repo.update(job_id, runs=job.runs + 1)
        log.info("job started", extra={"job_id": job_id, "run": job.runs, "model_id": spec.model_id})

        if self.models(job.tenant).published_by(spec.model_id, job_id):  # killed while publishing
            self.repo.transition(job_id, JobState.PUBLISHING)
            self.repo.transition(job_id, JobState.SUCCEEDED, model=f"models/{spec.model_id}")
            return

        prior_prefixes: tuple[str | None, ...] = (None,)
        if spec.with_prior_preservation:
            _check(cancel)
            prior_prefixes = self._generate_priors(job, cancel)

        _check(cancel)
        self.repo.transition(job_id, JobState.TRAINING)
        handler = _EventHandler(self, job_id)
        result = self.train(
            job_id,
            spec,
            # The workers open the store as the job's tenant sees it: its datasets, priors,
            # checkpoints and models, plus the shared bases.
            store_settings=dataclasses.replace(
                self.settings.store_settings, namespace=namespace_of(job.tenant)
            ),
            prior_prefix=prior_prefixes[0],
            on_event=handler,
            cancel=cancel,
            storage_path=self.settings.storage_path,
            max_failures=self.settings.max_failures,
            tracking=self.settings.tracking,
            additional_prior_prefixes=tuple(prefix for prefix in prior_prefixes[1:] if prefix),
        )
        final = self.repo.get(job_id)
        if final.state != JobState.PUBLISHING:
            self.repo.transition(job_id, JobState.PUBLISHING)
        progress = final.progress
        final_step = int(getattr(result, "final_step", progress.step))
        self.repo.transition(
            job_id,
            JobState.SUCCEEDED,
            model=f"models/{result.model_id}",
            progress=Progress(
                step=final_step,
                total_steps=spec.max_train_steps,
                loss=progress.loss,
                learning_rate=progress.learning_rate,
                eta_seconds=0.0,
                samples_per_second=progress.samples_per_second,
            ),
        )
        log.info("job succeeded", extra={"job_id": job_id, "model": result.model_id, "step": final_step})

    def _generate_priors(self, job: Job, cancel: threading.Event) -> tuple[str, ...]:
        """Every subject's class-prior set, in the order of `concepts(spec)`; subjects with the
        same class prompt share one set (asked for once). Progress counts every set's images."""
        job_id = job.job_id
        self.repo.transition(job_id, JobState.GENERATING_PRIORS)
        event_log = self.events.get(self.repo.get(job_id))
        started = self._clock()
        class_prompts = list(dict.fromkeys(concept.class_prompt for concept in concepts(job.spec)))
        prefixes: dict[str, str] = {}
        for index, class_prompt in enumerate(class_prompts):

            def on_progress(done: int, total: int, sets_done: int = index) -> None:
                # Every set has the job's num_class_images: progress over all of them.
                overall = total * len(class_prompts)
                done += sets_done * total
                event_log.progress(
                    PriorProgressInfo(images_done=done, images_total=overall), force_durable=done == overall
                )

            # The spec as this subject's prior set sees it: only the class prompt differs.
            spec = dataclasses.replace(job.spec, class_prompt=class_prompt)
            info = self.priors.generate(spec, tenant=job.tenant, on_progress=on_progress, cancel=cancel)
            prefixes[class_prompt] = info.prefix
            log.info(
                "priors ready",
                extra={"job_id": job_id, "prefix": info.prefix, "count": info.count, "cached": info.cached},
            )
        if self.metrics is not None:
            self.metrics.prior_wait_seconds.observe(self._clock() - started)
        ordered = tuple(prefixes[concept.class_prompt] for concept in concepts(job.spec))
        self.repo.update(job_id, prior_prefix=ordered[0], additional_prior_prefixes=ordered[1:])
        return ordered

    def _finish_after_error(self, job_id: str, err: BaseException, started: float) -> None:
        with self._lock:
            user_cancelled = job_id in self._user_cancelled
            shutting_down = self._shutting_down
        job = self.repo.get(job_id)
        if job.state.is_final:
            return
        if shutting_down and not user_cancelled:
            # Leave the job where it is: the next trainer process resumes it.
            log.info("job interrupted by shutdown", extra={"job_id": job_id, "state": job.state.value})
            self.repo.update(job_id)  # persists the latest progress
            return
        if user_cancelled or is_cancellation(err):
            self.repo.transition(job_id, JobState.CANCELLED)
            log.info("job cancelled", extra={"job_id": job_id})
            return
        if isinstance(err, DomainError | TrainingFailed):
            message = str(err)  # already in words a user can act on
        else:
            message = f"training failed: {type(err).__name__}: {err}".strip()
        if len(message) > MAX_ERROR_CHARS:
            message = message[: MAX_ERROR_CHARS - 3] + "..."
        self.repo.transition(job_id, JobState.FAILED, error_message=message)
        log.error(
            "job failed",
            exc_info=None if isinstance(err, DomainError) else err,
            extra={"job_id": job_id, "error": message, "seconds": self._clock() - started},
        )


def _check(cancel: threading.Event) -> None:
    if cancel.is_set():
        raise JobCancelled()


class _EventHandler:
    """Receives the training core's events (from whatever thread it calls on_event in)."""

    def __init__(self, runner: JobRunner, job_id: str) -> None:
        self.runner = runner
        self.job_id = job_id
        job = runner.repo.get(job_id)
        self._tracker = ProgressTracker(runner._clock, examples_per_step(job.spec))
        self._usage = StepUsage(job.spec.num_workers, job.progress.step)
        self._last_persist = 0.0

    def __call__(self, event: Any) -> None:
        try:
            self._handle(event)
        except Exception:  # never break the training run because of a bookkeeping error
            log.exception("cannot record a training event", extra={"job_id": self.job_id})

    def _handle(self, event: Any) -> None:
        runner, job_id = self.runner, self.job_id
        if isinstance(event, ProgressEvent):
            progress, step_seconds = self._tracker.update(
                event.step, event.total_steps, event.loss, event.learning_rate, event.samples_per_second
            )
            now = runner._clock()
            persist = now - self._last_persist >= runner.settings.progress_persist_seconds
            if persist:
                self._last_persist = now
            used = self._usage.add(event.step, step_seconds)
            job = runner.repo.get(job_id)
            job = runner.repo.update(
                job_id,
                progress=progress,
                training_step_seconds=job.training_step_seconds + used,
                persist=persist,
            )
            if runner.metrics is not None and used:
                runner.metrics.tenant_usage(job.tenant, used)
            runner.events.get(job).progress(progress)
            if runner.metrics is not None:
                runner.metrics.observe_progress(job_id, progress.loss, progress.samples_per_second)
                if step_seconds is not None:
                    runner.metrics.step_duration_seconds.observe(step_seconds)
        elif isinstance(event, PreviewEvent):
            job = runner.repo.get(job_id)
            runner.events.get(job).preview(int(event.step), str(event.prompt), bytes(event.jpeg))
        elif isinstance(event, PublishingEvent):
            job = runner.repo.get(job_id)
            if job.state == JobState.TRAINING:
                runner.repo.transition(job_id, JobState.PUBLISHING)
        elif isinstance(event, StartedEvent):
            self._usage.restart(int(event.step))
        elif isinstance(event, CheckpointEvent):
            runner.repo.update(job_id, checkpoint_step=int(event.step))
            if runner.metrics is not None:
                runner.metrics.checkpoint_duration_seconds.observe(event.duration_seconds)
        else:
            log.debug("ignoring training event", extra={"job_id": job_id, "event": type(event).__name__})
