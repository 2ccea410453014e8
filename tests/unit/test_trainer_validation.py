"""CreateTrainingJob's spec validation: every bad field is refused naming it, defaults resolved."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from services.common.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from services.common.local_store import LocalObjectStore
from services.common.model_store import ModelStore
from services.trainer.jobs.datasets import DatasetStore
from services.trainer.jobs.validation import SpecRequest, StoreModelCatalog, validate_spec
from services.trainer.settings import SpecLimits
from tests.fixtures.trainer_server import make_dataset

LIMITS = SpecLimits()


@pytest.fixture(scope="module")
def env(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path
) -> tuple[StoreModelCatalog, DatasetStore, SpecRequest]:
    root = tmp_path_factory.mktemp("validation")
    store = LocalObjectStore(root / "store")
    models = ModelStore(store, root / "cache")
    models.import_folder(tiny_model_dir, "tiny-sd")
    datasets = DatasetStore(store)
    info = make_dataset(datasets, count=2)
    request = SpecRequest(
        base_model="models/tiny-sd",
        dataset=info.name,
        instance_prompt="a photo of sks dog",
        max_train_steps=10,
        learning_rate=1e-4,
    )
    return StoreModelCatalog(models), datasets, request


def validate(
    env: tuple[StoreModelCatalog, DatasetStore, SpecRequest], gpus: int | None = None, **changes: object
):
    models, datasets, request = env
    return validate_spec(
        dataclasses.replace(request, **changes),
        limits=LIMITS,
        models=models,
        datasets=datasets,
        gpu_count=lambda: gpus,
    )


def test_defaults_are_resolved(env) -> None:
    spec = validate(env, max_train_steps=None, learning_rate=None)
    assert spec.base_model == "tiny-sd"
    assert spec.dataset == env[2].dataset.removeprefix("datasets/")
    assert spec.resolution == 64  # the tiny UNet's sample_size 8 * 8
    assert spec.max_train_steps == 400
    assert spec.learning_rate == 5e-6
    assert spec.text_encoder_learning_rate == 5e-6
    assert spec.identifier_token == "sks"
    assert spec.lr_schedule == "constant"
    assert spec.mixed_precision == "no"
    assert (spec.train_batch_size, spec.gradient_accumulation_steps, spec.num_workers) == (1, 1, 1)
    assert (spec.num_class_images, spec.prior_steps, spec.checkpointing_steps) == (100, 30, 100)
    assert spec.model_id == ""  # the job id it defaults to does not exist yet


def test_lora_and_gpu_defaults(env) -> None:
    assert validate(env, use_lora=True, learning_rate=None).learning_rate == 1e-4
    assert validate(env, use_gpu=True, num_workers=2, use_lora=True).mixed_precision == "bf16"
    spec = validate(
        env, use_gpu=True, gpus=None, resolution=128, model_id="my-dog", validation_prompts=("sks dog",)
    )
    assert (spec.resolution, spec.model_id, spec.validation_prompts) == (128, "my-dog", ("sks dog",))


def test_given_values_are_kept(env) -> None:
    spec = validate(
        env,
        with_prior_preservation=True,
        class_prompt="a photo of dog",
        prior_loss_weight=0.5,
        num_class_images=8,
        lr_schedule="cosine",
        lr_warmup_steps=3,
        train_text_encoder=True,
        text_encoder_learning_rate=2e-5,
        seed=7,
        num_workers=2,
        checkpointing_steps=5,
    )
    assert spec.with_prior_preservation and spec.class_prompt == "a photo of dog"
    assert (spec.prior_loss_weight, spec.num_class_images, spec.lr_schedule, spec.lr_warmup_steps) == (
        0.5,
        8,
        "cosine",
        3,
    )
    assert (spec.text_encoder_learning_rate, spec.seed, spec.num_workers, spec.checkpointing_steps) == (
        2e-5,
        7,
        2,
        5,
    )


BAD_FIELDS = [
    ({"base_model": ""}, "spec.base_model"),
    ({"base_model": "tiny-sd"}, "spec.base_model"),
    ({"dataset": ""}, "spec.dataset"),
    ({"dataset": "datasets/not-a-digest"}, "spec.dataset"),
    ({"instance_prompt": ""}, "spec.instance_prompt"),
    ({"instance_prompt": "a photo of a dog"}, "spec.instance_prompt"),
    ({"instance_prompt": "a photo of sksdog"}, "spec.instance_prompt"),
    ({"instance_prompt": "x" * 1001 + " sks"}, "spec.instance_prompt"),
    ({"identifier_token": "two words"}, "spec.identifier_token"),
    ({"with_prior_preservation": True}, "spec.class_prompt"),
    ({"with_prior_preservation": True, "class_prompt": "a photo of sks dog"}, "spec.class_prompt"),
    ({"max_train_steps": 0}, "spec.max_train_steps"),
    ({"max_train_steps": -5}, "spec.max_train_steps"),
    ({"max_train_steps": 20_001}, "spec.max_train_steps"),
    ({"learning_rate": 0.0}, "spec.learning_rate"),
    ({"learning_rate": -1e-4}, "spec.learning_rate"),
    ({"learning_rate": float("nan")}, "spec.learning_rate"),
    ({"learning_rate": 2.0}, "spec.learning_rate"),
    ({"text_encoder_learning_rate": -1.0}, "spec.text_encoder_learning_rate"),
    ({"resolution": 100}, "spec.resolution"),
    ({"resolution": 8}, "spec.resolution"),
    ({"resolution": 4096}, "spec.resolution"),
    ({"resolution": -64}, "spec.resolution"),
    ({"num_workers": -1}, "spec.num_workers"),
    ({"num_workers": 9}, "spec.num_workers"),
    ({"train_batch_size": -1}, "spec.train_batch_size"),
    ({"gradient_accumulation_steps": 1000}, "spec.gradient_accumulation_steps"),
    ({"max_grad_norm": -1.0}, "spec.max_grad_norm"),
    ({"prior_loss_weight": -0.1}, "spec.prior_loss_weight"),
    ({"num_class_images": 1001}, "spec.num_class_images"),
    ({"prior_steps": 151}, "spec.prior_steps"),
    ({"checkpointing_steps": -1}, "spec.checkpointing_steps"),
    ({"seed": -1}, "spec.seed"),
    ({"lr_schedule": "unknown enum value 9"}, "spec.lr_schedule"),
    ({"lr_warmup_steps": 5}, "spec.lr_warmup_steps"),  # the constant schedule has no warm-up
    ({"lr_schedule": "cosine", "lr_warmup_steps": 11}, "spec.lr_warmup_steps"),
    ({"mixed_precision": "bf16"}, "spec.mixed_precision"),  # on CPU
    ({"mixed_precision": "fp8"}, "spec.mixed_precision"),
    ({"validation_prompts": ("",)}, "spec.validation_prompts[0]"),
    ({"validation_prompts": ("a",) * 9}, "spec.validation_prompts"),
    ({"validation_steps": 5}, "spec.validation_steps"),
    ({"lora_rank": 1000, "use_lora": True}, "spec.lora_rank"),
    ({"model_id": "Not Valid!"}, "spec.model_id"),
    ({"max_train_steps": 20_000, "train_batch_size": 64, "resolution": 1024}, "spec"),  # the cost ceiling
    ({"prior_loss_weight": 0.0}, "spec.prior_loss_weight"),  # was silently 1.0
    ({"snr_gamma": -5.0}, "spec.snr_gamma"),
    ({"noise_offset": -0.1}, "spec.noise_offset"),
    ({"noise_offset": 2.0}, "spec.noise_offset"),
    ({"ema_decay": 1.0}, "spec.ema_decay"),
    ({"ema_decay": 1.5}, "spec.ema_decay"),
    ({"ema_decay": -0.1}, "spec.ema_decay"),
    ({"use_dora": True}, "spec.use_dora"),  # without use_lora
    ({"optimizer": "unknown enum value 9"}, "spec.optimizer"),
    ({"optimizer": "unspecified"}, "spec.optimizer"),
    ({"optimizer": "prodigy", "learning_rate": 1e-4}, "spec.learning_rate"),  # an AdamW-sized rate
    (
        {"optimizer": "prodigy", "learning_rate": None, "text_encoder_learning_rate": 0.5},
        "spec.text_encoder_learning_rate",
    ),
]


@pytest.mark.parametrize(("changes", "field"), BAD_FIELDS, ids=[f for _, f in BAD_FIELDS])
def test_bad_field_is_invalid_argument_naming_it(env, changes: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        validate(env, **changes)
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ")


def test_recipe_defaults_are_off_and_prodigy_takes_its_own_learning_rate(env) -> None:
    spec = validate(env)
    assert (spec.snr_gamma, spec.noise_offset, spec.ema_decay, spec.optimizer, spec.use_dora) == (
        0.0,
        0.0,
        0.0,
        "adamw",
        False,
    )
    prodigy = validate(env, optimizer="prodigy", learning_rate=None, train_text_encoder=True)
    assert (prodigy.learning_rate, prodigy.text_encoder_learning_rate) == (1.0, 1.0)
    assert validate(env, optimizer="prodigy", learning_rate=0.5).learning_rate == 0.5
    assert validate(env, optimizer="prodigy", learning_rate=None, use_lora=True).learning_rate == 1.0
    dora = validate(env, use_lora=True, use_dora=True, ema_decay=0.999, snr_gamma=5.0, noise_offset=0.05)
    assert (dora.use_dora, dora.ema_decay, dora.snr_gamma, dora.noise_offset) == (True, 0.999, 5.0, 0.05)


def test_adamw_8bit_needs_bitsandbytes_on_the_trainer(env) -> None:
    models, datasets, request = env
    request = dataclasses.replace(request, optimizer="adamw_8bit")
    with pytest.raises(FailedPrecondition, match=r"^spec\.optimizer: adamw_8bit needs the bitsandbytes"):
        validate_spec(request, limits=LIMITS, models=models, datasets=datasets, installed=lambda name: False)
    spec = validate_spec(
        request,
        limits=LIMITS,
        models=models,
        datasets=datasets,
        installed=lambda name: name == "bitsandbytes",
    )
    assert spec.optimizer == "adamw_8bit"


def test_use_gpu_without_gpus_in_the_cluster(env) -> None:
    with pytest.raises(InvalidArgument) as info:
        validate(env, use_gpu=True, num_workers=2, gpus=1)
    assert info.value.field == "spec.use_gpu"
    assert "1 GPUs" in str(info.value)


def test_unknown_base_model_is_not_found_naming_it(env) -> None:
    with pytest.raises(NotFound) as info:
        validate(env, base_model="models/nope")
    assert "spec.base_model" in str(info.value) and "models/nope" in str(info.value)


def test_unknown_dataset_is_not_found_naming_it(env) -> None:
    missing = "datasets/" + "0" * 64
    with pytest.raises(NotFound) as info:
        validate(env, dataset=missing)
    assert "spec.dataset" in str(info.value) and missing in str(info.value)


def test_model_id_of_an_existing_model_is_already_exists(env) -> None:
    with pytest.raises(AlreadyExists) as info:
        validate(env, model_id="tiny-sd")
    assert "spec.model_id" in str(info.value)


def test_cheap_checks_come_before_store_lookups(env) -> None:
    """A spec with an unknown model AND a bad step count reports the field, not the lookup."""
    with pytest.raises(InvalidArgument) as info:
        validate(env, base_model="models/nope", max_train_steps=0)
    assert info.value.field == "spec.max_train_steps"
