"""The training job's spec as plain Python, derived from the one spec table
(`dreambooth_client.training_spec.FIELDS`).

`SpecRequest` is the spec as a client sent it (None = the field was not set); `JobSpec` is the
validated spec with every default resolved: what is stored in jobs/{id}/job.json and what the
training loop reads. Field names follow the proto so errors can name the field.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from dreambooth_client.training_spec import (
    FIELDS,
    FIELDS_BY_NAME,
    LR_SCHEDULES,
    MIXED_PRECISIONS,
    SpecField,
    derived_model_id,
)

__all__ = [
    "FIELDS",
    "FIELDS_BY_NAME",
    "LR_SCHEDULES",
    "MIXED_PRECISIONS",
    "JobSpec",
    "SpecField",
    "SpecRequest",
    "derived_model_id",
]


def _annotation(field: SpecField) -> Any:
    return tuple[str, ...] if field.type is tuple else field.type


def _to_json(self: Any) -> dict[str, Any]:
    data = dataclasses.asdict(self)
    data["validation_prompts"] = list(self.validation_prompts)
    return data


def _from_json(cls: type, data: dict[str, Any]) -> Any:
    """Unknown keys are ignored and missing ones take their defaults: a job record written by an
    older or newer trainer still loads."""
    values = {field.name: data[field.name] for field in FIELDS if field.name in data}
    values["validation_prompts"] = tuple(values.get("validation_prompts", ()))
    return cls(**values)


JobSpec = dataclasses.make_dataclass(
    "JobSpec",
    [(f.name, _annotation(f), dataclasses.field(default=f.default)) for f in FIELDS],
    frozen=True,
    namespace={"to_json": _to_json, "from_json": classmethod(_from_json)},
)
JobSpec.__module__ = __name__  # so pickling finds it here (make_dataclass takes `module` from 3.12)
JobSpec.__doc__ = "A validated training spec; every field is resolved (see the spec table)."

SpecRequest = dataclasses.make_dataclass(
    "SpecRequest",
    [(f.name, Any, dataclasses.field(default=None)) for f in FIELDS],
    frozen=True,
)
SpecRequest.__module__ = __name__
SpecRequest.__doc__ = "A TrainingJobSpec as the client sent it, free of protobuf. None = not set."
