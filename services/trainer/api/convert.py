"""Protobuf <-> the trainer's plain objects. Nothing else in the trainer imports the stubs."""

from __future__ import annotations

import dataclasses
import datetime
import io
import math
import re
from typing import Any

from dreambooth.v1 import common_pb2, trainer_pb2
from google.protobuf.descriptor import EnumDescriptor
from google.protobuf.timestamp_pb2 import Timestamp
from PIL import Image

from services.common.errors import InvalidArgument
from services.trainer.dataset_layout import DatasetInfo
from services.trainer.job_spec import CONCEPT_FIELDS, FIELDS, ConceptRequest, JobSpec, SpecRequest
from services.trainer.jobs.core import Usage
from services.trainer.jobs.events import JobEvent, Preview, PriorProgressInfo
from services.trainer.jobs.records import Job, JobState, Progress
from services.trainer.jobs.training_logs import Chunk, FileStart, LogFile, LogsPart, LogsPlan

_STATES = {state: getattr(trainer_pb2, f"TRAINING_JOB_STATE_{state.value}") for state in JobState}
_STATES_BY_PROTO = {value: state for state, value in _STATES.items()}


# Requests


def spec_request_from_proto(spec: trainer_pb2.TrainingJobSpec) -> SpecRequest:
    """Every field of the table: None when the client did not set it (proto3 `optional`
    presence), else what it sent; enum values by name ("unknown enum value 9" when not known)."""
    values: dict[str, Any] = {}
    for field in FIELDS:
        if field.item is not None:
            items = getattr(spec, field.name)
            requests = tuple(ConceptRequest(**_set_fields(item, CONCEPT_FIELDS)) for item in items)
            values[field.name] = requests or None
        elif field.type is tuple:
            values[field.name] = tuple(getattr(spec, field.name)) or None
    values.update(_set_fields(spec, [field for field in FIELDS if field.type is not tuple]))
    return SpecRequest(**values)


def _set_fields(message: Any, fields: Any) -> dict[str, Any]:
    """The scalar fields the client set (proto3 `optional` presence), enums by name."""
    values: dict[str, Any] = {}
    for field in fields:
        if not message.HasField(field.name):
            continue
        descriptor = message.DESCRIPTOR.fields_by_name[field.name]
        value = getattr(message, field.name)
        if descriptor.enum_type is not None:
            value = _enum_names(descriptor.enum_type).get(value, f"unknown enum value {value}")
        elif isinstance(value, float):
            value = _from_float32(value)
        values[field.name] = value
    return values


def _from_float32(value: float) -> float:
    """The decimal a client most likely wrote: 1e-4 arrives as 9.99999974e-05 in a proto float."""
    return float(f"{value:.7g}") if math.isfinite(value) else value


def _enum_names(enum: EnumDescriptor) -> dict[int, str]:
    """Proto enum numbers -> the spec table's names: LR_SCHEDULE_COSINE -> "cosine"."""
    prefix = re.sub(r"(?<!^)(?=[A-Z])", "_", enum.name).upper() + "_"
    return {value.number: value.name.removeprefix(prefix).lower() for value in enum.values}


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
    proto = trainer_pb2.TrainingJobSpec()
    for field in FIELDS:
        value = getattr(spec, field.name)
        descriptor = proto.DESCRIPTOR.fields_by_name[field.name]
        if field.item is not None:
            for item in value:
                message = getattr(proto, field.name).add(**dataclasses.asdict(item))
                message.dataset = f"datasets/{message.dataset}"
        elif field.type is tuple:
            getattr(proto, field.name).extend(value)
        elif descriptor.enum_type is not None:
            numbers = {name: number for number, name in _enum_names(descriptor.enum_type).items()}
            setattr(proto, field.name, numbers[value])
        else:
            setattr(proto, field.name, value)
    proto.base_model = f"models/{spec.base_model}"
    proto.dataset = f"datasets/{spec.dataset}"
    return proto


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


def usage_to_proto(usage: Usage) -> trainer_pb2.GetUsageResponse:
    quotas = usage.quotas
    return trainer_pb2.GetUsageResponse(
        tenant=usage.tenant,
        training_step_seconds=usage.training_step_seconds,
        images_generated=usage.images_generated,
        stored_bytes=usage.stored_bytes,
        active_training_jobs=usage.active_training_jobs,
        quotas=trainer_pb2.TenantQuotas(
            max_concurrent_jobs=quotas.max_concurrent_jobs,
            max_generate_streams=quotas.max_generate_streams,
            max_stored_bytes=quotas.max_stored_bytes,
        ),
    )


def _log_file_to_proto(log_file: LogFile) -> trainer_pb2.TrainingJobLogFile:
    return trainer_pb2.TrainingJobLogFile(
        path=log_file.path, sha256=log_file.sha256, size_bytes=log_file.size
    )


def logs_part_to_proto(part: LogsPart) -> trainer_pb2.DownloadTrainingJobLogsResponse:
    if isinstance(part, Chunk):
        return trainer_pb2.DownloadTrainingJobLogsResponse(chunk=part.data)
    if isinstance(part, FileStart):
        return trainer_pb2.DownloadTrainingJobLogsResponse(file=_log_file_to_proto(part.file))
    if isinstance(part, LogsPlan):
        manifest = trainer_pb2.TrainingJobLogs(
            name=part.job_name, files=[_log_file_to_proto(f) for f in part.files]
        )
        return trainer_pb2.DownloadTrainingJobLogsResponse(manifest=manifest)
    raise TypeError(f"unknown logs part {part!r}")
