"""One training-spec value checked against its row of the spec table, on the client.

The same rules whichever way a value arrives: as text (a `dreambooth train` flag, a `--sweep`
value) or typed (a job file's TOML/YAML value). Checked here: the type, the choices, the pattern
and the bounds the table states as numbers. Bounds named after a server limit (`max_steps`...),
prompt lengths and the rules between fields are the trainer's to check: it owns those limits.
Messages never name the field; the caller says where the value came from.
"""

from __future__ import annotations

import math
import re
from typing import Any

from dreambooth_client.training_spec import SpecField

TRUE_WORDS = frozenset({"true", "yes", "on", "1"})
FALSE_WORDS = frozenset({"false", "no", "off", "0"})


class SpecValueError(ValueError):
    """A value its row of the spec table refuses."""


def parse_text(field: SpecField, text: str) -> Any:
    """A value typed on the command line, as the row's type, checked."""
    if field.type is bool:
        word = text.strip().lower()
        if word not in TRUE_WORDS | FALSE_WORDS:
            raise SpecValueError(f"expected true or false, got {text!r}")
        return check_value(field, word in TRUE_WORDS)
    if field.type in (int, float):
        value = _number(text)
        if value is None or (field.type is int and not isinstance(value, int)):
            kind = "a whole number" if field.type is int else "a number"
            raise SpecValueError(f"expected {kind}, got {text!r}")
        return check_value(field, value)
    if field.type is str:
        return check_value(field, text)
    raise SpecValueError("is a list of values, not one value")


def check_value(field: SpecField, value: Any) -> Any:
    """A typed value (from a job file or `parse_text`), checked; a whole number given for a float
    field becomes a float. Lists are lists of strings (repeated string fields)."""
    if field.type is tuple:
        if isinstance(value, str) or not isinstance(value, list | tuple):
            raise SpecValueError(f"expected a list of strings, got {_shown(value)}")
        for item in value:
            if not isinstance(item, str):
                raise SpecValueError(f"expected a list of strings, got an item {_shown(item)}")
        return tuple(value)
    if field.type is bool:
        if not isinstance(value, bool):
            raise SpecValueError(f"expected true or false, got {_shown(value)}")
        return value
    if field.type is str:
        if not isinstance(value, str):
            raise SpecValueError(f"expected a string, got {_shown(value)}")
        if field.choices and value not in field.choices:
            raise SpecValueError(f"must be one of {', '.join(field.choices)}, got {value!r}")
        if field.pattern and not re.fullmatch(field.pattern, value):
            raise SpecValueError(f"must be {field.help}, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        kind = "a whole number" if field.type is int else "a number"
        raise SpecValueError(f"expected {kind}, got {_shown(value)}")
    if field.type is int and not isinstance(value, int):
        raise SpecValueError(f"expected a whole number, got {value!r}")
    if not math.isfinite(value):
        raise SpecValueError(f"must be a finite number, got {value}")
    _check_bounds(field, value)
    return field.type(value)


def bounds_text(field: SpecField) -> str:
    """`0..4294967295`, `>0..1`: the bounds the table states as numbers ("" for a named bound)."""
    low, high = _numeric(field.low), _numeric(field.high)
    return (
        f"{'>' if field.low_exclusive else ''}{_num(low)}..{'<' if field.high_exclusive else ''}{_num(high)}"
    )


def _check_bounds(field: SpecField, value: float) -> None:
    low, high = _numeric(field.low), _numeric(field.high)
    too_low = low is not None and (value <= low if field.low_exclusive else value < low)
    too_high = high is not None and (value >= high if field.high_exclusive else value > high)
    if too_low or too_high:
        raise SpecValueError(f"must be in {bounds_text(field)}, got {_num(value)}")


def _numeric(bound: float | str | None) -> float | None:
    return bound if isinstance(bound, int | float) else None


def _num(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:g}" if isinstance(value, float) else str(value)


def _number(text: str) -> int | float | None:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            continue
    return None


def _shown(value: Any) -> str:
    """A value as the file wrote it, with what kind of value it is (no Python type names)."""
    if isinstance(value, bool):
        return f"{str(value).lower()} (true/false)"
    if isinstance(value, str):
        return f"{value!r} (a string)"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, float):
        return f"{value:g} (a number with a fraction)"
    return repr(value)
