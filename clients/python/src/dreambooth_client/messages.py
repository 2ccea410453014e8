"""Pure request building: Python values -> `dreambooth.v1` messages, and back for a few results.

Nothing here talks to a server, so the sync and asyncio clients share it and it is tested alone.
Friendly inputs are accepted where they cannot be misread: a model id or its resource name
(`tiny-sd` or `models/tiny-sd`), a proto or its name, enum names in any case (`"euler"`,
`"SCHEDULER_EULER"`). Anything else raises `ValueError`/`TypeError` here, before a call is made;
range checks are left to the server, which owns the limits.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Union

from dreambooth.v1 import common_pb2, inference_pb2, trainer_pb2
from google.protobuf.descriptor import EnumDescriptor, FieldDescriptor
from google.protobuf.message import Message

from dreambooth_client import training_spec

CHUNK_SIZE = 1024 * 1024  # the servers' limit per UploadImages chunk
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})

ImageInput = Union[str, os.PathLike, bytes, tuple[str, bytes]]  # noqa: UP007 (a runtime alias on 3.10)

TERMINAL_STATES = frozenset(
    {
        trainer_pb2.TRAINING_JOB_STATE_SUCCEEDED,
        trainer_pb2.TRAINING_JOB_STATE_FAILED,
        trainer_pb2.TRAINING_JOB_STATE_CANCELLED,
    }
)

# Short names people type for the spec's longest fields (CLI flags use the same words).
# The CLI flags' short names work as keys too (steps=, lr=, workers=, prior_preservation=, ...).
SPEC_ALIASES = {
    field.cli_flag.lstrip("-").replace("-", "_"): field.name
    for field in training_spec.FIELDS
    if field.cli_flag.lstrip("-").replace("-", "_") != field.name
}


# ---------------------------------------------------------------- resource names


def resource_name(value: Any, collection: str, what: str) -> str:
    """`id`, `collection/id` or a message with a `.name` -> `collection/id`."""
    name = getattr(value, "name", value)
    if not isinstance(name, str):
        raise TypeError(f"{what}: expected an id, a '{collection}/ID' name or a message, got {value!r}")
    name = name.strip()
    if not name:
        raise ValueError(f"{what}: must not be empty")
    if "/" not in name:
        return f"{collection}/{name}"
    if not name.startswith(f"{collection}/") or name.count("/") != 1:
        raise ValueError(f"{what}: expected '{collection}/ID', got {name!r}")
    return name


def job_name(job: Any) -> str:
    return resource_name(job, "trainingJobs", "job")


def model_name(model: Any) -> str:
    return resource_name(model, "models", "model")


def dataset_name(dataset: Any) -> str:
    return resource_name(dataset, "datasets", "dataset")


def resource_id(name: str) -> str:
    """`trainingJobs/abc` -> `abc`."""
    return name.rsplit("/", 1)[-1]


# ---------------------------------------------------------------- enums


def _parse_enum(enum: Any, prefix: str, value: Any, what: str) -> int:
    """None/"" -> 0 (unspecified); an int that is a member; a member name with or without prefix.
    `enum` is a generated enum or its EnumDescriptor."""
    descriptor = getattr(enum, "DESCRIPTOR", enum)
    if value is None or value == "":
        return 0
    if isinstance(value, bool):
        raise TypeError(f"{what}: expected a name or a number, got {value!r}")
    if isinstance(value, int):
        if value not in descriptor.values_by_number:
            raise ValueError(f"{what}: unknown value {value}")
        return value
    if not isinstance(value, str):
        raise TypeError(f"{what}: expected a name or a number, got {value!r}")
    key = value.strip().upper().replace("-", "_")
    if not key.startswith(prefix):
        key = prefix + key
    if key.endswith("_UNSPECIFIED") or key not in descriptor.values_by_name:
        choices = ", ".join(enum_choices(enum, prefix))
        raise ValueError(f"{what}: unknown value {value!r}; choose from {choices}")
    return int(descriptor.values_by_name[key].number)


def enum_choices(enum: Any, prefix: str) -> list[str]:
    """Lower-case member names without the prefix, `_UNSPECIFIED` left out (for help texts)."""
    names = [value.name for value in getattr(enum, "DESCRIPTOR", enum).values]  # in number order
    return [name[len(prefix) :].lower() for name in names if not name.endswith("_UNSPECIFIED")]


def enum_label(enum: Any, prefix: str, value: int) -> str:
    """`TRAINING_JOB_STATE_TRAINING` -> `TRAINING`; unknown numbers print as themselves."""
    try:
        return enum.Name(value)[len(prefix) :]
    except ValueError:
        return str(value)


def parse_scheduler(value: Any) -> int:
    return _parse_enum(common_pb2.Scheduler, "SCHEDULER_", value, "scheduler")


def parse_image_format(value: Any) -> int:
    if isinstance(value, str) and value.strip().lower() == "jpg":
        value = "jpeg"
    return _parse_enum(common_pb2.ImageFormat, "IMAGE_FORMAT_", value, "output_format")


def enum_prefix(enum: EnumDescriptor) -> str:
    """`LrSchedule` -> `LR_SCHEDULE_`: what every value name of a proto enum starts with."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", enum.name).upper() + "_"


def enum_field_name(descriptor: FieldDescriptor, number: int) -> str:
    """The short lower-case name of an enum field's value (`LR_SCHEDULE_COSINE` -> "cosine")."""
    value = descriptor.enum_type.values_by_number.get(number)
    if value is None:
        raise ValueError(f"{descriptor.name}: unknown value {number}")
    return value.name.removeprefix(enum_prefix(descriptor.enum_type)).lower()


def parse_job_state(value: Any) -> int:
    return _parse_enum(trainer_pb2.TrainingJobState, "TRAINING_JOB_STATE_", value, "state")


def state_label(state: int) -> str:
    return enum_label(trainer_pb2.TrainingJobState, "TRAINING_JOB_STATE_", state)


def model_kind_label(kind: int) -> str:
    return enum_label(common_pb2.ModelKind, "MODEL_KIND_", kind)


def is_terminal(state: int) -> bool:
    return state in TERMINAL_STATES


# ---------------------------------------------------------------- training spec


def build_training_spec(
    spec: trainer_pb2.TrainingJobSpec | Mapping[str, Any] | None = None, **fields: Any
) -> trainer_pb2.TrainingJobSpec:
    """A TrainingJobSpec from a message and/or a dict and/or keyword fields (later ones win).

    Keys are the proto's field names (or the short aliases in SPEC_ALIASES); None leaves a field
    at its default. An unknown key raises TypeError, so a typo never silently trains with a default.
    """
    result = trainer_pb2.TrainingJobSpec()
    values: dict[str, Any] = {}
    if isinstance(spec, trainer_pb2.TrainingJobSpec):
        result.CopyFrom(spec)
    elif spec is not None:
        values.update(spec)
    values.update(fields)
    known = result.DESCRIPTOR.fields_by_name
    for key, value in values.items():
        name = SPEC_ALIASES.get(key, key)
        if name not in known:
            raise TypeError(f"unknown training spec field {key!r}")
        if value is None:
            continue
        if name in _SPEC_CONVERTERS:
            value = _SPEC_CONVERTERS[name](value)
        _set_field(result, known[name], value, f"training spec field {name!r}")
    return result


def fill_message(message: Message, values: Mapping[str, Any], where: str) -> Message:
    """Set `message`'s fields from a mapping of field names to plain values (enums by short name,
    nested messages as mappings, repeated fields as lists): how a table of a job file becomes a
    message. An unknown key raises TypeError naming `where`."""
    fields = message.DESCRIPTOR.fields_by_name
    for key, value in values.items():
        if key not in fields:
            raise TypeError(f"{where}: unknown field {key!r}")
        if value is not None:
            _set_field(message, fields[key], value, f"{where}.{key}")
    return message


def _set_field(message: Message, descriptor: FieldDescriptor, value: Any, where: str) -> None:
    """One field, by its descriptor: a repeated field is replaced by the list given (a single
    string or mapping counts as a list of one)."""
    if not descriptor.is_repeated:
        if descriptor.message_type is not None:
            _set_message(getattr(message, descriptor.name), value, where)
        else:
            _checked(setattr, message, descriptor.name, _scalar(descriptor, value, where), where=where)
        return
    items = [value] if isinstance(value, str | Mapping | Message) else list(value)
    container = getattr(message, descriptor.name)
    del container[:]
    for index, item in enumerate(items):
        if descriptor.message_type is not None:
            _set_message(container.add(), item, f"{where}[{index}]")
        else:
            _checked(container.append, _scalar(descriptor, item, f"{where}[{index}]"), where=where)


def _set_message(target: Message, value: Any, where: str) -> None:
    if isinstance(value, Message):
        _checked(target.CopyFrom, value, where=where)
    elif isinstance(value, Mapping):
        fill_message(target, value, where)
    else:
        raise TypeError(f"{where}: expected a table of fields, got {value!r}")


def _scalar(descriptor: FieldDescriptor, value: Any, where: str) -> Any:
    if descriptor.enum_type is None:
        return value
    return _parse_enum(descriptor.enum_type, enum_prefix(descriptor.enum_type), value, where)


def _checked(setter: Callable[..., Any], *args: Any, where: str) -> None:
    """protobuf's own type errors, named after the field."""
    try:
        setter(*args)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{where}: {err}") from err


ConceptInput = Union[training_spec.Concept, trainer_pb2.TrainingConcept, Mapping[str, Any]]  # noqa: UP007


def build_concepts(concepts: ConceptInput | Iterable[ConceptInput]) -> list[trainer_pb2.TrainingConcept]:
    """`additional_concepts` as messages: `Concept`s, `TrainingConcept`s or dicts of its fields
    (one, or several); a dataset may be an id, its name or a `Dataset`."""
    if isinstance(concepts, (training_spec.Concept, trainer_pb2.TrainingConcept, Mapping)):
        concepts = [concepts]
    return [build_concept(concept) for concept in concepts]


def build_concept(concept: ConceptInput) -> trainer_pb2.TrainingConcept:
    if isinstance(concept, trainer_pb2.TrainingConcept):
        values = {field.name: value for field, value in concept.ListFields()}
    elif isinstance(concept, training_spec.Concept):
        values = {field.name: getattr(concept, field.name) for field in training_spec.CONCEPT_FIELDS}
    elif isinstance(concept, Mapping):
        values = dict(concept)
    else:
        raise TypeError(f"additional_concepts: expected Concept objects, got {type(concept).__name__}")
    known = set(trainer_pb2.TrainingConcept.DESCRIPTOR.fields_by_name)
    result = trainer_pb2.TrainingConcept()
    for name, value in values.items():
        if name not in known:
            raise TypeError(
                f"unknown training concept field {name!r}; expected one of {', '.join(sorted(known))}"
            )
        if value is None:
            continue
        if name == "dataset":
            value = dataset_name(value)
        try:
            setattr(result, name, value)
        except (TypeError, ValueError) as err:
            raise TypeError(f"training concept field {name!r}: {err}") from err
    return result


_SPEC_CONVERTERS: dict[str, Callable[[Any], Any]] = {  # what build_training_spec accepts besides messages
    "base_model": model_name,
    "dataset": dataset_name,
    "additional_concepts": build_concepts,
}


# ---------------------------------------------------------------- uploads


@dataclass(frozen=True)
class ImageSource:
    """One image to upload: its name, size and a way to read it in chunks (again on a retry)."""

    filename: str
    size: int
    open_chunks: Callable[[int], Iterator[bytes]]


def _file_chunks(path: Path) -> Callable[[int], Iterator[bytes]]:
    def chunks(chunk_size: int) -> Iterator[bytes]:
        with path.open("rb") as handle:
            while block := handle.read(chunk_size):
                yield block

    return chunks


def _bytes_chunks(data: bytes) -> Callable[[int], Iterator[bytes]]:
    def chunks(chunk_size: int) -> Iterator[bytes]:
        for start in range(0, len(data), chunk_size):
            yield data[start : start + chunk_size]

    return chunks


def image_files_in(directory: Path) -> list[Path]:
    """The image files directly in `directory`, by name (hidden files and other suffixes skipped)."""
    return sorted(
        p
        for p in directory.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
    )


def collect_image_sources(images: ImageInput | Iterable[ImageInput]) -> list[ImageSource]:
    """Paths (a directory means its image files), raw bytes, or (filename, bytes) pairs."""
    if isinstance(images, (str, os.PathLike, bytes, bytearray, memoryview)) or (
        isinstance(images, tuple) and len(images) == 2 and isinstance(images[1], (bytes, bytearray))
    ):
        images = [images]  # type: ignore[list-item]
    sources: list[ImageSource] = []
    for item in images:  # type: ignore[union-attr]
        if isinstance(item, (bytes, bytearray, memoryview)):
            data = bytes(item)
            sources.append(ImageSource(f"image-{len(sources)}", len(data), _bytes_chunks(data)))
        elif isinstance(item, tuple):
            filename, data = item
            sources.append(ImageSource(str(filename), len(data), _bytes_chunks(bytes(data))))
        elif isinstance(item, (str, os.PathLike)):
            path = Path(item)
            if path.is_dir():
                files = image_files_in(path)
                if not files:
                    raise ValueError(f"{path}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
            elif path.is_file():
                files = [path]
            else:
                raise FileNotFoundError(f"{path}: no such file or directory")
            sources += [ImageSource(f.name, f.stat().st_size, _file_chunks(f)) for f in files]
        else:
            raise TypeError(f"images: expected paths or bytes, got {type(item).__name__}")
    if not sources:
        raise ValueError("images: nothing to upload")
    return sources


def iter_upload_requests(
    sources: Iterable[ImageSource], chunk_size: int = CHUNK_SIZE
) -> Iterator[trainer_pb2.UploadImagesRequest]:
    """A header per image, then its bytes in chunks of at most `chunk_size`."""
    if not 0 < chunk_size <= CHUNK_SIZE:
        raise ValueError(f"chunk_size must be in 1..{CHUNK_SIZE}")
    for source in sources:
        header = trainer_pb2.ImageHeader(filename=source.filename, size_bytes=source.size)
        yield trainer_pb2.UploadImagesRequest(image_header=header)
        for block in source.open_chunks(chunk_size):
            yield trainer_pb2.UploadImagesRequest(chunk=block)


# ---------------------------------------------------------------- generation


def build_generate_request(
    model: Any,
    prompt: str,
    *,
    negative_prompt: str = "",
    num_images: int = 1,
    width: int = 0,
    height: int = 0,
    steps: int = 0,
    guidance_scale: float = 0.0,
    scheduler: Any = None,
    seed: int | None = None,
    preview_interval: int = 0,
    output_format: Any = None,
    truncate_prompt: bool = False,
    adapter_scale: float | None = None,
) -> inference_pb2.GenerateRequest:
    """Zero values mean "the server's default" (see inference.proto); `seed=None` means random;
    `adapter_scale=None` leaves a LoRA model's adapter at full strength (and is the only value
    other models take)."""
    request = inference_pb2.GenerateRequest(
        model=model_name(model),
        prompt=prompt,
        negative_prompt=negative_prompt,
        num_images=num_images,
        width=width,
        height=height,
        steps=steps,
        guidance_scale=guidance_scale,
        scheduler=parse_scheduler(scheduler),  # type: ignore[arg-type]
        preview_interval=preview_interval,
        output_format=parse_image_format(output_format),  # type: ignore[arg-type]
        truncate_prompt=truncate_prompt,
    )
    if seed is not None:
        request.seed = seed
    if adapter_scale is not None:
        request.adapter_scale = adapter_scale
    return request


class GeneratedImage(NamedTuple):
    """A finished image: its encoded bytes and the seed that reproduces it."""

    data: bytes
    seed: int

    @property
    def extension(self) -> str:
        return image_extension(self.data)


def image_extension(data: bytes) -> str:
    """File extension from the bytes' magic number ("bin" when unknown)."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return "bin"
