"""The job runner's lifecycle, bounded concurrency, cancel, failure, shutdown and recovery.

The training core is a stand-in here (a loop that emits the core's events); the integration
tests run the real Ray Train core.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from services.common.errors import AlreadyExists, Unavailable
from services.common.local_store import LocalObjectStore
from services.trainer.job_spec import Concept, JobSpec
from services.trainer.jobs.events import EventLogs
from services.trainer.jobs.metrics import TrainerMetrics
from services.trainer.jobs.priors import PriorsCancelled, PriorSetInfo
from services.trainer.jobs.progress import ProgressTracker, examples_per_step
from services.trainer.jobs.records import Job, JobRepository, JobState
from services.trainer.jobs.runner import JobRunner, RunnerSettings
from services.trainer.training_events import (
    PreviewEvent,
    ProgressEvent,
    PublishingEvent,
    TrainingCancelled,
)

DEADLINE_S = 20.0
SPEC = JobSpec(
    base_model="tiny-sd",
    dataset="a" * 64,
    instance_prompt="a photo of sks dog",
    max_train_steps=5,
    learning_rate=1e-4,
    resolution=64,
)
PRIOR_SPEC = JobSpec(**{**SPEC.to_json(), "with_prior_preservation": True, "class_prompt": "a dog"})


@dataclass
class Result:
    model_id: str
    final_step: int
    resumed_from_step: int


@dataclass
class FakeTrain:
    """Runs `max_train_steps` steps; each waits for `gate` so tests control the pace."""

    gate: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    calls: list[dict[str, Any]] = field(default_factory=list)
    started: threading.Event = field(default_factory=threading.Event)
    resume_from: int = 0

    def __call__(self, job_id: str, spec: JobSpec, **kwargs: Any) -> Result:
        self.calls.append({"job_id": job_id, **kwargs})
        on_event, cancel = kwargs["on_event"], kwargs["cancel"]
        self.started.set()
        for step in range(self.resume_from + 1, spec.max_train_steps + 1):
            while not self.gate.wait(0.01):
                if cancel.is_set():
                    raise TrainingCancelled()
            if self.error is not None:
                raise self.error
            on_event(ProgressEvent(step, spec.max_train_steps, 1.0 / step, 1e-4, 8.0))
        on_event(PreviewEvent(spec.max_train_steps, "sks dog", b"\xff\xd8jpeg"))
        on_event(PublishingEvent(spec.max_train_steps))
        self.models.add(spec.model_id)
        return Result(spec.model_id, spec.max_train_steps, self.resume_from)

    models: set[str] = field(default_factory=set)


@dataclass
class FakePriors:
    error: BaseException | None = None
    calls: list[JobSpec] = field(default_factory=list)

    def generate(
        self,
        spec: JobSpec,
        *,
        tenant: str = "",
        on_progress: Callable[[int, int], None],
        cancel: threading.Event,
    ):
        self.calls.append(spec)
        if self.error is not None:
            raise self.error
        if cancel.is_set():
            raise PriorsCancelled()
        for done in range(1, 4):
            on_progress(done, 3)
        prefix = (
            "priors/abc/"
            if spec.class_prompt == "a dog"
            else f"priors/{spec.class_prompt.replace(' ', '-')}/"
        )
        return PriorSetInfo(prefix=prefix, count=3, cached=False)


class FakeModels:
    def __init__(self, train: FakeTrain) -> None:
        self.train = train
        self.owner: dict[str, str] = {}

    def published_by(self, model_id: str, training_job: str) -> bool:
        if model_id in self.train.models:  # the fake trainer publishes only its own jobs' models
            return True
        if model_id not in self.owner:
            return False
        if self.owner[model_id] == f"trainingJobs/{training_job}":
            return True
        raise AlreadyExists(f"model_id: model {model_id!r} was published by something else")


@dataclass
class Rig:
    repo: JobRepository
    events: EventLogs
    runner: JobRunner
    metrics: TrainerMetrics
    train: FakeTrain
    priors: FakePriors

    def create(self, spec: JobSpec = SPEC) -> Job:
        job, _ = self.repo.create(spec, request_id="", request_fingerprint="")
        self.runner.submit(job.job_id)
        return job

    def wait_for(self, job_id: str, state: JobState) -> Job:
        return wait_until(
            lambda: self.repo.get(job_id).state == state, f"{job_id} {state}", self.repo, job_id
        )

    def states(self, job_id: str) -> list[JobState]:
        events, _ = self.events.get(self.repo.get(job_id)).read()
        return [event.payload.state for event in events if event.kind == "state"]


def wait_until(condition: Callable[[], bool], what: str, repo: JobRepository, job_id: str) -> Job:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; job is {repo.get(job_id)}")
        time.sleep(0.01)
    return repo.get(job_id)


def make_rig(
    store: LocalObjectStore, train: FakeTrain | None = None, priors: FakePriors | None = None, slots: int = 1
):
    train = train or FakeTrain()
    priors = priors or FakePriors()
    models = FakeModels(train)
    events = EventLogs(store, persist_seconds=0.0)
    metrics = TrainerMetrics(CollectorRegistry())

    def on_change(old: JobState | None, job: Job) -> None:
        events.state_changed(job)
        if job.state.is_final:
            metrics.job_finished(job.job_id, job.state, 1.0)

    repo = JobRepository(store, on_change=on_change)
    metrics.watch_jobs(repo.count_by_state)
    runner = JobRunner(
        repo=repo,
        events=events,
        priors=priors,
        train=train,
        models=lambda tenant: models,
        settings=RunnerSettings(
            max_concurrent_jobs=slots, progress_persist_seconds=0.0, shutdown_timeout_seconds=10
        ),
        metrics=metrics,
    )
    return Rig(repo=repo, events=events, runner=runner, metrics=metrics, train=train, priors=priors)


@pytest.fixture
def store(tmp_path: Path) -> LocalObjectStore:
    return LocalObjectStore(tmp_path / "store")


@pytest.fixture
def rig(store: LocalObjectStore) -> Iterator[Rig]:
    rig = make_rig(store)
    rig.runner.start()
    yield rig
    rig.train.gate.set()
    rig.runner.shutdown(timeout=10)


def test_a_job_runs_to_succeeded_with_progress_and_preview(rig: Rig) -> None:
    rig.train.gate.set()
    job = rig.create()
    done = rig.wait_for(job.job_id, JobState.SUCCEEDED)
    assert done.model == f"models/job-{job.job_id}"
    assert done.progress.step == 5 and done.progress.total_steps == 5
    assert done.start_time is not None and done.end_time is not None
    assert rig.states(job.job_id) == [
        JobState.QUEUED,
        JobState.TRAINING,
        JobState.PUBLISHING,
        JobState.SUCCEEDED,
    ]
    events, closed = rig.events.get(done).read()
    assert closed
    steps = [e.payload.step for e in events if e.kind == "progress"]
    assert steps == [1, 2, 3, 4, 5]
    assert [e.kind for e in events].count("preview") == 1
    assert rig.train.calls[0]["prior_prefix"] is None
    assert rig.train.calls[0]["tracking"] == RunnerSettings().tracking  # rank 0's MLflow settings
    assert rig.priors.calls == []
    sample = rig.metrics.step_duration_seconds.collect()[0].samples
    assert next(s.value for s in sample if s.name.endswith("_count")) == 5
    assert next(s.value for s in sample if s.name.endswith("_sum")) == pytest.approx(
        5 * 1 / 8.0
    )  # 1 example per step at 8 examples/s
    assert rig.metrics.loss.collect()[0].samples == []  # per-job series go when the job ends


def test_eta_follows_the_average_pace_of_the_run() -> None:
    now = [100.0]
    tracker = ProgressTracker(lambda: now[0], examples_per_step=4)
    first, _ = tracker.update(10, 110, 0.5, 1e-4, 8.0)
    assert first.eta_seconds == 0.0  # no pace yet
    now[0] += 20.0
    progress, step_seconds = tracker.update(20, 110, 0.4, 1e-4, 8.0)
    assert progress.eta_seconds == pytest.approx(90 * 2.0)
    assert step_seconds == pytest.approx(0.5)
    assert examples_per_step(PRIOR_SPEC) == 2 and examples_per_step(SPEC) == 1


def test_prior_preservation_generates_priors_first(rig: Rig) -> None:
    rig.train.gate.set()
    job = rig.create(PRIOR_SPEC)
    rig.wait_for(job.job_id, JobState.SUCCEEDED)
    assert rig.states(job.job_id)[:3] == [JobState.QUEUED, JobState.GENERATING_PRIORS, JobState.TRAINING]
    events, _ = rig.events.get(rig.repo.get(job.job_id)).read()
    assert [
        (e.payload.images_done, e.payload.images_total) for e in events if e.kind == "prior_progress"
    ] == [
        (1, 3),
        (2, 3),
        (3, 3),
    ]
    assert rig.train.calls[0]["prior_prefix"] == "priors/abc/"
    assert rig.repo.get(job.job_id).prior_prefix == "priors/abc/"


def test_each_class_prompt_of_a_multi_subject_job_gets_one_prior_set(rig: Rig) -> None:
    rig.train.gate.set()
    spec = dataclasses.replace(
        PRIOR_SPEC,
        additional_concepts=(
            Concept("b" * 64, "a photo of zwx cat", "zwx", "a cat"),
            Concept("c" * 64, "a photo of ohwx dog", "ohwx", "a dog"),  # the first subject's class
        ),
    )
    job = rig.create(spec)
    done = rig.wait_for(job.job_id, JobState.SUCCEEDED)
    assert [call.class_prompt for call in rig.priors.calls] == ["a dog", "a cat"]  # once each
    assert (done.prior_prefix, done.additional_prior_prefixes) == (
        "priors/abc/",
        ("priors/a-cat/", "priors/abc/"),
    )
    call = rig.train.calls[0]
    assert (call["prior_prefix"], call["additional_prior_prefixes"]) == (
        "priors/abc/",
        ("priors/a-cat/", "priors/abc/"),
    )
    events, _ = rig.events.get(done).read()
    progress = [(e.payload.images_done, e.payload.images_total) for e in events if e.kind == "prior_progress"]
    assert progress == [(1, 6), (2, 6), (3, 6), (4, 6), (5, 6), (6, 6)]  # both sets, as one count
    stored = Job.from_json(json.loads(json.dumps(done.to_json())))  # the record keeps every set
    assert (stored.prior_prefix, stored.additional_prior_prefixes) == (
        done.prior_prefix,
        done.additional_prior_prefixes,
    )


def test_only_max_concurrent_jobs_run_the_rest_wait_queued(rig: Rig) -> None:
    first, second = rig.create(), rig.create()
    wait_until(rig.train.started.is_set, "first job to train", rig.repo, first.job_id)
    assert rig.repo.get(first.job_id).state == JobState.TRAINING
    assert rig.repo.get(second.job_id).state == JobState.QUEUED
    rig.train.gate.set()
    rig.wait_for(second.job_id, JobState.SUCCEEDED)
    assert [call["job_id"] for call in rig.train.calls] == [first.job_id, second.job_id]


def test_cancel_of_a_queued_job_is_immediate_and_it_never_runs(rig: Rig) -> None:
    first, second = rig.create(), rig.create()
    wait_until(rig.train.started.is_set, "first job to train", rig.repo, first.job_id)
    cancelled = rig.runner.cancel(second.job_id)
    assert cancelled.state == JobState.CANCELLED and cancelled.end_time is not None
    rig.train.gate.set()
    rig.wait_for(first.job_id, JobState.SUCCEEDED)
    rig.runner.shutdown(timeout=10)
    assert [call["job_id"] for call in rig.train.calls] == [first.job_id]
    assert rig.repo.get(second.job_id).state == JobState.CANCELLED


def test_cancel_of_a_running_job_stops_it(rig: Rig) -> None:
    job = rig.create()
    wait_until(rig.train.started.is_set, "training", rig.repo, job.job_id)
    assert rig.runner.cancel(job.job_id).state == JobState.TRAINING  # asked, not yet done
    done = rig.wait_for(job.job_id, JobState.CANCELLED)
    assert done.end_time is not None and done.model == ""


def test_cancel_of_a_finished_job_returns_it_unchanged(rig: Rig) -> None:
    rig.train.gate.set()
    job = rig.create()
    done = rig.wait_for(job.job_id, JobState.SUCCEEDED)
    assert rig.runner.cancel(job.job_id) == done


def test_a_training_error_fails_the_job_with_its_message(store: LocalObjectStore) -> None:
    rig = make_rig(store, train=FakeTrain(error=RuntimeError("CUDA out of memory")))
    rig.train.gate.set()
    rig.runner.start()
    job = rig.create()
    failed = rig.wait_for(job.job_id, JobState.FAILED)
    assert "CUDA out of memory" in failed.error_message
    assert rig.states(job.job_id)[-1] == JobState.FAILED
    rig.runner.shutdown(timeout=10)


def test_priorgen_down_fails_with_an_actionable_message(store: LocalObjectStore) -> None:
    down = Unavailable("the prior-generation service at 127.0.0.1:1 is unavailable; check that it is running")
    rig = make_rig(store, priors=FakePriors(error=down))
    rig.runner.start()
    job = rig.create(PRIOR_SPEC)
    failed = rig.wait_for(job.job_id, JobState.FAILED)
    assert "prior-generation service" in failed.error_message and "check" in failed.error_message
    assert rig.train.calls == []
    rig.runner.shutdown(timeout=10)


def test_shutdown_leaves_running_jobs_for_the_next_process_which_resumes_them(
    store: LocalObjectStore,
) -> None:
    first = make_rig(store)
    first.runner.start()
    running, waiting = first.create(), first.create()
    wait_until(first.train.started.is_set, "training", first.repo, running.job_id)
    first.runner.shutdown(timeout=10)
    assert first.repo.get(running.job_id).state == JobState.TRAINING  # not CANCELLED
    assert first.repo.get(waiting.job_id).state == JobState.QUEUED

    second = make_rig(store, train=FakeTrain(resume_from=2))
    second.train.gate.set()
    recovered = second.runner.recover(second.repo.load())
    assert [job.job_id for job in recovered] == [running.job_id, waiting.job_id]
    assert all(job.state == JobState.QUEUED for job in recovered)
    second.runner.start()
    done = second.wait_for(running.job_id, JobState.SUCCEEDED)
    second.wait_for(waiting.job_id, JobState.SUCCEEDED)
    assert done.runs == 2
    assert second.states(running.job_id) == [
        JobState.QUEUED,
        JobState.TRAINING,
        JobState.QUEUED,
        JobState.TRAINING,
        JobState.PUBLISHING,
        JobState.SUCCEEDED,
    ]
    second.runner.shutdown(timeout=10)


def test_a_job_whose_model_was_already_published_succeeds_without_training(store: LocalObjectStore) -> None:
    rig = make_rig(store)
    job, _ = rig.repo.create(SPEC, request_id="", request_fingerprint="")
    rig.repo.transition(job.job_id, JobState.TRAINING)
    rig.repo.transition(job.job_id, JobState.PUBLISHING)
    rig.runner.models("").owner[job.spec.model_id] = job.name  # published, then the trainer died
    rig.runner.recover(rig.repo.load())
    rig.runner.start()
    done = rig.wait_for(job.job_id, JobState.SUCCEEDED)
    assert done.model == f"models/{job.spec.model_id}"
    assert rig.train.calls == []
    rig.runner.shutdown(timeout=10)


def test_a_model_id_taken_by_another_model_fails_the_job(store: LocalObjectStore) -> None:
    rig = make_rig(store)
    rig.runner.start()
    job, _ = rig.repo.create(SPEC, request_id="", request_fingerprint="")
    rig.runner.models("").owner[job.spec.model_id] = "trainingJobs/someoneelse"
    rig.runner.submit(job.job_id)
    failed = rig.wait_for(job.job_id, JobState.FAILED)
    assert "model_id" in failed.error_message
    rig.runner.shutdown(timeout=10)
