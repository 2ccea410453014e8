"""Validate a requested training spec as a whole and resolve its defaults into a JobSpec.

Everything is checked before a job exists, so no GPU time is spent on a spec that cannot run.
Errors name the proto field (`spec.max_train_steps: ...`); an unknown base model or dataset is
NOT_FOUND naming it. Single fields are checked by the spec table's rows (`check_field`); this
module adds only the rules between fields and the lookups in the store. A field the client did
not set (None in `SpecRequest`) takes its default; a set value that is not allowed is an error,
never a silent default.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from services.common.cost import check_cost, training_cost
from services.common.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from services.common.model_store import ModelStore, blob_key, parse_model_name, validate_model_id
from services.trainer.dataset_layout import parse_dataset_name
from services.trainer.job_spec import FIELDS, FIELDS_BY_NAME, Concept, JobSpec, SpecRequest
from services.trainer.jobs.spec_fields import check_field
from services.trainer.settings import SpecLimits


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
CONCEPTS = "spec.additional_concepts"
PackageProbe = Callable[[str], bool]  # is this Python package installed here?


def package_installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def validate_spec(
    request: SpecRequest,
    *,
    limits: SpecLimits,
    models: ModelCatalog,
    datasets: DatasetCatalog,
    gpu_count: GpuCounter | None = None,
    installed: PackageProbe = package_installed,
) -> JobSpec:
    """The resolved JobSpec, or the first problem as InvalidArgument / NotFound / AlreadyExists.

    `model_id` stays "" when not requested: the job id it defaults to does not exist yet.
    """
    # 0. A bound on the work the steps below do.
    _check_concept_count(request, limits)

    # 1. Every field on its own (the table's rules); derived fields stay None until step 3.
    use_lora = bool(request.use_lora)
    values = {
        field.name: check_field(field, getattr(request, field.name), limits, use_lora) for field in FIELDS
    }

    # 2. Names of the inputs (format only; existence is checked last, it costs store reads).
    if not values["base_model"]:
        raise InvalidArgument("spec.base_model", "is required (a model name such as models/sd-1-5)")
    values["base_model"] = parse_model_name(values["base_model"], "spec.base_model")
    values["dataset"] = parse_dataset_name(values["dataset"], "spec.dataset")
    values["additional_concepts"] = tuple(
        dataclasses.replace(
            concept, dataset=parse_dataset_name(concept.dataset, f"{CONCEPTS}[{index}].dataset")
        )
        for index, concept in enumerate(values["additional_concepts"])
    )
    if values["model_id"]:
        values["model_id"] = validate_model_id(values["model_id"], "spec.model_id")

    # 3. Rules between fields, and defaults that follow from other fields.
    _check_prompts(values)
    _check_concepts(values)
    if values["validation_steps"] and not values["validation_prompts"]:
        raise InvalidArgument("spec.validation_steps", "needs at least one of spec.validation_prompts")
    if values["lr_warmup_steps"] > values["max_train_steps"]:
        raise InvalidArgument(
            "spec.lr_warmup_steps",
            f"must be at most max_train_steps ({values['max_train_steps']}), got {values['lr_warmup_steps']}",
        )
    if values["lr_warmup_steps"] and values["lr_schedule"] == "constant":
        raise InvalidArgument(
            "spec.lr_warmup_steps",
            "the constant schedule has no warm-up: use constant_with_warmup, cosine or linear",
        )
    if values["use_dora"] and not values["use_lora"]:
        raise InvalidArgument("spec.use_dora", "needs use_lora (DoRA is a kind of LoRA adapter)")
    if values["optimizer"] == "prodigy":
        _resolve_prodigy_rates(values, learning_rate_set=request.learning_rate is not None)
    if values["text_encoder_learning_rate"] is None:
        values["text_encoder_learning_rate"] = values["learning_rate"]
    if values["mixed_precision"] is None:
        values["mixed_precision"] = "bf16" if values["use_gpu"] else "no"
    if values["mixed_precision"] != "no" and not values["use_gpu"]:
        raise InvalidArgument(
            "spec.mixed_precision",
            f"{values['mixed_precision']} needs use_gpu (training on CPU runs in fp32: use 'no')",
        )
    _check_gpus(values["use_gpu"], values["num_workers"], gpu_count)
    if values["optimizer"] == "adamw_8bit" and not installed("bitsandbytes"):
        raise FailedPrecondition(
            "spec.optimizer: adamw_8bit needs the bitsandbytes package on the trainer and its Ray "
            "workers, and this trainer has none (pip install 'dreambooth-service[adamw-8bit]'); "
            "use adamw or prodigy"
        )
    values["model_id"] = values["model_id"] or ""

    # 4. Things in the store: the base model, its default resolution, the dataset, the output id.
    try:
        base = models.describe(values["base_model"])
    except NotFound:
        raise NotFound(
            "spec.base_model", f"spec.base_model: model {request.base_model!r} not found"
        ) from None
    if base.kind == "lora":
        raise InvalidArgument(
            "spec.base_model", f"{request.base_model} is a LoRA adapter; fine-tune its base model"
        )
    if values["resolution"] is None:
        row = FIELDS_BY_NAME["resolution"]
        values["resolution"] = check_field(row, base.default_resolution or row.default, limits, use_lora)
    examples = values["train_batch_size"] * values["gradient_accumulation_steps"] * values["num_workers"]
    examples *= 2 if values["with_prior_preservation"] else 1
    cost = training_cost(
        values["resolution"], values["max_train_steps"], examples, text_encoder=values["train_text_encoder"]
    )
    check_cost(cost, limits.max_job_cost, "spec", "fewer steps, a smaller batch or a lower resolution")
    for field, dataset in _datasets(values):
        if not datasets.exists(dataset):
            name = f"datasets/{dataset}"
            raise NotFound(field, f"{field}: dataset {name!r} not found (upload it first)")
    if values["model_id"] and models.exists(values["model_id"]):
        raise AlreadyExists(f"spec.model_id: model {values['model_id']!r} already exists; choose another id")
    return JobSpec(**values)


def _check_prompts(values: dict[str, Any]) -> None:
    token = values["identifier_token"]
    if not _contains_word(values["instance_prompt"], token):
        raise InvalidArgument(
            "spec.instance_prompt",
            f"must contain the identifier token {token!r} (e.g. 'a photo of {token} dog'), "
            f"got {values['instance_prompt']!r}",
        )
    if values["with_prior_preservation"]:
        if not values["class_prompt"]:
            raise InvalidArgument(
                "spec.class_prompt", "is required with prior preservation (e.g. 'a photo of dog')"
            )
        if _contains_word(values["class_prompt"], token):
            raise InvalidArgument(
                "spec.class_prompt",
                f"must describe the class in general, without the identifier token {token!r}",
            )


def _check_concept_count(request: SpecRequest, limits: SpecLimits) -> None:
    count, most = len(request.additional_concepts or ()), limits.max_additional_concepts
    if count > most:
        raise InvalidArgument(
            CONCEPTS,
            f"a job trains at most {most + 1} subjects (the spec's own and {most} additional "
            f"concepts), got {count} additional concepts",
        )


def _check_concepts(values: dict[str, Any]) -> None:
    """Every subject must be told apart: its own identifier token and images; its instance
    prompt names its token and no other subject's; with priors, each has a class prompt that
    names no subject's token. (The spec's own subject's prompts are `_check_prompts`'.) Tokens
    are compared regardless of case, as CLIP's tokenizer lowercases prompts."""
    own = Concept(
        values["dataset"], values["instance_prompt"], values["identifier_token"], values["class_prompt"]
    )
    subjects = [("spec", own)]
    subjects += [(f"{CONCEPTS}[{index}]", c) for index, c in enumerate(values["additional_concepts"])]
    if len(subjects) == 1:
        return
    tokens: dict[str, str] = {}
    datasets: dict[str, str] = {}
    for where, concept in subjects:
        token = concept.identifier_token.casefold()
        if token in tokens:
            raise InvalidArgument(
                f"{where}.identifier_token",
                f"{concept.identifier_token!r} is already {tokens[token]}.identifier_token; "
                "each subject needs its own",
            )
        if concept.dataset in datasets:
            raise InvalidArgument(
                f"{where}.dataset",
                f"is already {datasets[concept.dataset]}.dataset; each subject needs its own images",
            )
        tokens[token], datasets[concept.dataset] = where, where
    priors = values["with_prior_preservation"]
    for where, concept in subjects[1:]:
        _check_concept_prompts(where, concept, priors)
    for index, (where, concept) in enumerate(subjects):
        for other_index, (other_where, other) in enumerate(subjects):
            token = other.identifier_token
            if other_index != index and _contains_word(concept.instance_prompt.casefold(), token.casefold()):
                raise InvalidArgument(
                    f"{where}.instance_prompt",
                    f"names {other_where}.identifier_token {token!r}; "
                    "an instance prompt names its own subject only",
                )
            if priors and _contains_word(concept.class_prompt.casefold(), token.casefold()):
                raise InvalidArgument(
                    f"{where}.class_prompt",
                    f"must describe the class in general, without the identifier token {token!r}",
                )


def _check_concept_prompts(where: str, concept: Concept, with_prior_preservation: bool) -> None:
    token = concept.identifier_token
    if not _contains_word(concept.instance_prompt, token):
        raise InvalidArgument(
            f"{where}.instance_prompt",
            f"must contain its identifier token {token!r}, got {concept.instance_prompt!r}",
        )
    if with_prior_preservation and not concept.class_prompt:
        raise InvalidArgument(
            f"{where}.class_prompt", "is required with prior preservation (e.g. 'a photo of cat')"
        )


def _datasets(values: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(field, dataset id) of every subject's images."""
    yield "spec.dataset", values["dataset"]
    for index, concept in enumerate(values["additional_concepts"]):
        yield f"{CONCEPTS}[{index}].dataset", concept.dataset


# Prodigy estimates its own step size; the learning rate multiplies that estimate (1.0 is the
# convention). Below this an AdamW-sized rate was meant, and it would all but stop training.
PRODIGY_LEARNING_RATE = 1.0
PRODIGY_MIN_LEARNING_RATE = 0.1


def _resolve_prodigy_rates(values: dict[str, Any], *, learning_rate_set: bool) -> None:
    if not learning_rate_set:
        values["learning_rate"] = PRODIGY_LEARNING_RATE
    elif values["learning_rate"] < PRODIGY_MIN_LEARNING_RATE:
        raise InvalidArgument(
            "spec.learning_rate",
            f"with the prodigy optimizer it scales Prodigy's own step-size estimate: use "
            f"{PRODIGY_MIN_LEARNING_RATE:g}..1 (unset = {PRODIGY_LEARNING_RATE:g}), "
            f"got {values['learning_rate']:g}",
        )
    text_rate = values["text_encoder_learning_rate"]
    if text_rate is not None and text_rate != values["learning_rate"]:
        raise InvalidArgument(
            "spec.text_encoder_learning_rate",
            f"prodigy takes one rate for every parameter: leave it unset or equal to learning_rate "
            f"({values['learning_rate']:g}), got {text_rate:g}",
        )


def _check_gpus(use_gpu: bool, num_workers: int, gpu_count: GpuCounter | None) -> None:
    if not use_gpu or gpu_count is None:
        return
    gpus = gpu_count()
    if gpus is not None and gpus < num_workers:
        raise InvalidArgument(
            "spec.use_gpu", f"the Ray cluster has {gpus} GPUs; {num_workers} GPU workers need {num_workers}"
        )


def _contains_word(text: str, word: str) -> bool:
    return re.search(rf"(?<!\S){re.escape(word)}(?![^\s,.;:!?])", text) is not None
