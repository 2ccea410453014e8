"""The training job's spec as plain Python, derived from the one spec table
(`dreambooth_client.training_spec.FIELDS`).

`SpecRequest` is the spec as a client sent it (None = the field was not set); `JobSpec` is the
validated spec with every default resolved: what is stored in jobs/{id}/job.json and what the
training loop reads. Field names follow the proto so errors can name the field. The items of a
repeated message (`additional_concepts`) are `ConceptRequest`s in a request and `Concept`s in a
JobSpec; `concepts(spec)` lists every subject of a job, the spec's own first.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from dreambooth_client.training_spec import (
    CONCEPT_FIELDS,
    FIELDS,
    FIELDS_BY_NAME,
    LR_SCHEDULES,
    MIXED_PRECISIONS,
    Concept,
    SpecField,
    derived_model_id,
)

__all__ = [
    "CONCEPT_FIELDS",
    "FIELDS",
    "FIELDS_BY_NAME",
    "LR_SCHEDULES",
    "MIXED_PRECISIONS",
    "Concept",
    "ConceptRequest",
    "JobSpec",
    "SpecField",
    "SpecRequest",
    "concepts",
    "derived_model_id",
]


def _annotation(field: SpecField) -> Any:
    if field.item is not None:
        return tuple[field.item, ...]  # type: ignore[name-defined]
    return tuple[str, ...] if field.type is tuple else field.type


def _to_json(self: Any) -> dict[str, Any]:
    data = dataclasses.asdict(self)  # items become dicts
    for field in FIELDS:
        if field.type is tuple:
            data[field.name] = list(data[field.name])
    return data


def _from_json(cls: type, data: dict[str, Any]) -> Any:
    """Unknown keys are ignored and missing ones take their defaults: a job record written by an
    older or newer trainer still loads."""
    values = {field.name: data[field.name] for field in FIELDS if field.name in data}
    for field in FIELDS:
        if field.type is tuple and field.name in values:
            items = values[field.name]
            values[field.name] = tuple(
                _item_from_json(field.item, item) if field.item else item for item in items
            )
    return cls(**values)


def _item_from_json(item: type, data: dict[str, Any]) -> Any:
    names = {row.name for row in item.FIELDS}  # type: ignore[attr-defined]
    return item(**{key: value for key, value in data.items() if key in names})


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

ConceptRequest = dataclasses.make_dataclass(
    "ConceptRequest",
    [(f.name, Any, dataclasses.field(default=None)) for f in CONCEPT_FIELDS],
    frozen=True,
)
ConceptRequest.__module__ = __name__
ConceptRequest.__doc__ = "A TrainingConcept as the client sent it. None = not set."


def concepts(spec: Any) -> tuple[Concept, ...]:
    """Every subject of the job: the spec's own (concept 0), then its additional concepts."""
    own = Concept(
        dataset=spec.dataset,
        instance_prompt=spec.instance_prompt,
        identifier_token=spec.identifier_token,
        class_prompt=spec.class_prompt,
    )
    return (own, *spec.additional_concepts)
