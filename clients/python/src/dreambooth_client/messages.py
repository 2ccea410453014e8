"""Pure request building: Python values -> `dreambooth.v1` messages, and back for a few results.

Nothing here talks to a server, so the sync and asyncio clients share it and it is tested alone.
Friendly inputs are accepted where they cannot be misread: a model id or its resource name
(`tiny-sd` or `models/tiny-sd`), a proto or its name, enum names in any case (`"euler"`,
`"SCHEDULER_EULER"`). Anything else raises `ValueError`/`TypeError` here, before a call is made;
range checks are left to the server, which owns the limits.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Union

from dreambooth.v1 import common_pb2, inference_pb2, trainer_pb2

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
    """None/"" -> 0 (unspecified); an int that is a member; a member name with or without prefix."""
    if value is None or value == "":
        return 0
    if isinstance(value, bool):
        raise TypeError(f"{what}: expected a name or a number, got {value!r}")
    if isinstance(value, int):
        if value not in enum.values():
            raise ValueError(f"{what}: unknown value {value}")
        return value
    if not isinstance(value, str):
        raise TypeError(f"{what}: expected a name or a number, got {value!r}")
    key = value.strip().upper().replace("-", "_")
    if not key.startswith(prefix):
        key = prefix + key
    if key.endswith("_UNSPECIFIED") or key not in enum.DESCRIPTOR.values_by_name:
        choices = ", ".join(enum_choices(enum, prefix))
        raise ValueError(f"{what}: unknown value {value!r}; choose from {choices}")
    return int(enum.Value(key))


def enum_choices(enum: Any, prefix: str) -> list[str]:
    """Lower-case member names without the prefix, `_UNSPECIFIED` left out (for help texts)."""
    names = enum.keys()  # in number order
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


def parse_job_state(value: Any) -> int:
    return _parse_enum(trainer_pb2.TrainingJobState, "TRAINING_JOB_STATE_", value, "state")


def parse_lr_schedule(value: Any) -> int:
    return _parse_enum(trainer_pb2.LrSchedule, "LR_SCHEDULE_", value, "lr_schedule")


def parse_mixed_precision(value: Any) -> int:
    return _parse_enum(trainer_pb2.MixedPrecision, "MIXED_PRECISION_", value, "mixed_precision")


def parse_optimizer(value: Any) -> int:
    return _parse_enum(trainer_pb2.Optimizer, "OPTIMIZER_", value, "optimizer")


def state_label(state: int) -> str:
    return enum_label(trainer_pb2.TrainingJobState, "TRAINING_JOB_STATE_", state)


def model_kind_label(kind: int) -> str:
    return enum_label(common_pb2.ModelKind, "MODEL_KIND_", kind)


def is_terminal(state: int) -> bool:
    return state in TERMINAL_STATES


# ---------------------------------------------------------------- training spec

_SPEC_CONVERTERS: dict[str, Callable[[Any], Any]] = {
    "base_model": model_name,
    "dataset": dataset_name,
    "lr_schedule": parse_lr_schedule,
    "mixed_precision": parse_mixed_precision,
    "optimizer": parse_optimizer,
}


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
    known = set(trainer_pb2.TrainingJobSpec.DESCRIPTOR.fields_by_name)
    for key, value in values.items():
        name = SPEC_ALIASES.get(key, key)
        if name not in known:
            raise TypeError(f"unknown training spec field {key!r}")
        if value is None:
            continue
        if name in _SPEC_CONVERTERS:
            value = _SPEC_CONVERTERS[name](value)
        if name == "validation_prompts":
            prompts = [value] if isinstance(value, str) else list(value)
            del result.validation_prompts[:]
            result.validation_prompts.extend(prompts)
            continue
        try:
            setattr(result, name, value)
        except (TypeError, ValueError) as err:
            raise TypeError(f"training spec field {name!r}: {err}") from err
    return result


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
