"""The training spec, declared once.

Every field of `TrainingJobSpec` has one row here: its type, its default (and its default under
LoRA), its bounds and its help. Everything else is derived from this table: the trainer's
`JobSpec` and `SpecRequest`, proto <-> spec conversion, the validation of single fields, and the
`dreambooth train` flags with their help. Cross-field rules (a class prompt with prior
preservation, warm-up only with a schedule that has one, ...) live in the trainer's validation.

One repeated message, `additional_concepts` (more subjects in one job), is a row whose `item` is
the dataclass of its items (`Concept`); that class's own rows (`CONCEPT_FIELDS`) are checked
like the spec's, each error naming the item (`spec.additional_concepts[1].instance_prompt`).

One convention for "unset", for every field: proto3 `optional` presence (enums included). An
unset field takes its default; a value that is set and not allowed is refused naming the field,
never replaced by the default. Adding a hyper-parameter end to end: the proto field, one row here,
and the training loop that reads it.

This module is pure Python (no gRPC, no torch): the client distribution ships it and the
services import it from there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from dreambooth.v1 import trainer_pb2

from dreambooth_client.vocabulary import MAX_SEED, MIN_SEED


def _enum_names(enum: Any, prefix: str) -> tuple[str, ...]:
    return tuple(
        value.name.removeprefix(prefix).lower()
        for value in sorted(enum.DESCRIPTOR.values, key=lambda value: value.number)
        if value.number
    )


LR_SCHEDULES = _enum_names(trainer_pb2.LrSchedule, "LR_SCHEDULE_")
MIXED_PRECISIONS = _enum_names(trainer_pb2.MixedPrecision, "MIXED_PRECISION_")
OPTIMIZERS = _enum_names(trainer_pb2.Optimizer, "OPTIMIZER_")
_SAME = object()  # lora_default: the same as `default`


@dataclass(frozen=True)
class SpecField:
    name: str  # the TrainingJobSpec field
    type: type  # int, float, bool, str, or tuple (repeated: strings, or `item`s)
    default: Any  # the resolved value when unset (see `derived` for fields resolved from others)
    help: str
    flag: str = ""  # the CLI flag; "" = --name-with-dashes
    lora_default: Any = _SAME
    derived: str = ""  # when non-empty, how the default follows from other fields (cross-field rule)
    low: float | str | None = None  # a number, or the name of a server limit
    high: float | str | None = None  # a number, or the name of a server limit (trainer SpecLimits)
    low_exclusive: bool = False  # the value must be greater than `low`
    high_exclusive: bool = False  # the value must be less than `high`
    multiple_of: int = 1
    choices: tuple[str, ...] = ()  # for enum fields: the values' names (proto name minus prefix, lower)
    pattern: str = ""  # a regular expression the whole value must match
    required: bool = False
    prompt: bool = False  # free text: stripped, at most the server's max_prompt_chars
    item: type | None = None  # a repeated message: the dataclass of its items (rows: item.FIELDS)

    @property
    def cli_flag(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")

    def default_for(self, use_lora: bool) -> Any:
        return self.default if self.lora_default is _SAME or not use_lora else self.lora_default


# The fields of one TrainingConcept (an additional subject); the spec's own dataset, prompts and
# identifier token are the first subject's.
CONCEPT_FIELDS: tuple[SpecField, ...] = (
    SpecField("dataset", str, "", "datasets/SHA256 of this subject's images", required=True),
    SpecField(
        "instance_prompt",
        str,
        "",
        'prompt naming this subject with its own identifier token, e.g. "a photo of zwx cat"',
        required=True,
        prompt=True,
    ),
    SpecField(
        "identifier_token",
        str,
        "",
        "rare word naming this subject, unlike every other subject's (one word, at most 64 characters)",
        required=True,
        pattern=r"\S{1,64}",
    ),
    SpecField(
        "class_prompt",
        str,
        "",
        'this subject\'s class for prior preservation, e.g. "a photo of cat"',
        prompt=True,
    ),
)


@dataclass(frozen=True)
class Concept:
    """One more subject of a multi-subject job (a `TrainingConcept`), e.g.
    `Concept("datasets/...", "a photo of zwx cat", "zwx", "a photo of cat")`. The SDK takes these
    in `additional_concepts`; the trainer keeps them, validated, in its JobSpec."""

    FIELDS: ClassVar[tuple[SpecField, ...]] = CONCEPT_FIELDS

    dataset: str
    instance_prompt: str
    identifier_token: str
    class_prompt: str = ""


FIELDS: tuple[SpecField, ...] = (
    SpecField(
        "base_model", str, "", "base model to fine-tune, e.g. tiny-sd or models/tiny-sd", required=True
    ),
    SpecField(
        "dataset",
        str,
        "",
        "datasets/SHA256 from an upload (the CLI also takes a local folder)",
        required=True,
    ),
    SpecField(
        "instance_prompt",
        str,
        "",
        'prompt naming the subject with the identifier token, e.g. "a photo of sks dog"',
        required=True,
        prompt=True,
    ),
    SpecField(
        "identifier_token",
        str,
        "sks",
        "rare word naming the subject (one word, at most 64 characters)",
        pattern=r"\S{1,64}",
    ),
    SpecField(
        "class_prompt",
        str,
        "",
        'the subject\'s class for prior preservation, e.g. "a photo of dog"',
        prompt=True,
    ),
    SpecField(
        "with_prior_preservation",
        bool,
        False,
        "train on class-prior images too (needs class_prompt)",
        flag="--prior-preservation",
    ),
    SpecField(
        "prior_loss_weight",
        float,
        1.0,
        "weight of the class-prior loss (> 0; to train without priors, turn prior preservation off)",
        low=0.0,
        low_exclusive=True,
        high=1000.0,
    ),
    SpecField("num_class_images", int, 100, "class-prior images to generate", low=1, high="max_class_images"),
    SpecField("class_negative_prompt", str, "", "negative prompt for the class-prior images", prompt=True),
    SpecField("prior_steps", int, 30, "denoising steps per class-prior image", low=1, high="max_prior_steps"),
    SpecField("max_train_steps", int, 400, "optimizer steps", flag="--steps", low=1, high="max_steps"),
    SpecField(
        "learning_rate",
        float,
        5e-6,
        "UNet learning rate (with the prodigy optimizer: the scale of its own estimate, 0.1..1, unset 1)",
        flag="--lr",
        lora_default=1e-4,
        low=0.0,
        low_exclusive=True,
        high=1.0,
    ),
    SpecField("train_text_encoder", bool, False, "train the text encoder too"),
    SpecField(
        "text_encoder_learning_rate",
        float,
        5e-6,
        "text-encoder learning rate",
        flag="--text-encoder-lr",
        derived="learning_rate",
        low=0.0,
        low_exclusive=True,
        high=1.0,
    ),
    SpecField("lr_schedule", str, "constant", "learning-rate schedule", choices=LR_SCHEDULES),
    SpecField(
        "lr_warmup_steps",
        int,
        0,
        "warm-up steps (schedules with warm-up only; at most max_train_steps)",
        flag="--warmup-steps",
        low=0,
        high="max_steps",
    ),
    SpecField(
        "resolution",
        int,
        512,
        "square training resolution, a multiple of 8",
        derived="the base model's",
        low="min_resolution",
        high="max_resolution",
        multiple_of=8,
    ),
    SpecField(
        "train_batch_size",
        int,
        1,
        "instance examples per worker per micro-batch",
        flag="--batch-size",
        low=1,
        high="max_batch_size",
    ),
    SpecField(
        "gradient_accumulation_steps",
        int,
        1,
        "micro-batches per optimizer step",
        flag="--grad-accum",
        low=1,
        high="max_gradient_accumulation_steps",
    ),
    SpecField("max_grad_norm", float, 1.0, "gradient-norm clip (0 = no clipping)", low=0.0, high=1e6),
    SpecField(
        "mixed_precision",
        str,
        "no",
        "precision of training (bf16/fp16 need use_gpu)",
        derived="bf16 with use_gpu, else no",
        choices=MIXED_PRECISIONS,
    ),
    SpecField("gradient_checkpointing", bool, False, "trade compute for memory"),
    SpecField("seed", int, 0, "seed of everything random in the run", low=MIN_SEED, high=MAX_SEED),
    SpecField(
        "checkpointing_steps",
        int,
        100,
        "save a resumable checkpoint every this many steps (0 = none: a failed run starts over)",
        low=0,
        high="max_steps",
    ),
    SpecField(
        "validation_prompts",
        tuple,
        (),
        "prompt sampled for previews during training (repeatable)",
        flag="--validation-prompt",
        high="max_validation_prompts",
        prompt=True,
    ),
    SpecField(
        "validation_steps",
        int,
        0,
        "sample previews every this many steps (0 = only at the end)",
        low=0,
        high="max_steps",
    ),
    SpecField("center_crop", bool, False, "centre-crop instead of random-crop to the resolution"),
    SpecField("random_flip", bool, False, "random horizontal flips"),
    SpecField("use_lora", bool, False, "train a LoRA adapter instead of the full UNet", flag="--lora"),
    SpecField("lora_rank", int, 4, "LoRA rank", low=1, high="max_lora_rank"),
    SpecField("num_workers", int, 1, "Ray Train workers", flag="--workers", low=1, high="max_workers"),
    SpecField("use_gpu", bool, False, "one GPU per worker", flag="--gpu"),
    SpecField("model_id", str, "", "id of the published model", derived="job-JOBID"),
    SpecField(
        "snr_gamma",
        float,
        0.0,
        "min-SNR-gamma loss weighting, e.g. 5 (0 = off)",
        low=0.0,
        high=1000.0,
    ),
    SpecField("noise_offset", float, 0.0, "offset noise, e.g. 0.05 (0 = off)", low=0.0, high=1.0),
    SpecField(
        "ema_decay",
        float,
        0.0,
        "publish an exponential moving average of the weights with this decay, e.g. 0.9999 (0 = off)",
        low=0.0,
        high=1.0,
        high_exclusive=True,
    ),
    SpecField(
        "optimizer",
        str,
        "adamw",
        "optimizer (adamw_8bit needs bitsandbytes on the trainer; prodigy sets its own step size)",
        choices=OPTIMIZERS,
    ),
    SpecField("use_dora", bool, False, "DoRA (weight-decomposed) adapters; needs --lora", flag="--dora"),
    SpecField(
        "additional_concepts",
        tuple,
        (),
        "another subject trained in the same job (repeatable): its images (a dataset or a local "
        "folder), its own identifier token, its instance prompt and, with prior preservation, its "
        "class prompt",
        flag="--concept",
        high="max_additional_concepts",
        item=Concept,
    ),
)

FIELDS_BY_NAME = {field.name: field for field in FIELDS}


def derived_model_id(job_id: str) -> str:
    """The published model's id when the spec names none."""
    return f"job-{job_id}"
