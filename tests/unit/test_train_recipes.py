"""The training recipes of the spec (min-SNR-gamma weighting, offset noise, EMA of the weights,
the prodigy and 8-bit AdamW optimizers, DoRA adapters), in one process with the tiny model:
each does what its formula says, changes the run, and resumes where it stopped; a DoRA model is
served by the inference core."""

from __future__ import annotations

import asyncio
import dataclasses
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr
from prometheus_client import CollectorRegistry
from safetensors.torch import load_file, save_file

from services.common.local_store import LocalObjectStore
from services.common.model_store import ModelStore
from services.common.settings import StoreSettings
from services.inference.core import InferenceCore
from services.inference.metrics import InferenceMetrics
from services.inference.params import FinalImage, GenerateParams
from services.inference.settings import InferenceSettings
from services.trainer.job_spec import JobSpec
from services.trainer.training_events import ProgressEvent
from services.trainer.worker import checkpoints
from services.trainer.worker.loop import train
from services.trainer.worker.loss import draw_noise, dreambooth_loss
from services.trainer.worker.models import configure_trainable, load_base_model
from services.trainer.worker.publish import LORA_INFO_FILE, LORA_WEIGHTS_FILE
from services.trainer.worker.runtime import Runtime, WorkerJob
from services.trainer.worker.snr import min_snr_weights, signal_to_noise
from services.trainer.worker.training_data import prepare_data, step_generator
from tests.fixtures.models import TINY_MODEL_ID
from tests.fixtures.tiny_training import CancelAfterCheckpoint, stock_store

DATASET = "e" * 64
PRIORS = "priors/recipes/"
UNET_FILE = "unet/diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> StoreSettings:
    """A local store with the tiny model, a 4-image dataset and 4 class-prior images (shared by
    the module's runs: each publishes under its own model id)."""
    root = tmp_path_factory.mktemp("recipes")
    return stock_store(root, tiny_model_dir, DATASET, PRIORS, images=4, prior_seed=200)


def _spec(**overrides: Any) -> JobSpec:
    base = JobSpec(
        base_model=TINY_MODEL_ID,
        dataset=DATASET,
        instance_prompt="a photo of sks dog",
        class_prompt="a photo of dog",
        with_prior_preservation=True,
        max_train_steps=3,
        learning_rate=1e-3,
        resolution=64,
        checkpointing_steps=2,
    )
    return dataclasses.replace(base, **overrides)


def _run(settings: StoreSettings, spec: JobSpec, runtime: Runtime | None = None) -> Runtime:
    runtime = runtime or Runtime()
    train(WorkerJob(f"job-{spec.model_id}", spec, settings, PRIORS), runtime)
    return runtime


def _models(settings: StoreSettings) -> ModelStore:
    return ModelStore(LocalObjectStore(Path(settings.store_dir)), Path(settings.cache_dir))


def _published(settings: StoreSettings, model_id: str, file: str = UNET_FILE) -> dict[str, torch.Tensor]:
    return load_file(str(_models(settings).materialize(model_id) / file))


def _losses(runtime: Runtime) -> list[float]:
    return [event.loss for event in runtime.events if isinstance(event, ProgressEvent)]


def _step_sizes(runtime: Runtime) -> list[float]:
    return [event.learning_rate for event in runtime.events if isinstance(event, ProgressEvent)]


def _assert_same_weights(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(actual) == sorted(expected)
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, rtol=1e-5, atol=1e-6, msg=name)


_PLAIN: dict[bool, tuple[list[float], str]] = {}


def _plain_run(settings: StoreSettings, use_lora: bool) -> tuple[list[float], str]:
    """The run without any recipe (its loss curve, its model id), once per module."""
    if use_lora not in _PLAIN:
        model_id = "plain-lora" if use_lora else "plain"
        lr = 1e-2 if use_lora else 1e-3
        runtime = _run(settings, _spec(model_id=model_id, use_lora=use_lora, learning_rate=lr))
        _PLAIN[use_lora] = (_losses(runtime), model_id)
    return _PLAIN[use_lora]


# Min-SNR-gamma weighting


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_are_the_papers_formula(tiny_model_dir: Path, prediction_type: str) -> None:
    scheduler = DDPMScheduler.from_pretrained(tiny_model_dir, subfolder="scheduler")
    scheduler = DDPMScheduler.from_config(scheduler.config, prediction_type=prediction_type)
    timesteps = torch.tensor([0, 30, 120, 400, 700, 999])
    gamma = 5.0
    cumulative = scheduler.alphas_cumprod[timesteps].double()
    snr = cumulative / (1 - cumulative)
    assert (snr > gamma).any() and (snr < gamma).any()  # both sides of the clip are exercised
    clipped = torch.minimum(snr, torch.tensor(gamma, dtype=torch.float64))
    expected = clipped / (snr + 1) if prediction_type == "v_prediction" else clipped / snr

    torch.testing.assert_close(signal_to_noise(scheduler, timesteps), compute_snr(scheduler, timesteps))
    weights = min_snr_weights(scheduler, timesteps, gamma)
    torch.testing.assert_close(weights, expected.float(), rtol=1e-5, atol=0)
    if prediction_type == "epsilon":
        assert weights[-1] == 1.0 and weights[0] < 0.01  # noisy steps keep their loss, clean ones lose it


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_the_loss_weights_each_examples_mse_by_its_timesteps_snr_weight(
    settings: StoreSettings, tiny_model_dir: Path, prediction_type: str
) -> None:
    """One instance and one class example: the weighted losses are the plain ones x each example's
    weight (instance and prior parts apart), with gamma between the two examples' SNRs."""
    spec = _spec(train_batch_size=1, prior_loss_weight=0.7)
    models = load_base_model(tiny_model_dir)
    config = models.noise_scheduler.config
    models.noise_scheduler = DDPMScheduler.from_config(config, prediction_type=prediction_type)
    device = torch.device("cpu")
    configure_trainable(models, spec, device, torch.float32)
    store = LocalObjectStore(Path(settings.store_dir))
    data = prepare_data(WorkerJob("job-snr", spec, settings, PRIORS), models, store, device)
    timesteps: list[torch.Tensor] = []
    models.unet.register_forward_pre_hook(lambda module, args: timesteps.append(args[1].clone()))

    def loss(gamma: float) -> tuple[float, float]:
        weighted = dataclasses.replace(spec, snr_gamma=gamma)
        generator = step_generator(spec.seed, 0, 5, 0)  # the same draws every time
        with torch.no_grad():
            total, instance = dreambooth_loss(
                models.unet, models.text_encoder, models, data, weighted, generator, device, [0]
            )
        return float(total), float(instance)

    plain_total, plain_instance = loss(0.0)
    snr = signal_to_noise(models.noise_scheduler, timesteps[0])
    gamma = math.sqrt(float(snr[0] * snr[1]))  # one example clipped, the other not
    weighted_total, weighted_instance = loss(gamma)
    assert torch.equal(timesteps[0], timesteps[1])  # the same draws: only the weighting differs
    weights = min_snr_weights(models.noise_scheduler, timesteps[0], gamma)
    expected_weights = torch.minimum(snr, torch.tensor(gamma)) / (
        snr + 1 if prediction_type == "v_prediction" else snr
    )
    torch.testing.assert_close(weights, expected_weights)
    assert not torch.allclose(weights, torch.ones(2))
    plain_prior = (plain_total - plain_instance) / 0.7
    assert weighted_instance == pytest.approx(float(weights[0]) * plain_instance, rel=1e-5)
    expected_total = float(weights[0]) * plain_instance + 0.7 * float(weights[1]) * plain_prior
    assert weighted_total == pytest.approx(expected_total, rel=1e-5)


# Offset noise


def test_offset_noise_adds_one_draw_per_example_and_channel_deterministically() -> None:
    shape = torch.Size((2, 4, 8, 8))
    plain = draw_noise(shape, step_generator(7, 0, 3, 0), 0.0)
    offset = draw_noise(shape, step_generator(7, 0, 3, 0), 0.1)

    generator = step_generator(7, 0, 3, 0)
    noise = torch.randn(shape, generator=generator)
    extra = torch.randn((2, 4, 1, 1), generator=generator)
    assert torch.equal(plain, noise)  # off: exactly the draw there was without the recipe
    torch.testing.assert_close(offset, noise + 0.1 * extra)
    shift = offset - plain
    assert shift.abs().min() > 0
    torch.testing.assert_close(shift, shift[:, :, :1, :1].expand(shape))  # one value per (example, channel)
    assert torch.equal(draw_noise(shape, step_generator(7, 0, 3, 0), 0.1), offset)  # same (seed, step)
    assert not torch.equal(draw_noise(shape, step_generator(7, 0, 4, 0), 0.1), offset)  # another step
    assert not torch.equal(draw_noise(shape, step_generator(8, 0, 3, 0), 0.1), offset)  # another seed


# EMA


def test_the_published_model_is_the_average_of_the_weights(settings: StoreSettings) -> None:
    """Two steps with ema_decay 0.5: the first update copies the weights, the second mixes in
    min(0.5, 2 / 11) of them (diffusers' EMAModel schedule). The raw weights of each step come
    from runs without EMA (the same draws: EMA never changes training)."""
    raw_one = _run(settings, _spec(model_id="raw-1", max_train_steps=1))
    raw_two = _run(settings, _spec(model_id="raw-2", max_train_steps=2))
    averaged = _run(settings, _spec(model_id="ema-2", max_train_steps=2, ema_decay=0.5))

    assert _losses(averaged) == _losses(raw_two) and _losses(raw_one) == _losses(raw_two)[:1]
    first, second = _published(settings, "raw-1"), _published(settings, "raw-2")
    published = _published(settings, "ema-2")
    decay = 2 / 11
    expected = {name: decay * first[name] + (1 - decay) * value for name, value in second.items()}
    _assert_same_weights(published, expected)
    changed = [name for name, value in second.items() if not torch.equal(value, first[name])]
    assert changed and any(not torch.allclose(published[name], second[name]) for name in changed)
    assert _models(settings).get("ema-2").labels["ema_decay"] == "0.5"


# Each recipe: changes the run, and a run stopped at a checkpoint resumes onto the same curve.

RECIPES = {
    "snr-gamma": {"snr_gamma": 0.1},  # low: the first steps' timesteps are all noisy (SNR < 1)
    "noise-offset": {"noise_offset": 0.1},
    "ema": {"ema_decay": 0.9},
    "prodigy": {"optimizer": "prodigy", "learning_rate": 1.0},
    "dora-ema": {"use_lora": True, "use_dora": True, "ema_decay": 0.9, "learning_rate": 1e-2},
    # The full UNet: bitsandbytes keeps tensors under 4096 elements (all the tiny model's LoRA
    # weights) in 32 bits, where 8-bit AdamW is AdamW.
    "adamw-8bit": {"optimizer": "adamw_8bit"},
}


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_a_recipe_changes_the_run_and_resumes_onto_the_same_curve(
    settings: StoreSettings, recipe: str
) -> None:
    changes = RECIPES[recipe]
    if changes.get("optimizer") == "adamw_8bit":
        pytest.importorskip("bitsandbytes", reason="adamw_8bit needs the adamw-8bit extra")
    use_lora = bool(changes.get("use_lora"))
    weights_file = LORA_WEIGHTS_FILE if use_lora else UNET_FILE
    straight = _run(settings, _spec(model_id=f"{recipe}-straight", **changes))

    interrupted = CancelAfterCheckpoint()
    spec = _spec(model_id=f"{recipe}-resumed", **changes)
    _run(settings, spec, interrupted)
    store = LocalObjectStore(Path(settings.store_dir))
    assert checkpoints.newest_step(store, f"job-{recipe}-resumed") == 2
    assert not _models(settings).exists(spec.model_id)
    resumed = _run(settings, spec)

    assert _losses(resumed) == pytest.approx(_losses(straight)[2:], rel=1e-5)
    assert _step_sizes(resumed) == pytest.approx(_step_sizes(straight)[2:], rel=1e-5)
    published = _published(settings, spec.model_id, weights_file)
    _assert_same_weights(published, _published(settings, f"{recipe}-straight", weights_file))

    plain_losses, plain_id = _plain_run(settings, use_lora)
    if set(changes) - {"ema_decay", "use_lora", "learning_rate"}:  # the recipe changes training
        assert _losses(straight) != plain_losses
    if "ema_decay" in changes:  # it changes what is published
        plain = _published(settings, plain_id, weights_file)
        assert any(not torch.allclose(published[name], plain[name]) for name in plain)


def test_prodigy_moves_the_weights_by_its_own_step_size(settings: StoreSettings) -> None:
    runtime = _run(settings, _spec(model_id="prodigy-steps", optimizer="prodigy", learning_rate=1.0))
    sizes = _step_sizes(runtime)
    assert sizes[0] == pytest.approx(1e-6)  # lr 1.0 x Prodigy's starting estimate d0
    assert all(size >= sizes[0] for size in sizes)
    base = _published(settings, TINY_MODEL_ID)
    trained = _published(settings, "prodigy-steps")
    assert any(not torch.equal(trained[name], base[name]) for name in base)


# DoRA


def test_dora_publishes_magnitudes_beside_the_low_rank_weights(settings: StoreSettings) -> None:
    spec = _spec(
        model_id="dora-published",
        use_lora=True,
        use_dora=True,
        train_text_encoder=True,
        learning_rate=1e-2,
        max_train_steps=2,
    )
    _run(settings, spec)
    manifest = _models(settings).get("dora-published")
    assert manifest.kind == "lora" and manifest.labels["method"] == "dreambooth-dora"
    weights = _published(settings, "dora-published", LORA_WEIGHTS_FILE)
    for component in ("unet", "text_encoder"):
        magnitudes = [key for key in weights if key.startswith(component) and "lora_magnitude_vector" in key]
        downs = [key for key in weights if key.startswith(component) and key.endswith("down.weight")]
        assert magnitudes and len(magnitudes) == len(downs), component
    info = (_models(settings).materialize("dora-published") / LORA_INFO_FILE).read_text()
    assert '"use_dora": true' in info


def test_a_dora_model_is_served_on_its_base_with_its_magnitudes(
    settings: StoreSettings, tmp_path: Path
) -> None:
    """The inference core serves the published DoRA adapter on the resident base: its images
    differ from the base's, and from the same adapter without its magnitudes (plain LoRA)."""
    _run(settings, _spec(model_id="dora-served", use_lora=True, use_dora=True, learning_rate=1e-2))
    models = _models(settings)
    weights = _published(settings, "dora-served", LORA_WEIGHTS_FILE)
    without = tmp_path / "without-magnitudes"
    without.mkdir()
    save_file(
        {k: v for k, v in weights.items() if "lora_magnitude_vector" not in k}, without / LORA_WEIGHTS_FILE
    )
    models.import_folder(without, "dora-as-lora", kind="lora", base_model=TINY_MODEL_ID)

    inference = InferenceSettings(
        store=StoreSettings(store_dir=settings.store_dir, cache_dir=str(tmp_path / "inference-cache")),
        default_model="",
    )
    core = InferenceCore(inference, _models(settings), InferenceMetrics.create(CollectorRegistry()))
    core.start()
    try:

        async def images(model_id: str) -> bytes:
            params = GenerateParams(model_id, "a photo of sks dog", steps=3, seed=1)
            finals = [event async for event in core.generate(params) if isinstance(event, FinalImage)]
            return finals[0].image.data

        async def all_three() -> list[bytes]:
            return [await images(model_id) for model_id in (TINY_MODEL_ID, "dora-served", "dora-as-lora")]

        base, dora, as_lora = asyncio.run(all_three())
    finally:
        core.close()
    assert dora != base and dora != as_lora
