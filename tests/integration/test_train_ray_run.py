"""Training on local Ray (2 CPU workers, gloo) against the real S3 server, with the tiny model:
publishing, a worker failure retried from the checkpoint, cancel, resume after a restart, and
the subject loss falling."""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from services.common.model_store import ModelStore
from services.common.object_store import ObjectStore
from services.common.pipelines import load_pipeline
from services.common.settings import StoreSettings
from services.trainer.dataset_layout import write_dataset
from services.trainer.driver.run import run_training
from services.trainer.job_spec import JobSpec
from services.trainer.training_events import (
    CheckpointEvent,
    PreviewEvent,
    ProgressEvent,
    PublishingEvent,
    TrainingCancelled,
    TrainingFailed,
    TrainingResult,
)
from services.trainer.training_logs_layout import tensorboard_prefix
from services.trainer.worker import checkpoints, tracking
from services.trainer.worker.measure import subject_loss
from tests.fixtures.models import TINY_MODEL_ID
from tests.fixtures.trainer_server import make_image, make_png
from tests.fixtures.worker_faults import FailOnce

pytestmark = pytest.mark.usefixtures("ray_local")

DATASET = "a" * 64
PRIORS = "priors/dog/"
SUBJECT_IMAGES = 4
CANCEL_DEADLINE_S = 60.0  # generous: the machine is shared; the run normally stops in ~1 s


@pytest.fixture
def store(s3_store: ObjectStore, model_store: ModelStore) -> ObjectStore:
    """The S3 bucket with the tiny model, a 4-image subject dataset and 4 class-prior images."""
    write_dataset(s3_store, DATASET, [make_png(index) for index in range(SUBJECT_IMAGES)])
    for index in range(SUBJECT_IMAGES):
        s3_store.put_bytes(f"{PRIORS}images/{index:05d}.png", make_png(100 + index))
    return s3_store


def _spec(**overrides: object) -> JobSpec:
    spec = JobSpec(
        base_model=TINY_MODEL_ID,
        dataset=DATASET,
        instance_prompt="a photo of sks dog",
        class_prompt="a photo of dog",
        with_prior_preservation=True,
        max_train_steps=10,
        learning_rate=1e-3,
        resolution=64,
        checkpointing_steps=5,
        model_id="sks-dog",
    )
    return dataclasses.replace(spec, **overrides)


def _train(
    settings: StoreSettings, spec: JobSpec, job_id: str, tmp_path: Path, **kwargs: object
) -> tuple[TrainingResult, list[object]]:
    events: list[object] = []
    cancel = kwargs.pop("cancel", threading.Event())
    result = run_training(
        job_id,
        spec,
        store_settings=settings,
        prior_prefix=PRIORS,
        on_event=events.append,
        cancel=cancel,  # type: ignore[arg-type]
        storage_path=str(tmp_path / "ray-runs"),
        **kwargs,  # type: ignore[arg-type]
    )
    return result, events


def _download_logs(store: ObjectStore, job_id: str, folder: Path) -> list[str]:
    names = []
    for info in store.list(tensorboard_prefix(job_id)):
        names.append(info.key.removeprefix(tensorboard_prefix(job_id)))
        store.get_file(info.key, folder / names[-1])
    return names


def _steps(events: list[object]) -> list[int]:
    return [event.step for event in events if isinstance(event, ProgressEvent)]


def test_two_workers_with_priors_survive_a_worker_failure_and_publish_a_loadable_model(
    store: ObjectStore, model_store: ModelStore, s3_store_settings: StoreSettings, tmp_path: Path
) -> None:
    """One run covers the main path: DDP on 2 workers, prior preservation, a checkpoint at step
    5, the last rank failing once at step 7 (Ray restarts the group; it resumes from step 5),
    previews, publishing."""
    spec = _spec(num_workers=2, validation_prompts=("a sks dog at the beach",), validation_steps=5)
    result, events = _train(
        s3_store_settings,
        spec,
        "job-two-workers",
        tmp_path,
        step_callbacks=[FailOnce(step=7, marker=tmp_path / "failed-once")],
    )

    assert result == TrainingResult(model_id="sks-dog", final_step=10, resumed_from_step=0, restarts=1)
    assert _steps(events) == list(range(1, 11))  # steps 6-7 ran twice; watchers see each once
    progress = [event for event in events if isinstance(event, ProgressEvent)]
    assert all(p.total_steps == 10 and p.loss > 0 and p.samples_per_second > 0 for p in progress)
    assert [event.step for event in events if isinstance(event, CheckpointEvent)] == [5]
    previews = [event for event in events if isinstance(event, PreviewEvent)]
    prompt = spec.validation_prompts[0]
    assert [(p.step, p.prompt) for p in previews] == [(5, prompt), (10, prompt)]
    assert all(p.jpeg.startswith(b"\xff\xd8") for p in previews)
    assert isinstance(events[-1], PublishingEvent) and events[-1].step == 10

    manifest = model_store.get("sks-dog")
    assert (manifest.kind, manifest.base_model) == ("fine_tuned", TINY_MODEL_ID)
    assert manifest.training_job == "job-two-workers"
    pipe = load_pipeline(model_store.materialize("sks-dog"))
    image = pipe("a photo of sks dog", num_inference_steps=2, height=64, width=64).images[0]
    assert image.size == (64, 64)
    # Published: the job's checkpoints are no longer needed.
    assert checkpoints.newest_step(store, "job-two-workers") is None

    # Training logs: rank 0 alone wrote one event file per attempt, and TensorBoard's reader sees
    # one curve: the steps the first attempt logged after its checkpoint are replaced, not repeated.
    files = _download_logs(store, "job-two-workers", tmp_path / "logs")
    assert len(files) == result.restarts + 1, files
    logs = EventAccumulator(str(tmp_path / "logs"), size_guidance={"scalars": 0, "images": 0})
    logs.Reload()
    losses = logs.Scalars(tracking.LOSS)
    assert [event.step for event in losses] == list(range(1, 11))
    assert [e.value for e in losses] == pytest.approx([p.loss for p in progress], rel=1e-5)
    assert [event.step for event in logs.Scalars(tracking.GRAD_NORM)] == list(range(1, 11))
    assert [event.step for event in logs.Scalars(tracking.LEARNING_RATE + "unet")] == list(range(1, 11))
    assert [image.step for image in logs.Images(tracking.PREVIEW + "0")] == [5, 10]


@pytest.mark.slow
def test_a_failure_beyond_max_failures_says_why(
    store: ObjectStore, model_store: ModelStore, s3_store_settings: StoreSettings, tmp_path: Path
) -> None:
    spec = _spec(max_train_steps=4, checkpointing_steps=2)
    with pytest.raises(TrainingFailed, match="injected worker failure at step 3"):
        _train(
            s3_store_settings,
            spec,
            "job-fails",
            tmp_path,
            step_callbacks=[FailOnce(step=3, marker=tmp_path / "failed-once")],
            max_failures=0,
        )
    assert not model_store.exists("sks-dog")


def test_cancel_stops_the_run(
    store: ObjectStore, model_store: ModelStore, s3_store_settings: StoreSettings, tmp_path: Path
) -> None:
    spec = _spec(max_train_steps=100_000, checkpointing_steps=100_000)
    cancel = threading.Event()
    events: list[object] = []
    outcome: list[BaseException] = []

    def on_event(event: object) -> None:
        events.append(event)
        if isinstance(event, ProgressEvent) and event.step >= 3:
            cancel.set()

    def run() -> None:
        try:
            run_training(
                "job-cancel",
                spec,
                store_settings=s3_store_settings,
                prior_prefix=PRIORS,
                on_event=on_event,
                cancel=cancel,
                storage_path=str(tmp_path / "ray-runs"),
            )
        except BaseException as err:
            outcome.append(err)

    thread = threading.Thread(target=run)
    thread.start()
    assert cancel.wait(timeout=300), "training never started"
    thread.join(CANCEL_DEADLINE_S)
    assert not thread.is_alive(), "the run did not stop after cancel"
    assert len(outcome) == 1 and isinstance(outcome[0], TrainingCancelled)
    assert _steps(events)[-1] < spec.max_train_steps
    assert not model_store.exists("sks-dog")


@pytest.mark.slow
def test_a_restarted_trainer_resumes_from_the_newest_checkpoint(
    store: ObjectStore, model_store: ModelStore, s3_store_settings: StoreSettings, tmp_path: Path
) -> None:
    spec = _spec(max_train_steps=60, checkpointing_steps=5)
    cancel = threading.Event()

    def stop_after_first_checkpoint(event: object) -> None:
        if isinstance(event, CheckpointEvent):
            cancel.set()

    with pytest.raises(TrainingCancelled):
        run_training(
            "job-restart",
            spec,
            store_settings=s3_store_settings,
            prior_prefix=PRIORS,
            on_event=stop_after_first_checkpoint,
            cancel=cancel,
            storage_path=str(tmp_path / "ray-runs"),
        )
    newest = checkpoints.newest_step(store, "job-restart")
    assert newest is not None and newest % 5 == 0 and newest < 60

    # A new run_training call, as a restarted trainer makes: the step count continues.
    result, events = _train(s3_store_settings, spec, "job-restart", tmp_path)
    assert result.resumed_from_step == newest and result.final_step == 60
    assert _steps(events) == list(range(newest + 1, 61))


@pytest.mark.slow
def test_the_subject_loss_falls_by_more_than_half(
    store: ObjectStore, model_store: ModelStore, s3_store_settings: StoreSettings, tmp_path: Path
) -> None:
    """Measured on the tiny model (`subject_loss`: 4 subject images, fixed timesteps and noise;
    lr 1e-3 with priors): base 1.13; after 25 steps 0.54, 50: 0.44, 100: 0.36, 200: 0.28.
    After 100 steps the bound (half) leaves a wide margin."""
    spec = _spec(max_train_steps=100, checkpointing_steps=1000, model_id="learned-dog")
    _train(s3_store_settings, spec, "job-learn", tmp_path)

    images = [make_image(index) for index in range(SUBJECT_IMAGES)]
    before = subject_loss(model_store.materialize(TINY_MODEL_ID), images, spec.instance_prompt, resolution=64)
    after = subject_loss(model_store.materialize("learned-dog"), images, spec.instance_prompt, resolution=64)
    assert after < 0.5 * before
