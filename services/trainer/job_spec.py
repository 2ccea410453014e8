"""The training job's spec as plain Python: what the servicer builds from a TrainingJobSpec
proto after validation (defaults resolved), what is stored in jobs/{id}/job.json, and what the
training loop reads. Field names follow the proto so errors can name the field.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

LrScheduleName = Literal["constant", "constant_with_warmup", "cosine", "linear"]
MixedPrecisionName = Literal["no", "bf16", "fp16"]


@dataclass(frozen=True)
class JobSpec:
    base_model: str  # model id (not the "models/" resource name)
    dataset: str  # dataset id: the sha256 (not the "datasets/" resource name)
    instance_prompt: str
    identifier_token: str = "sks"
    class_prompt: str = ""
    with_prior_preservation: bool = False
    prior_loss_weight: float = 1.0
    num_class_images: int = 100
    max_train_steps: int = 400
    learning_rate: float = 5e-6
    train_text_encoder: bool = False
    text_encoder_learning_rate: float = 5e-6
    lr_schedule: LrScheduleName = "constant"
    lr_warmup_steps: int = 0
    resolution: int = 512
    train_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    mixed_precision: MixedPrecisionName = "no"  # resolved: "no" on CPU, bf16 default on GPU
    gradient_checkpointing: bool = False
    seed: int = 0
    checkpointing_steps: int = 100
    validation_prompts: tuple[str, ...] = field(default_factory=tuple)
    validation_steps: int = 0
    center_crop: bool = False
    random_flip: bool = False
    use_lora: bool = False
    lora_rank: int = 4
    num_workers: int = 1
    use_gpu: bool = False
    model_id: str = ""  # id of the published model; resolved to a non-empty id at creation
    class_negative_prompt: str = ""
    prior_steps: int = 30

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["validation_prompts"] = list(self.validation_prompts)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> JobSpec:
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["validation_prompts"] = tuple(values.get("validation_prompts", ()))
        return cls(**values)
