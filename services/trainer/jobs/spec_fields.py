"""Checking one spec field against its row of the spec table: type, choices, pattern, bounds
(numbers, or the names of this server's SpecLimits), prompt length; the items of a repeated
message field against their own rows. Rules between fields are validation.py's."""

from __future__ import annotations

import math
import re
from typing import Any

from services.common.errors import InvalidArgument
from services.trainer.job_spec import SpecField
from services.trainer.settings import SpecLimits


def bound(value: float | str | None, limits: SpecLimits) -> float | None:
    """A table bound: a number, or the name of a SpecLimits attribute."""
    return getattr(limits, value) if isinstance(value, str) else value


def check_field(field: SpecField, value: Any, limits: SpecLimits, use_lora: bool, name: str = "") -> Any:
    """The field's resolved value: its default when unset (None for a field derived from
    others), else the sent value once it passed the row's rules. Errors name `name`
    (default `spec.{field}`)."""
    name = name or f"spec.{field.name}"
    if value is None:
        return None if field.derived else field.default_for(use_lora)
    if field.item is not None:
        return _check_items(field, field.item, name, tuple(value), limits, use_lora)
    if field.type is tuple:
        return _check_prompt_list(field, name, tuple(value), limits)
    if field.type is str:
        return _check_text(field, name, str(value), limits)
    if field.type is bool:
        return bool(value)
    return _check_number(field, name, value, limits)


def _check_text(field: SpecField, name: str, value: str, limits: SpecLimits) -> str:
    text = value.strip() if field.prompt else value
    if field.choices and text not in field.choices:
        raise InvalidArgument(name, f"must be one of {', '.join(field.choices)}, got {text!r}")
    if field.required and not text:
        raise InvalidArgument(name, f"is required: {field.help}")
    if field.pattern and not re.fullmatch(field.pattern, text):
        raise InvalidArgument(name, f"must be {field.help}, got {text!r}")
    if field.prompt and len(text) > limits.max_prompt_chars:
        raise InvalidArgument(name, f"is {len(text)} characters; the limit is {limits.max_prompt_chars}")
    return text


def _check_items(
    field: SpecField, item_type: Any, name: str, items: tuple[Any, ...], limits: SpecLimits, use_lora: bool
) -> tuple:
    """Each item of a repeated message, row by row: `spec.additional_concepts[1].dataset`."""
    _check_count(field, name, items, limits)
    checked = []
    for index, item in enumerate(items):
        values = {}
        for row in item_type.FIELDS:
            path, value = f"{name}[{index}].{row.name}", getattr(item, row.name)
            if value is None and row.required:
                raise InvalidArgument(path, f"is required: {row.help}")
            values[row.name] = check_field(row, value, limits, use_lora, path)
        checked.append(item_type(**values))
    return tuple(checked)


def _check_count(field: SpecField, name: str, values: tuple[Any, ...], limits: SpecLimits) -> None:
    most = bound(field.high, limits)
    if most is not None and len(values) > most:
        raise InvalidArgument(name, f"at most {most:g} values, got {len(values)}")


def _check_prompt_list(field: SpecField, name: str, values: tuple[Any, ...], limits: SpecLimits) -> tuple:
    _check_count(field, name, values, limits)
    checked = []
    for index, value in enumerate(values):
        text = str(value).strip()
        if not text:
            raise InvalidArgument(f"{name}[{index}]", "is required (an empty prompt)")
        if len(text) > limits.max_prompt_chars:
            raise InvalidArgument(
                f"{name}[{index}]", f"is {len(text)} characters; the limit is {limits.max_prompt_chars}"
            )
        checked.append(text)
    return tuple(checked)


def _check_number(field: SpecField, name: str, value: Any, limits: SpecLimits) -> int | float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidArgument(name, f"must be a number, got {value!r}")
    if not math.isfinite(value):
        raise InvalidArgument(name, f"must be a finite number, got {value}")
    if field.type is int and value != int(value):
        raise InvalidArgument(name, f"must be a whole number, got {value}")
    low, high = bound(field.low, limits), bound(field.high, limits)
    too_low = low is not None and (value <= low if field.low_exclusive else value < low)
    too_high = high is not None and (value >= high if field.high_exclusive else value > high)
    if too_low or too_high:
        raise InvalidArgument(name, f"must be {_range(field, low, high)}, got {value:g}")
    if field.multiple_of > 1 and value % field.multiple_of:
        raise InvalidArgument(name, f"must be a multiple of {field.multiple_of}, got {value:g}")
    return field.type(value)


def _range(field: SpecField, low: float | None, high: float | None) -> str:
    above = "" if low is None else f"{'greater than' if field.low_exclusive else 'at least'} {low:g}"
    below = "" if high is None else f"{'less than' if field.high_exclusive else 'at most'} {high:g}"
    if above and below:
        if not field.low_exclusive and not field.high_exclusive:
            return f"between {low:g} and {high:g}"
        return f"{above} and {below}"
    return above or below
