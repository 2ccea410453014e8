"""Job files: a training spec in a TOML (or YAML) file for `dreambooth train --config FILE`, and
a job's spec written back as one by `dreambooth jobs get JOB --as-config FILE`.

Keys are the TrainingJobSpec fields by their spec-table names (`max_train_steps`, not the
`--steps` flag); values are typed as in the table (`learning_rate = 1e-4`, `use_lora = true`,
`validation_prompts = ["..."]`, enums by name: `lr_schedule = "cosine"`). Every value is checked
as its flag's value is (spec_values); an unknown key or a value of the wrong type is refused
naming the key and the file. A repeated message field of the spec is a TOML array of tables
(`[[name]]`, keys = the message's field names, checked by building the message).

A written file holds every field of the job's spec as the trainer resolved it, so a default
changed later does not change the rerun; the one exception is a model id the trainer derived from
the job id (a new run gets its own). Floats are written in the fewest digits that give back the
proto's float32, so spec -> file -> spec is exact.
"""

from __future__ import annotations

import difflib
import math
import re
import struct
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dreambooth.v1 import trainer_pb2
from google.protobuf import message_factory
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from dreambooth_client import formatting, messages
from dreambooth_client.spec_values import SpecValueError, check_value
from dreambooth_client.training_spec import FIELDS, FIELDS_BY_NAME, SpecField, derived_model_id

SUFFIXES = {".toml": "TOML", ".yaml": "YAML", ".yml": "YAML"}
YAML_INSTALL = "pip install 'dreambooth-client[yaml]'"
_SPEC_FIELDS = trainer_pb2.TrainingJobSpec.DESCRIPTOR.fields_by_name


class JobFileError(ValueError):
    """A job file that cannot be read or holds something the spec does not take."""


@dataclass(frozen=True)
class JobFile:
    path: Path
    values: dict[str, Any]  # spec-table name -> checked value

    @property
    def folder(self) -> Path:
        """What a relative `dataset` path in the file is relative to."""
        return self.path.resolve().parent


# ---------------------------------------------------------------- reading


def read_job_file(path: str | Path) -> JobFile:
    path = Path(path)
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise JobFileError(f"{path}: a job file is .toml, .yaml or .yml")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise JobFileError(f"{path}: not UTF-8 text") from None
    except OSError as err:
        raise JobFileError(f"{path}: {err.strerror or err}") from None
    data = _parse_toml(text, path) if kind == "TOML" else _parse_yaml(text, path)
    if data is None:  # an empty YAML file
        data = {}
    if not isinstance(data, dict):
        raise JobFileError(f"{path}: expected spec fields as `name: value` pairs, not a list or a value")
    values = {}
    for key, value in data.items():
        name = str(key)
        field = FIELDS_BY_NAME.get(name)
        if field is None:
            raise JobFileError(f"{path}: unknown key {name!r}{_hint(name)}")
        try:
            values[name] = _file_value(field, value)
        except (SpecValueError, TypeError, ValueError) as err:
            raise JobFileError(f"{path}: {name}: {err}") from None
    return JobFile(path, values)


def _hint(key: str) -> str:
    if key in messages.SPEC_ALIASES:
        return f" (job files use the spec's field names: {messages.SPEC_ALIASES[key]})"
    words = {**{name: name for name in FIELDS_BY_NAME}, **messages.SPEC_ALIASES}
    close = difflib.get_close_matches(key, list(words), n=1, cutoff=0.75)
    if close:
        return f" (did you mean {words[close[0]]}?)"
    return " (the keys are the training spec's field names)"


def _file_value(field: SpecField, value: Any) -> Any:
    descriptor = _SPEC_FIELDS[field.name]
    if descriptor.message_type is None:
        return check_value(field, value)
    # A message field: a table, or for a repeated one an array of tables; its keys and values
    # are checked by building the message.
    items = value if descriptor.is_repeated else [value]
    if not isinstance(items, list):
        raise SpecValueError("expected an array of tables ([[" + field.name + "]] blocks)")
    message_class = message_factory.GetMessageClass(descriptor.message_type)
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            raise SpecValueError(f"item {index}: expected a table of {descriptor.message_type.name} fields")
        messages.fill_message(message_class(), item, f"item {index}" if descriptor.is_repeated else "table")
    return value


def _parse_toml(text: str, path: Path) -> Any:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover (Python 3.10 only)
        try:
            import tomli as tomllib
        except ImportError:
            raise JobFileError(f"{path}: TOML job files need Python 3.11+ (or pip install tomli)") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise JobFileError(f"{path}: not valid TOML: {err}") from None


def _parse_yaml(text: str, path: Path) -> Any:
    try:
        import yaml
    except ImportError:
        raise JobFileError(
            f"{path}: YAML job files need PyYAML ({YAML_INSTALL}); or write the job file as TOML"
        ) from None
    try:
        return yaml.load(text, Loader=_yaml_core_loader(yaml))  # a SafeLoader subclass
    except yaml.YAMLError as err:
        raise JobFileError(f"{path}: not valid YAML: {err}") from None


def _yaml_core_loader(yaml: Any) -> type:
    """PyYAML's SafeLoader with YAML 1.2's booleans and floats: `no` stays the string "no" (a
    mixed_precision value; YAML 1.1 makes it false) and `1e-4` is a float (1.1 makes it a string)."""
    bool_tag, float_tag = "tag:yaml.org,2002:bool", "tag:yaml.org,2002:float"

    class CoreLoader(yaml.SafeLoader):  # type: ignore[misc,name-defined]
        pass

    CoreLoader.yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag not in (bool_tag, float_tag)]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    booleans = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")
    CoreLoader.add_implicit_resolver(bool_tag, booleans, list("tTfF"))
    CoreLoader.add_implicit_resolver(
        float_tag,
        re.compile(
            r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
            r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
        ),
        list("-+0123456789."),
    )
    return CoreLoader


# ---------------------------------------------------------------- writing


def job_file_text(job: trainer_pb2.TrainingJob) -> str:
    """A job's spec as a TOML job file that `dreambooth train --config` runs again."""
    values = spec_file_values(job.spec)
    header = [
        "A job file: `dreambooth train --config FILE` runs this spec again (flags given beside it win).",
        f"Written from {job.name} ({messages.state_label(job.state)}"
        + (f", created {created}" if (created := formatting.timestamp(job.create_time)) else "")
        + "): every field as that run resolved it.",
    ]
    job_id = messages.resource_id(job.name)
    if job_id and values.get("model_id") == derived_model_id(job_id):
        del values["model_id"]
        header.append(f"model_id is left out: that run's ({derived_model_id(job_id)}) came from its job id.")
    return render_toml(values, header)


def spec_file_values(spec: trainer_pb2.TrainingJobSpec) -> dict[str, Any]:
    """The spec's fields in the table's order, as plain values: every set field, and every
    repeated field (an empty list too: it says "none", as the run had)."""
    values: dict[str, Any] = {}
    for row in FIELDS:
        descriptor = _SPEC_FIELDS[row.name]
        if descriptor.is_repeated:
            values[row.name] = [_plain(descriptor, item) for item in getattr(spec, row.name)]
        elif spec.HasField(row.name):
            values[row.name] = _plain(descriptor, getattr(spec, row.name))
    return values


def message_values(message: Message) -> dict[str, Any]:
    """A message's set fields as plain values (a table of a job file), in field-number order."""
    values = {}
    for descriptor, value in message.ListFields():
        if descriptor.is_repeated:
            values[descriptor.name] = [_plain(descriptor, item) for item in value]
        else:
            values[descriptor.name] = _plain(descriptor, value)
    return values


def _plain(descriptor: FieldDescriptor, value: Any) -> Any:
    if descriptor.message_type is not None:
        return message_values(value)
    if descriptor.enum_type is not None:
        return messages.enum_field_name(descriptor, value)
    if descriptor.cpp_type == FieldDescriptor.CPPTYPE_FLOAT:
        return shortest_float32(value)
    return value


def shortest_float32(value: float) -> float:
    """The float with the fewest significant digits that is the same float32: 1e-4 travels as
    9.99999974e-05 in a proto float, and is written back as 1e-4."""
    if not math.isfinite(value):
        return value
    target = _float32(value)
    for digits in range(1, 10):
        candidate = float(f"{target:.{digits}g}")
        if _float32(candidate) == target:
            return candidate
    return target


def _float32(value: float) -> float:
    return float(struct.unpack("f", struct.pack("f", value))[0])


def render_toml(values: Mapping[str, Any], header: Sequence[str] = ()) -> str:
    """Key = value lines, then arrays of tables (lists of mappings) as `[[key]]` blocks."""
    lines = [f"# {line}" for line in header]
    tables = []
    for key, value in values.items():
        if isinstance(value, list) and value and all(isinstance(item, Mapping) for item in value):
            tables.append((key, value))
        elif isinstance(value, list) and value:
            lines += [f"{key} = [", *(f"  {toml_value(item)}," for item in value), "]"]
        else:
            lines.append(f"{key} = {toml_value(value)}")
    for key, items in tables:
        for item in items:
            lines += ["", f"[[{key}]]", *(f"{name} = {toml_value(value)}" for name, value in item.items())]
    return "\n".join(lines) + "\n"


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return repr(value) if math.isfinite(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{key} = {toml_value(item)}" for key, item in value.items()) + " }"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    raise TypeError(f"no TOML form for {value!r}")


_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def _toml_string(text: str) -> str:
    """A TOML basic string: quotes, backslashes and control characters escaped."""
    out = []
    for char in text:
        if char in _ESCAPES:
            out.append(_ESCAPES[char])
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'
