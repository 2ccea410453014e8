"""Validate a requested training spec as a whole and resolve its defaults into a JobSpec.

Everything is checked before a job exists, so no GPU time is spent on a spec that cannot run.
Errors name the proto field (`spec.max_train_steps: ...`); an unknown base model or dataset is
NOT_FOUND naming it. Numeric fields in `SpecRequest` are None when the client did not set them
(proto3 `optional` presence) and carry the sent value otherwise: a zero where zero makes no sense
(steps, learning rate) is an error, not a silent default.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from services.common.errors import AlreadyExists, InvalidArgument, NotFound
from services.common.model_store import ModelStore, blob_key, parse_model_name, validate_model_id
from services.trainer.dataset_layout import parse_dataset_name
from services.trainer.job_spec import JobSpec
from services.trainer.settings import SpecLimits

LR_SCHEDULES = ("constant", "constant_with_warmup", "cosine", "linear")
MIXED_PRECISIONS = ("no", "bf16", "fp16")
DEFAULT_LEARNING_RATE = 5e-6
DEFAULT_LORA_LEARNING_RATE = 1e-4
MAX_SEED = 2**32 - 1  # numpy and priorgen (seed + i) need non-negative 32-bit seeds
_TOKEN = re.compile(r"^\S{1,64}$")


@dataclass(frozen=True)
class SpecRequest:
    """A TrainingJobSpec as the client sent it, free of protobuf. None = not set."""

    base_model: str = ""  # resource name, models/{id}
    dataset: str = ""  # resource name, datasets/{sha256}
    instance_prompt: str = ""
    identifier_token: str = ""
    class_prompt: str = ""
    with_prior_preservation: bool = False
    prior_loss_weight: float | None = None
    num_class_images: int | None = None
    max_train_steps: int | None = None
    learning_rate: float | None = None
    train_text_encoder: bool = False
    text_encoder_learning_rate: float | None = None
    lr_schedule: str = ""  # "" = unspecified, else a name of LR_SCHEDULES (or an unknown value)
    lr_warmup_steps: int | None = None
    resolution: int | None = None
    train_batch_size: int | None = None
    gradient_accumulation_steps: int | None = None
    max_grad_norm: float | None = None
    mixed_precision: str = ""  # "" = unspecified, else a name of MIXED_PRECISIONS
    gradient_checkpointing: bool = False
    seed: int | None = None
    checkpointing_steps: int | None = None
    validation_prompts: tuple[str, ...] = ()
    validation_steps: int | None = None
    center_crop: bool = False
    random_flip: bool = False
    use_lora: bool = False
    lora_rank: int | None = None
    num_workers: int | None = None
    use_gpu: bool = False
    model_id: str = ""
    class_negative_prompt: str = ""
    prior_steps: int | None = None


@dataclass(frozen=True)
class BaseModelInfo:
    model_id: str
    kind: str  # "base" | "fine_tuned" | "lora"
    default_resolution: int | None  # from the UNet's sample_size; None when unknown


class ModelCatalog(Protocol):
    def describe(self, model_id: str) -> BaseModelInfo:
        """Raises NotFound when the model does not exist."""

    def exists(self, model_id: str) -> bool: ...


class DatasetCatalog(Protocol):
    def exists(self, dataset_id: str) -> bool: ...


class StoreModelCatalog:
    """ModelCatalog over the model store; reads only the manifest and the UNet config blob."""

    def __init__(self, models: ModelStore) -> None:
        self.models = models

    def exists(self, model_id: str) -> bool:
        return self.models.exists(model_id)

    def describe(self, model_id: str) -> BaseModelInfo:
        manifest = self.models.get(model_id)
        resolution = None
        entry = manifest.files.get("unet/config.json")
        if entry is not None:
            config = self.models.store.get_json(blob_key(entry.sha256))
            sample_size = config.get("sample_size")
            if isinstance(sample_size, int) and sample_size > 0:
                resolution = sample_size * 8  # the VAE downsamples by 8 (DESIGN §6)
        return BaseModelInfo(model_id=model_id, kind=manifest.kind, default_resolution=resolution)


GpuCounter = Callable[[], "int | None"]


def validate_spec(
    request: SpecRequest,
    *,
    limits: SpecLimits,
    models: ModelCatalog,
    datasets: DatasetCatalog,
    gpu_count: GpuCounter | None = None,
) -> JobSpec:
    """The resolved JobSpec, or the first problem as InvalidArgument / NotFound / AlreadyExists.

    `model_id` stays "" when not requested: the job id it defaults to does not exist yet.
    """
    # 1. Names of the inputs (format only; existence is checked last, it costs store reads).
    base_model = parse_model_name(request.base_model, "spec.base_model") if request.base_model else ""
    if not base_model:
        raise InvalidArgument("spec.base_model", "is required (a model name such as models/sd-1-5)")
    dataset = parse_dataset_name(request.dataset, "spec.dataset")

    # 2. Prompts.
    token = request.identifier_token or "sks"
    if not _TOKEN.match(token):
        raise InvalidArgument(
            "spec.identifier_token", f"must be one word of at most 64 characters, got {token!r}"
        )
    instance_prompt = _prompt(request.instance_prompt, "spec.instance_prompt", limits, required=True)
    if not _contains_word(instance_prompt, token):
        raise InvalidArgument(
            "spec.instance_prompt",
            f"must contain the identifier token {token!r} (e.g. 'a photo of {token} dog'), "
            f"got {instance_prompt!r}",
        )
    class_prompt = _prompt(request.class_prompt, "spec.class_prompt", limits)
    class_negative_prompt = _prompt(request.class_negative_prompt, "spec.class_negative_prompt", limits)
    if request.with_prior_preservation:
        if not class_prompt:
            raise InvalidArgument(
                "spec.class_prompt", "is required with prior preservation (e.g. 'a photo of dog')"
            )
        if _contains_word(class_prompt, token):
            raise InvalidArgument(
                "spec.class_prompt",
                f"must describe the class in general, without the identifier token {token!r}",
            )
    if len(request.validation_prompts) > limits.max_validation_prompts:
        raise InvalidArgument(
            "spec.validation_prompts",
            f"at most {limits.max_validation_prompts} prompts, got {len(request.validation_prompts)}",
        )
    validation_prompts = tuple(
        _prompt(prompt, f"spec.validation_prompts[{i}]", limits, required=True)
        for i, prompt in enumerate(request.validation_prompts)
    )

    # 3. Steps and optimisation.
    max_train_steps = _int(request.max_train_steps, "spec.max_train_steps", 400, 1, limits.max_steps)
    use_lora = request.use_lora
    default_lr = DEFAULT_LORA_LEARNING_RATE if use_lora else DEFAULT_LEARNING_RATE
    learning_rate = _positive_float(request.learning_rate, "spec.learning_rate", default_lr, upper=1.0)
    text_lr = request.text_encoder_learning_rate
    text_encoder_learning_rate = (
        learning_rate
        if not text_lr
        else _positive_float(text_lr, "spec.text_encoder_learning_rate", 0, upper=1.0)
    )
    lr_schedule = _choice(request.lr_schedule, "spec.lr_schedule", LR_SCHEDULES, "constant")
    lr_warmup_steps = _int(request.lr_warmup_steps, "spec.lr_warmup_steps", 0, 0, max_train_steps)
    if lr_warmup_steps and lr_schedule == "constant":
        raise InvalidArgument(
            "spec.lr_warmup_steps",
            "the constant schedule has no warm-up: use constant_with_warmup, cosine or linear",
        )
    train_batch_size = _int(
        request.train_batch_size, "spec.train_batch_size", 1, 1, limits.max_batch_size, zero=True
    )
    gradient_accumulation_steps = _int(
        request.gradient_accumulation_steps,
        "spec.gradient_accumulation_steps",
        1,
        1,
        limits.max_gradient_accumulation_steps,
        zero=True,
    )
    max_grad_norm = _nonnegative_float(request.max_grad_norm, "spec.max_grad_norm", 1.0)
    prior_loss_weight = _nonnegative_float(
        request.prior_loss_weight, "spec.prior_loss_weight", 1.0, upper=1000.0
    )
    num_class_images = _int(
        request.num_class_images, "spec.num_class_images", 100, 1, limits.max_class_images, zero=True
    )
    prior_steps = _int(request.prior_steps, "spec.prior_steps", 30, 1, limits.max_prior_steps, zero=True)
    seed = _int(request.seed, "spec.seed", 0, 0, MAX_SEED)
    checkpointing_steps = _int(
        request.checkpointing_steps, "spec.checkpointing_steps", 100, 1, limits.max_steps, zero=True
    )
    validation_steps = _int(request.validation_steps, "spec.validation_steps", 0, 0, limits.max_steps)
    if validation_steps and not validation_prompts:
        raise InvalidArgument("spec.validation_steps", "needs at least one of spec.validation_prompts")
    lora_rank = _int(request.lora_rank, "spec.lora_rank", 4, 1, limits.max_lora_rank, zero=True)

    # 4. Resources.
    num_workers = _int(request.num_workers, "spec.num_workers", 1, 1, limits.max_workers, zero=True)
    use_gpu = request.use_gpu
    mixed_precision = _choice(
        request.mixed_precision, "spec.mixed_precision", MIXED_PRECISIONS, "bf16" if use_gpu else "no"
    )
    if mixed_precision != "no" and not use_gpu:
        raise InvalidArgument(
            "spec.mixed_precision",
            f"{mixed_precision} needs use_gpu (training on CPU runs in fp32: use 'no')",
        )
    if use_gpu and gpu_count is not None:
        gpus = gpu_count()
        if gpus is not None and gpus < num_workers:
            raise InvalidArgument(
                "spec.use_gpu",
                f"the Ray cluster has {gpus} GPUs; {num_workers} GPU workers need {num_workers}",
            )

    model_id = ""
    if request.model_id:
        model_id = validate_model_id(request.model_id, "spec.model_id")

    # 5. Things in the store: the base model, its default resolution, the dataset, the output id.
    try:
        base = models.describe(base_model)
    except NotFound:
        raise NotFound(
            "spec.base_model", f"spec.base_model: model {request.base_model!r} not found"
        ) from None
    if base.kind == "lora":
        raise InvalidArgument(
            "spec.base_model", f"{request.base_model} is a LoRA adapter; fine-tune its base model"
        )
    resolution = request.resolution or base.default_resolution or 512
    if resolution % 8:
        raise InvalidArgument("spec.resolution", f"must be a multiple of 8, got {resolution}")
    if not limits.min_resolution <= resolution <= limits.max_resolution:
        raise InvalidArgument(
            "spec.resolution",
            f"must be between {limits.min_resolution} and {limits.max_resolution}, got {resolution}",
        )
    if not datasets.exists(dataset):
        raise NotFound(
            "spec.dataset", f"spec.dataset: dataset {request.dataset!r} not found (upload it first)"
        )
    if model_id and models.exists(model_id):
        raise AlreadyExists(f"spec.model_id: model {model_id!r} already exists; choose another id")

    return JobSpec(
        base_model=base_model,
        dataset=dataset,
        instance_prompt=instance_prompt,
        identifier_token=token,
        class_prompt=class_prompt,
        with_prior_preservation=request.with_prior_preservation,
        prior_loss_weight=prior_loss_weight,
        num_class_images=num_class_images,
        max_train_steps=max_train_steps,
        learning_rate=learning_rate,
        train_text_encoder=request.train_text_encoder,
        text_encoder_learning_rate=text_encoder_learning_rate,
        lr_schedule=lr_schedule,  # type: ignore[arg-type]
        lr_warmup_steps=lr_warmup_steps,
        resolution=resolution,
        train_batch_size=train_batch_size,
        gradient_accumulation_steps=gradient_accumulation_steps,
        max_grad_norm=max_grad_norm,
        mixed_precision=mixed_precision,  # type: ignore[arg-type]
        gradient_checkpointing=request.gradient_checkpointing,
        seed=seed,
        checkpointing_steps=checkpointing_steps,
        validation_prompts=validation_prompts,
        validation_steps=validation_steps,
        center_crop=request.center_crop,
        random_flip=request.random_flip,
        use_lora=use_lora,
        lora_rank=lora_rank,
        num_workers=num_workers,
        use_gpu=use_gpu,
        model_id=model_id,
        class_negative_prompt=class_negative_prompt,
        prior_steps=prior_steps,
    )


def _contains_word(text: str, word: str) -> bool:
    return re.search(rf"(?<!\S){re.escape(word)}(?![^\s,.;:!?])", text) is not None


def _prompt(value: str, field: str, limits: SpecLimits, *, required: bool = False) -> str:
    text = value.strip()
    if required and not text:
        raise InvalidArgument(field, "is required")
    if len(text) > limits.max_prompt_chars:
        raise InvalidArgument(field, f"is {len(text)} characters; the limit is {limits.max_prompt_chars}")
    return text


def _int(value: int | None, field: str, default: int, low: int, high: int, *, zero: bool = False) -> int:
    """`zero=True`: 0 means "not set" too (fields whose zero has no meaning of its own)."""
    if value is None or (zero and value == 0):
        return default
    if not low <= value <= high:
        raise InvalidArgument(field, f"must be between {low} and {high}, got {value}")
    return value


def _positive_float(value: float | None, field: str, default: float, *, upper: float) -> float:
    if value is None:
        return default
    if not math.isfinite(value) or value <= 0:
        raise InvalidArgument(field, f"must be a positive number, got {value}")
    if value > upper:
        raise InvalidArgument(field, f"must be at most {upper}, got {value}")
    return float(value)


def _nonnegative_float(value: float | None, field: str, default: float, *, upper: float = 1e6) -> float:
    """0 means "not set" (proto3 zero value) and takes the default."""
    if value is None or value == 0:
        return default
    if not math.isfinite(value) or value < 0:
        raise InvalidArgument(field, f"must be a non-negative number, got {value}")
    if value > upper:
        raise InvalidArgument(field, f"must be at most {upper}, got {value}")
    return float(value)


def _choice(value: str, field: str, allowed: tuple[str, ...], default: str) -> str:
    if not value:
        return default
    if value not in allowed:
        raise InvalidArgument(field, f"must be one of {', '.join(allowed)}, got {value!r}")
    return value
