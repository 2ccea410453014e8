"""The training recipes on local Ray (2 CPU workers, DDP over gloo) against the real S3 server:
a DoRA run with EMA, prodigy, min-SNR-gamma weighting and offset noise whose last rank fails
once after the checkpoint publishes the same adapter as the run that never failed."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from services.common.model_store import ModelStore
from services.common.object_store import ObjectStore
from services.common.settings import StoreSettings
from services.trainer.dataset_layout import write_dataset
from services.trainer.driver.run import run_training
from services.trainer.job_spec import JobSpec
from services.trainer.training_events import ProgressEvent, TrainingResult
from services.trainer.worker.publish import LORA_WEIGHTS_FILE
from tests.fixtures.models import TINY_MODEL_ID
from tests.fixtures.trainer_server import make_png
from tests.fixtures.worker_faults import FailOnce

pytestmark = [pytest.mark.usefixtures("ray_local"), pytest.mark.slow]

DATASET = "c" * 64
PRIORS = "priors/recipes/"


@pytest.fixture
def store(s3_store: ObjectStore, model_store: ModelStore) -> ObjectStore:
    write_dataset(s3_store, DATASET, [make_png(index) for index in range(4)])
    for index in range(4):
        s3_store.put_bytes(f"{PRIORS}images/{index:05d}.png", make_png(300 + index))
    return s3_store


def _spec(model_id: str) -> JobSpec:
    return JobSpec(
        base_model=TINY_MODEL_ID,
        dataset=DATASET,
        instance_prompt="a photo of sks dog",
        class_prompt="a photo of dog",
        with_prior_preservation=True,
        max_train_steps=4,
        learning_rate=1.0,
        resolution=64,
        checkpointing_steps=2,
        num_workers=2,
        use_lora=True,
        use_dora=True,
        ema_decay=0.9,
        optimizer="prodigy",
        snr_gamma=0.1,
        noise_offset=0.1,
        model_id=model_id,
    )


def _train(
    settings: StoreSettings, spec: JobSpec, tmp_path: Path, **kwargs: object
) -> tuple[TrainingResult, list[float]]:
    events: list[object] = []
    result = run_training(
        f"job-{spec.model_id}",
        spec,
        store_settings=settings,
        prior_prefix=PRIORS,
        on_event=events.append,
        cancel=threading.Event(),
        storage_path=str(tmp_path / f"ray-runs-{spec.model_id}"),
        **kwargs,  # type: ignore[arg-type]
    )
    return result, [event.loss for event in events if isinstance(event, ProgressEvent)]


def test_a_retried_worker_group_continues_every_recipes_state(
    store: ObjectStore, model_store: ModelStore, s3_store_settings: StoreSettings, tmp_path: Path
) -> None:
    straight, straight_losses = _train(s3_store_settings, _spec("recipes-straight"), tmp_path)
    retried, retried_losses = _train(
        s3_store_settings,
        _spec("recipes-retried"),
        tmp_path,
        step_callbacks=[FailOnce(step=3, marker=tmp_path / "failed-once")],
    )

    assert straight.restarts == 0 and retried.restarts == 1 and retried.final_step == 4
    assert retried_losses == pytest.approx(straight_losses, rel=1e-5)
    files = {
        model_id: load_file(str(model_store.materialize(model_id) / LORA_WEIGHTS_FILE))
        for model_id in ("recipes-straight", "recipes-retried")
    }
    assert any("lora_magnitude_vector" in key for key in files["recipes-straight"])
    for name, value in files["recipes-straight"].items():
        torch.testing.assert_close(files["recipes-retried"][name], value, rtol=1e-5, atol=1e-6)
