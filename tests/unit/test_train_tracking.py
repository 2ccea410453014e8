"""Experiment tracking of the training loop in one process (the single-process Runtime, tiny model,
local store): TensorBoard event files in the store, read back with TensorBoard's own reader, a
cancelled-then-resumed job as one run, and MLflow on a local file store."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2

from services.common.local_store import LocalObjectStore
from services.common.object_store import ObjectStore
from services.common.settings import StoreSettings
from services.trainer.job_spec import JobSpec
from services.trainer.settings import TrackingSettings
from services.trainer.training_events import PreviewEvent, ProgressEvent
from services.trainer.training_logs_layout import is_event_file_name, tensorboard_prefix
from services.trainer.worker import mlflow_run, tracking
from services.trainer.worker.loop import train
from services.trainer.worker.runtime import Runtime, WorkerJob
from tests.fixtures.models import TINY_MODEL_ID
from tests.fixtures.tiny_training import CancelAfterCheckpoint, stock_store

DATASET = "e" * 64
PRIORS = "priors/tracking/"
EVERYTHING = {"scalars": 0, "images": 0, "tensors": 0}  # 0: keep every point (the default samples)


@pytest.fixture
def settings(tmp_path: Path, tiny_model_dir: Path) -> StoreSettings:
    """A local store holding the tiny model, a 2-image dataset and 2 class-prior images."""
    return stock_store(tmp_path, tiny_model_dir, DATASET, PRIORS, images=2, prior_seed=100)


def _spec(**overrides: object) -> JobSpec:
    base = JobSpec(
        base_model=TINY_MODEL_ID,
        dataset=DATASET,
        instance_prompt="a photo of sks dog",
        class_prompt="a photo of dog",
        with_prior_preservation=True,
        max_train_steps=4,
        learning_rate=1e-3,
        resolution=64,
        checkpointing_steps=2,
        model_id="tracked",
    )
    return dataclasses.replace(base, **overrides)


def _run(settings: StoreSettings, spec: JobSpec, job_id: str, runtime: Runtime, **job: object) -> Runtime:
    """What train_loop_per_worker does around the loop: train, then close the runtime."""
    try:
        train(WorkerJob(job_id, spec, settings, PRIORS, **job), runtime)  # type: ignore[arg-type]
    finally:
        runtime.close()
    return runtime


def _download_logs(store: ObjectStore, job_id: str, folder: Path) -> list[str]:
    names = []
    for info in store.list(tensorboard_prefix(job_id)):
        name = info.key.removeprefix(tensorboard_prefix(job_id))
        store.get_file(info.key, folder / name)
        names.append(name)
    return names


def _read(folder: Path) -> EventAccumulator:
    accumulator = EventAccumulator(str(folder), size_guidance=EVERYTHING)
    accumulator.Reload()
    return accumulator


def _points(accumulator: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(event.step, event.value) for event in accumulator.Scalars(tag)]


def _hparams(accumulator: EventAccumulator) -> dict[str, plugin_data_pb2.HParamsPluginData]:
    """The hparams plugin's records by what they hold: experiment, session_start_info, session_end_info."""
    records = {}
    for content in accumulator.PluginTagToContent("hparams").values():
        record = plugin_data_pb2.HParamsPluginData.FromString(content)
        records[record.WhichOneof("data")] = record
    return records


def _progress(runtime: Runtime) -> list[ProgressEvent]:
    return [event for event in runtime.events if isinstance(event, ProgressEvent)]


def test_a_run_logs_its_scalars_previews_and_hparams_to_the_store(
    settings: StoreSettings, tmp_path: Path
) -> None:
    spec = _spec(
        train_text_encoder=True,
        text_encoder_learning_rate=5e-4,
        validation_prompts=("a sks dog on the beach",),
        validation_steps=2,
    )
    runtime = _run(settings, spec, "job-tracked", Runtime())

    store = LocalObjectStore(Path(settings.store_dir))
    names = _download_logs(store, "job-tracked", tmp_path / "logs")
    assert len(names) == 1 and is_event_file_name(names[0]), names
    logs = _read(tmp_path / "logs")
    progress = _progress(runtime)
    assert _points(logs, tracking.LOSS) == [(p.step, pytest.approx(p.loss)) for p in progress]
    assert [step for step, _ in _points(logs, tracking.LOSS)] == [1, 2, 3, 4]
    unet_rates = _points(logs, tracking.LEARNING_RATE + "unet")
    assert unet_rates == [(p.step, pytest.approx(p.learning_rate)) for p in progress]
    assert _points(logs, tracking.LEARNING_RATE + "text_encoder") == [
        (s, pytest.approx(5e-4)) for s in (1, 2, 3, 4)
    ]
    for tag in (tracking.GRAD_NORM, tracking.SAMPLES_PER_SECOND):
        points = _points(logs, tag)
        assert [step for step, _ in points] == [1, 2, 3, 4] and all(value > 0 for _, value in points), tag

    previews = [event for event in runtime.events if isinstance(event, PreviewEvent)]
    images = logs.Images(tracking.PREVIEW + "0")
    assert [(image.step, image.encoded_image_string) for image in images] == [
        (p.step, p.jpeg) for p in previews
    ]
    assert [image.step for image in images] == [2, 4] and (images[0].width, images[0].height) == (64, 64)

    hparams = _hparams(logs)
    start = hparams["session_start_info"].session_start_info.hparams
    assert start["learning_rate"].number_value == pytest.approx(1e-3)
    assert start["instance_prompt"].string_value == "a photo of sks dog"
    assert start["train_text_encoder"].number_value == 1  # torch's writer stores booleans as numbers
    assert start["validation_prompts"].string_value == "a sks dog on the beach"
    assert [m.name.tag for m in hparams["experiment"].experiment.metric_infos] == [tracking.FINAL_LOSS]
    assert _points(logs, tracking.FINAL_LOSS) == [(4, pytest.approx(progress[-1].loss))]
    assert hparams["session_end_info"].session_end_info.status == api_pb2.STATUS_SUCCESS


def test_a_cancelled_then_resumed_job_is_one_run_with_every_step_once(
    settings: StoreSettings, tmp_path: Path
) -> None:
    spec = _spec(max_grad_norm=0.0)  # no clipping: the norm is measured all the same
    first = _run(settings, spec, "job-resumed", CancelAfterCheckpoint())
    assert [p.step for p in _progress(first)] == [1, 2, 3]

    # The cancel uploaded what the attempt wrote, to its last step; its hparams session stays open.
    store = LocalObjectStore(Path(settings.store_dir))
    _download_logs(store, "job-resumed", tmp_path / "cancelled")
    cancelled = _read(tmp_path / "cancelled")
    assert [step for step, _ in _points(cancelled, tracking.LOSS)] == [1, 2, 3]
    assert "session_start_info" in _hparams(cancelled) and "session_end_info" not in _hparams(cancelled)

    resumed = _run(settings, spec, "job-resumed", Runtime())  # from checkpoint 2: steps 3 and 4
    names = _download_logs(store, "job-resumed", tmp_path / "both")
    assert len(names) == 2, names  # one file per attempt, in one folder: one TensorBoard run
    both = _read(tmp_path / "both")
    losses = _points(both, tracking.LOSS)
    assert [step for step, _ in losses] == [1, 2, 3, 4]  # step 3 of the cancelled attempt is purged
    expected = [(p.step, pytest.approx(p.loss)) for p in _progress(first)[:2] + _progress(resumed)]
    assert losses == expected
    assert [step for step, _ in _points(both, tracking.GRAD_NORM)] == [1, 2, 3, 4]
    assert _hparams(both)["session_end_info"].session_end_info.status == api_pb2.STATUS_SUCCESS


def test_mlflow_gets_the_params_and_metrics_of_one_run_per_job(
    settings: StoreSettings, tmp_path: Path
) -> None:
    pytest.importorskip("mlflow", reason="MLflow is an optional extra (dreambooth-service[mlflow])")
    uri = f"file:{tmp_path / 'mlruns'}"
    mlflow_settings = TrackingSettings(mlflow_tracking_uri=uri, mlflow_experiment="dreambooth-tests")
    spec = _spec(max_train_steps=3)
    _run(settings, spec, "job-mlflow", CancelAfterCheckpoint(), tracking=mlflow_settings)
    resumed = _run(settings, spec, "job-mlflow", Runtime(), tracking=mlflow_settings)

    client = mlflow_run.mlflow_client(uri)
    experiment = client.get_experiment_by_name("dreambooth-tests")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1  # the resumed attempt continued the job's run
    run = runs[0]
    assert run.data.tags[mlflow_run.JOB_TAG] == "job-mlflow" and run.info.status == "FINISHED"
    assert run.data.params["learning_rate"] == "0.001" and run.data.params["max_train_steps"] == "3"
    history = client.get_metric_history(run.info.run_id, tracking.LOSS)
    assert sorted({m.step for m in history}) == [1, 2, 3]
    assert run.data.metrics[tracking.LOSS] == pytest.approx(_progress(resumed)[-1].loss)
    for tag in (tracking.GRAD_NORM, tracking.SAMPLES_PER_SECOND, tracking.LEARNING_RATE + "unet"):
        assert tag in run.data.metrics, tag
