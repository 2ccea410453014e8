"""The training loop in one process (the single-process Runtime, tiny model, local store):
resume continues the same run, LoRA publishes adapters only, the text encoder trains, schedules
follow the spec."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from services.common.local_store import LocalObjectStore
from services.common.model_store import ModelStore
from services.common.pipelines import load_pipeline
from services.common.settings import StoreSettings
from services.trainer.dataset_layout import write_dataset
from services.trainer.job_spec import Concept, JobSpec
from services.trainer.training_events import (
    PreviewEvent,
    ProgressEvent,
    PublishedEvent,
    PublishingEvent,
    StartedEvent,
)
from services.trainer.worker import checkpoints
from services.trainer.worker.loop import train
from services.trainer.worker.publish import LORA_INFO_FILE, LORA_WEIGHTS_FILE, load_lora_pipeline
from services.trainer.worker.runtime import Runtime, WorkerJob
from tests.fixtures.models import TINY_MODEL_ID
from tests.fixtures.tiny_training import CancelAfterCheckpoint, stock_store
from tests.fixtures.trainer_server import make_png

DATASET = "d" * 64
PRIORS = "priors/test/"


@pytest.fixture
def settings(tmp_path: Path, tiny_model_dir: Path) -> StoreSettings:
    """A local store holding the tiny model, a 4-image dataset and 4 class-prior images."""
    return stock_store(tmp_path, tiny_model_dir, DATASET, PRIORS, images=4, prior_seed=100)


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
        model_id="fine-tuned",
    )
    return dataclasses.replace(base, **overrides)


def _run(settings: StoreSettings, spec: JobSpec, job_id: str, runtime: Runtime | None = None) -> Runtime:
    runtime = runtime or Runtime()
    train(WorkerJob(job_id, spec, settings, PRIORS), runtime)
    return runtime


def _models(settings: StoreSettings) -> ModelStore:
    return ModelStore(LocalObjectStore(Path(settings.store_dir)), Path(settings.cache_dir))


def _unet_weights(settings: StoreSettings, model_id: str) -> dict[str, torch.Tensor]:
    folder = _models(settings).materialize(model_id)
    return load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))


def _progress(runtime: Runtime) -> list[ProgressEvent]:
    return [event for event in runtime.events if isinstance(event, ProgressEvent)]


def test_a_resumed_run_ends_where_the_uninterrupted_run_ends(settings: StoreSettings) -> None:
    straight = _run(settings, _spec(model_id="straight"), "job-straight")

    interrupted = CancelAfterCheckpoint()  # stops at the first step after checkpoint 2
    _run(settings, _spec(model_id="resumed"), "job-resumed", interrupted)
    store = LocalObjectStore(Path(settings.store_dir))
    assert checkpoints.newest_step(store, "job-resumed") == 2
    assert [p.step for p in _progress(interrupted)] == [1, 2, 3]
    assert not _models(settings).exists("resumed")

    resumed = _run(settings, _spec(model_id="resumed"), "job-resumed")
    assert StartedEvent(step=2, world_size=1) in resumed.events
    assert [p.step for p in _progress(resumed)] == [3, 4]
    # Same draws, same optimizer state: the resumed curve is the uninterrupted one.
    assert [p.loss for p in _progress(resumed)] == pytest.approx(
        [p.loss for p in _progress(straight)][2:], rel=1e-5
    )
    straight_weights = _unet_weights(settings, "straight")
    resumed_weights = _unet_weights(settings, "resumed")
    for name, value in straight_weights.items():
        torch.testing.assert_close(resumed_weights[name], value, rtol=1e-5, atol=1e-6)


def test_a_two_subject_job_trains_both_resumes_exactly_and_publishes(settings: StoreSettings) -> None:
    store = LocalObjectStore(Path(settings.store_dir))
    cat_dataset, cat_priors = "c" * 64, "priors/cat/"
    write_dataset(store, cat_dataset, [make_png(200 + index) for index in range(3)])
    for index in range(2):
        store.put_bytes(f"{cat_priors}images/{index:05d}.png", make_png(300 + index))
    cat = Concept(cat_dataset, "a photo of zwx cat", "zwx", "a photo of cat")

    def run(model_id: str, runtime: Runtime | None = None) -> Runtime:
        runtime = runtime or Runtime()
        spec = _spec(additional_concepts=(cat,), model_id=model_id)
        train(
            WorkerJob(f"job-{model_id}", spec, settings, PRIORS, additional_prior_prefixes=(cat_priors,)),
            runtime,
        )
        return runtime

    alone = _run(settings, _spec(model_id="dog-alone"), "job-dog-alone")
    straight = run("two")
    # Seed 0, one example a step: step 1 trains the dog (the same draws as alone), step 2 the cat.
    losses, alone_losses = [p.loss for p in _progress(straight)], [p.loss for p in _progress(alone)]
    assert losses[0] == pytest.approx(alone_losses[0], rel=1e-6) and losses[1] != pytest.approx(
        alone_losses[1]
    )

    interrupted = CancelAfterCheckpoint()
    run("two-resumed", interrupted)
    assert [p.step for p in _progress(interrupted)] == [1, 2, 3]
    resumed = run("two-resumed")
    assert [p.step for p in _progress(resumed)] == [3, 4]
    assert [p.loss for p in _progress(resumed)] == pytest.approx(losses[2:], rel=1e-5)
    straight_weights, resumed_weights = _unet_weights(settings, "two"), _unet_weights(settings, "two-resumed")
    for name, value in straight_weights.items():
        torch.testing.assert_close(resumed_weights[name], value, rtol=1e-5, atol=1e-6)
    assert _models(settings).get("two-resumed").training_job == "job-two-resumed"


def test_a_run_publishes_a_fine_tuned_model_sharing_unchanged_blobs(settings: StoreSettings) -> None:
    runtime = _run(settings, _spec(max_train_steps=2, validation_prompts=("a sks dog",)), "job-1")

    kinds = [type(event) for event in runtime.events]
    assert kinds[0] is StartedEvent and kinds[-2:] == [PublishingEvent, PublishedEvent]
    assert kinds.count(PreviewEvent) == 1
    models = _models(settings)
    manifest, base = models.get("fine-tuned"), models.get(TINY_MODEL_ID)
    assert (manifest.kind, manifest.base_model, manifest.training_job) == (
        "fine_tuned",
        TINY_MODEL_ID,
        "job-1",
    )
    for path in ("vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        assert manifest.files[path] == base.files[path]
    unet = "unet/diffusion_pytorch_model.safetensors"
    assert manifest.files[unet] != base.files[unet]
    assert load_pipeline(models.materialize("fine-tuned")) is not None


def test_training_the_text_encoder_with_accumulation_and_a_warmup_schedule(settings: StoreSettings) -> None:
    spec = _spec(
        max_train_steps=3,
        train_text_encoder=True,
        text_encoder_learning_rate=5e-4,
        gradient_accumulation_steps=2,
        lr_schedule="constant_with_warmup",
        lr_warmup_steps=2,
        gradient_checkpointing=True,
    )
    runtime = _run(settings, spec, "job-te")

    # Linear warm-up over 2 steps (diffusers' schedule starts at 0), then constant.
    assert [p.learning_rate for p in _progress(runtime)] == pytest.approx([0.0, 5e-4, 1e-3])
    models = _models(settings)
    manifest, base = models.get("fine-tuned"), models.get(TINY_MODEL_ID)
    assert manifest.files["text_encoder/model.safetensors"] != base.files["text_encoder/model.safetensors"]


def test_lora_publishes_adapter_weights_only_and_loads_on_the_base(settings: StoreSettings) -> None:
    spec = _spec(max_train_steps=2, use_lora=True, lora_rank=4, model_id="lora-model")
    _run(settings, spec, "job-lora")

    models = _models(settings)
    manifest = models.get("lora-model")
    assert manifest.kind == "lora" and manifest.base_model == TINY_MODEL_ID
    assert sorted(manifest.files) == [LORA_INFO_FILE, LORA_WEIGHTS_FILE]
    assert manifest.size_bytes < models.get(TINY_MODEL_ID).size_bytes / 20
    pipe = load_lora_pipeline(models.materialize(TINY_MODEL_ID), models.materialize("lora-model"))
    image = pipe("a sks dog", num_inference_steps=2, height=64, width=64).images[0]
    assert image.size == (64, 64)


def test_lora_runs_resume_from_adapter_checkpoints(settings: StoreSettings) -> None:
    spec = _spec(use_lora=True, model_id="lora-resumed")
    interrupted = CancelAfterCheckpoint()
    _run(settings, spec, "job-lora-resume", interrupted)
    store = LocalObjectStore(Path(settings.store_dir))
    state = checkpoints.load(store, "job-lora-resume", 2)
    assert state.trainable and all("lora" in key for key in state.trainable)

    resumed = _run(settings, spec, "job-lora-resume")
    assert [p.step for p in _progress(resumed)] == [3, 4]
    assert _models(settings).get("lora-resumed").kind == "lora"


def test_a_base_stored_in_half_precision_trains_its_text_encoder(
    settings: StoreSettings, tiny_model_dir: Path, tmp_path: Path
) -> None:
    # The committed toy-world base is stored as float16; transformers loads a stored dtype as is.
    half = tmp_path / "half-model"
    shutil.copytree(tiny_model_dir, half)
    for weights in half.rglob("*.safetensors"):
        save_file({name: value.half() for name, value in load_file(str(weights)).items()}, str(weights))
    config = half / "text_encoder" / "config.json"
    config.write_text(config.read_text().replace('"float32"', '"float16"'))
    _models(settings).import_folder(half, "half-base")
    spec = _spec(base_model="half-base", max_train_steps=1, train_text_encoder=True, model_id="from-half")
    runtime = _run(settings, spec, "job-half")
    assert all(torch.isfinite(torch.tensor(p.loss)) for p in _progress(runtime))
    assert _models(settings).exists("from-half")
