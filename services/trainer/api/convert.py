"""Protobuf <-> the trainer's plain objects. Nothing else in the trainer imports the stubs."""

from __future__ import annotations

import datetime
import io
import math
from collections.abc import Mapping
from typing import Any

from dreambooth.v1 import common_pb2, trainer_pb2
from google.protobuf.timestamp_pb2 import Timestamp
from PIL import Image

from services.common.errors import InvalidArgument
from services.trainer.dataset_layout import DatasetInfo
from services.trainer.job_spec import JobSpec
from services.trainer.jobs.events import JobEvent, Preview, PriorProgressInfo
from services.trainer.jobs.records import Job, JobState, Progress
from services.trainer.jobs.validation import SpecRequest

# Numeric spec fields; with proto3 `optional` an unset one is None (its default applies).
_NUMERIC_FIELDS = (
    "prior_loss_weight",
    "num_class_images",
    "max_train_steps",
    "learning_rate",
    "text_encoder_learning_rate",
    "lr_warmup_steps",
    "resolution",
    "train_batch_size",
    "gradient_accumulation_steps",
    "max_grad_norm",
    "seed",
    "checkpointing_steps",
    "validation_steps",
    "lora_rank",
    "num_workers",
    "prior_steps",
)
_PLAIN_FIELDS = (
    "base_model",
    "dataset",
    "instance_prompt",
    "identifier_token",
    "class_prompt",
    "with_prior_preservation",
    "train_text_encoder",
    "gradient_checkpointing",
    "center_crop",
    "random_flip",
    "use_lora",
    "use_gpu",
    "model_id",
    "class_negative_prompt",
)

_LR_SCHEDULES = {
    trainer_pb2.LR_SCHEDULE_CONSTANT: "constant",
    trainer_pb2.LR_SCHEDULE_CONSTANT_WITH_WARMUP: "constant_with_warmup",
    trainer_pb2.LR_SCHEDULE_COSINE: "cosine",
    trainer_pb2.LR_SCHEDULE_LINEAR: "linear",
}
_MIXED_PRECISIONS = {
    trainer_pb2.MIXED_PRECISION_NO: "no",
    trainer_pb2.MIXED_PRECISION_BF16: "bf16",
    trainer_pb2.MIXED_PRECISION_FP16: "fp16",
}
_STATES = {state: getattr(trainer_pb2, f"TRAINING_JOB_STATE_{state.value}") for state in JobState}
_STATES_BY_PROTO = {value: state for state, value in _STATES.items()}


# Requests


def spec_request_from_proto(spec: trainer_pb2.TrainingJobSpec) -> SpecRequest:
    values: dict[str, object] = {name: getattr(spec, name) for name in _PLAIN_FIELDS}
    for name in _NUMERIC_FIELDS:
        descriptor = spec.DESCRIPTOR.fields_by_name[name]
        value = getattr(spec, name) if not descriptor.has_presence or spec.HasField(name) else None
        if isinstance(value, float):
            value = _from_float32(value)
        values[name] = value
    values["validation_prompts"] = tuple(spec.validation_prompts)
    values["lr_schedule"] = _enum_name(spec.lr_schedule, _LR_SCHEDULES)
    values["mixed_precision"] = _enum_name(spec.mixed_precision, _MIXED_PRECISIONS)
    return SpecRequest(**values)  # type: ignore[arg-type]


def _from_float32(value: float) -> float:
    """The decimal a client most likely wrote: 1e-4 arrives as 9.99999974e-05 in a proto float."""
    return float(f"{value:.7g}") if math.isfinite(value) else value


def _enum_name(value: int, names: Mapping[Any, str]) -> str:
    if value == 0:
        return ""
    return names.get(value, f"unknown enum value {value}")


def state_from_proto(value: int, field: str = "state") -> JobState | None:
    if value == trainer_pb2.TRAINING_JOB_STATE_UNSPECIFIED:
        return None
    try:
        return _STATES_BY_PROTO[value]
    except KeyError:
        raise InvalidArgument(field, f"unknown state {value}") from None


# Responses


def timestamp(seconds: float | None) -> Timestamp | None:
    if seconds is None:
        return None
    whole = math.floor(seconds)
    nanos = min(round((seconds - whole) * 1e9), 999_999_999)  # split first: floats lose nanoseconds
    return Timestamp(seconds=whole, nanos=nanos)


def spec_to_proto(spec: JobSpec) -> trainer_pb2.TrainingJobSpec:
    lr_schedules = {name: value for value, name in _LR_SCHEDULES.items()}
    precisions = {name: value for value, name in _MIXED_PRECISIONS.items()}
    values = {name: getattr(spec, name) for name in (*_PLAIN_FIELDS, *_NUMERIC_FIELDS)}
    values["base_model"] = f"models/{spec.base_model}"
    values["dataset"] = f"datasets/{spec.dataset}"
    return trainer_pb2.TrainingJobSpec(
        **values,
        validation_prompts=list(spec.validation_prompts),
        lr_schedule=lr_schedules[spec.lr_schedule],
        mixed_precision=precisions[spec.mixed_precision],
    )


def progress_to_proto(progress: Progress) -> trainer_pb2.TrainingProgress:
    return trainer_pb2.TrainingProgress(
        step=progress.step,
        total_steps=progress.total_steps,
        loss=progress.loss,
        learning_rate=progress.learning_rate,
        eta_seconds=progress.eta_seconds,
        samples_per_second=progress.samples_per_second,
    )


def job_to_proto(job: Job) -> trainer_pb2.TrainingJob:
    return trainer_pb2.TrainingJob(
        name=job.name,
        spec=spec_to_proto(job.spec),
        state=_STATES[job.state],
        progress=progress_to_proto(job.progress),
        model=job.model,
        error_message=job.error_message,
        request_id=job.request_id,
        create_time=timestamp(job.create_time),
        start_time=timestamp(job.start_time),
        end_time=timestamp(job.end_time),
        update_time=timestamp(job.update_time),
        checkpoint_step=job.checkpoint_step,
    )


def event_to_proto(event: JobEvent) -> trainer_pb2.WatchTrainingJobResponse:
    response = trainer_pb2.WatchTrainingJobResponse(sequence=event.sequence, event_time=timestamp(event.time))
    payload = event.payload
    if isinstance(payload, Job):
        response.state_change.CopyFrom(job_to_proto(payload))
    elif isinstance(payload, Progress):
        response.progress.CopyFrom(progress_to_proto(payload))
    elif isinstance(payload, PriorProgressInfo):
        response.prior_progress.CopyFrom(
            common_pb2.PriorProgress(images_done=payload.images_done, images_total=payload.images_total)
        )
    elif isinstance(payload, Preview):
        jpeg = payload.jpeg or b""
        width, height = _jpeg_size(jpeg)
        response.preview.CopyFrom(
            trainer_pb2.ValidationPreview(
                step=payload.step,
                prompt=payload.prompt,
                image=common_pb2.Image(
                    data=jpeg, format=common_pb2.IMAGE_FORMAT_JPEG, width=width, height=height
                ),
            )
        )
    return response


def _jpeg_size(jpeg: bytes) -> tuple[int, int]:
    if not jpeg:
        return 0, 0
    try:
        with Image.open(io.BytesIO(jpeg)) as image:
            return image.size
    except Exception:  # a preview is informative: never fail a watch over it
        return 0, 0


def dataset_to_proto(info: DatasetInfo) -> trainer_pb2.Dataset:
    created = datetime.datetime.fromisoformat(info.create_time)
    return trainer_pb2.Dataset(
        name=info.name,
        image_count=info.image_count,
        size_bytes=info.size_bytes,
        create_time=timestamp(created.timestamp()),
    )
