"""The request vocabulary every service and the client share: one definition of each.

Scheduler and image-format names are built from the proto enums' descriptors: an enum value
`SCHEDULER_EULER_ANCESTRAL` is the name `euler_ancestral` (prefix dropped, lower case);
`*_UNSPECIFIED` is not a name, it means the default. So a value added to the proto is a name
here at once; the servers' tables keyed by these names are tested to cover every one.

Seeds. Every service accepts the same range, 0..2**32-1 (uint32), and image i of a request or
of a prior set uses `image_seed(seed, i)` = (seed + i) mod 2**32, so the seed returned with an
image is itself in range and reproduces that image as image 0 of a new request. Why 32 bits:
- numpy's `RandomState`/`np.random.seed` take only 0..2**32-1 (torch's `manual_seed` takes
  uint64), and the trainer seeds both;
- JavaScript numbers are exact only up to 2**53 (and proto3 JSON sends int64 as a string), so a
  64-bit seed would not survive a browser or a JSON log; 2**32-1 survives every client;
- the proto fields stay `int64` on the wire: it holds the whole range, and a negative or too
  large value reaches the server intact and is refused (INVALID_ARGUMENT), where a narrower wire
  type would have silently truncated it.

Pure Python over the generated stubs: no torch, no services (the client distribution stays light).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from dreambooth.v1 import common_pb2


def _names(enum: Any, prefix: str) -> Mapping[str, int]:
    """`PREFIX_SOME_NAME = n` -> {"some_name": n}, in number order, `*_UNSPECIFIED` left out."""
    values = sorted(enum.DESCRIPTOR.values, key=lambda value: value.number)
    return MappingProxyType(
        {
            value.name.removeprefix(prefix).lower(): value.number
            for value in values
            if not value.name.endswith("_UNSPECIFIED")
        }
    )


# ---------------------------------------------------------------- schedulers

SCHEDULERS: Mapping[str, int] = _names(common_pb2.Scheduler, "SCHEDULER_")  # name -> enum number
SCHEDULER_NAMES: tuple[str, ...] = tuple(SCHEDULERS)
DEFAULT_SCHEDULER = "ddim"  # what SCHEDULER_UNSPECIFIED means, in every service

# ---------------------------------------------------------------- image formats

IMAGE_FORMATS: Mapping[str, int] = _names(common_pb2.ImageFormat, "IMAGE_FORMAT_")
IMAGE_FORMAT_NAMES: tuple[str, ...] = tuple(IMAGE_FORMATS)
DEFAULT_IMAGE_FORMAT = "png"  # what IMAGE_FORMAT_UNSPECIFIED means for final images
PREVIEW_IMAGE_FORMAT = "jpeg"  # previews are small and frequent

# ---------------------------------------------------------------- guidance

MIN_GUIDANCE = 1.0  # 1 disables classifier-free guidance
MAX_GUIDANCE = 30.0
DEFAULT_GUIDANCE = 7.5

# ---------------------------------------------------------------- LoRA adapter scale

MIN_ADAPTER_SCALE = 0.0  # the base alone
MAX_ADAPTER_SCALE = 2.0
DEFAULT_ADAPTER_SCALE = 1.0  # the adapter as trained

# ---------------------------------------------------------------- seeds

MIN_SEED = 0
MAX_SEED = 2**32 - 1
SEED_MODULUS = MAX_SEED + 1

assert DEFAULT_SCHEDULER in SCHEDULERS and DEFAULT_IMAGE_FORMAT in IMAGE_FORMATS
assert PREVIEW_IMAGE_FORMAT in IMAGE_FORMATS


def scheduler_name(value: int) -> str:
    """The name of a Scheduler enum number; 0 (unspecified) is the default. ValueError if unknown."""
    return _name(SCHEDULERS, value, DEFAULT_SCHEDULER, "Scheduler")


def image_format_name(value: int) -> str:
    """The name of an ImageFormat enum number; 0 is the default. ValueError if unknown."""
    return _name(IMAGE_FORMATS, value, DEFAULT_IMAGE_FORMAT, "ImageFormat")


def _name(names: Mapping[str, int], value: int, default: str, enum: str) -> str:
    if value == 0:
        return default
    for name, number in names.items():
        if number == value:
            return name
    raise ValueError(f"unknown {enum} value {value}; expected one of {', '.join(names)}")


def scheduler_value(name: str) -> common_pb2.Scheduler.ValueType:
    """The Scheduler enum number of a name. ValueError if unknown."""
    _check_name(SCHEDULERS, name, "scheduler")
    return common_pb2.Scheduler.Value(f"SCHEDULER_{name.upper()}")


def image_format_value(name: str) -> common_pb2.ImageFormat.ValueType:
    """The ImageFormat enum number of a name. ValueError if unknown."""
    _check_name(IMAGE_FORMATS, name, "image format")
    return common_pb2.ImageFormat.Value(f"IMAGE_FORMAT_{name.upper()}")


def _check_name(names: Mapping[str, int], name: str, what: str) -> None:
    if name not in names:
        raise ValueError(f"unknown {what} {name!r}; expected one of {', '.join(names)}")


def is_valid_seed(seed: int) -> bool:
    return MIN_SEED <= seed <= MAX_SEED


def image_seed(seed: int, index: int) -> int:
    """The seed of image `index` of a request or set seeded `seed`: it wraps, staying uint32."""
    return (seed + index) % SEED_MODULUS


def is_valid_guidance(scale: float) -> bool:
    return math.isfinite(scale) and MIN_GUIDANCE <= scale <= MAX_GUIDANCE


def is_valid_adapter_scale(scale: float) -> bool:
    return math.isfinite(scale) and MIN_ADAPTER_SCALE <= scale <= MAX_ADAPTER_SCALE
