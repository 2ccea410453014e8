"""The shared vocabulary (dreambooth_client.vocabulary) checked the servers' way.

Every service refuses a value outside it with InvalidArgument naming the proto field, never
replaces it; the messages are the same in every service.
"""

from __future__ import annotations

from dreambooth_client import vocabulary

from services.common.errors import InvalidArgument


def scheduler_from_proto(value: int, field: str = "scheduler") -> str:
    """A Scheduler enum number as its name (unspecified = the default scheduler)."""
    try:
        return vocabulary.scheduler_name(value)
    except ValueError as err:
        raise InvalidArgument(field, str(err)) from None


def image_format_from_proto(value: int, field: str = "output_format") -> str:
    """An ImageFormat enum number as its name (unspecified = PNG)."""
    try:
        return vocabulary.image_format_name(value)
    except ValueError as err:
        raise InvalidArgument(field, str(err)) from None


def check_scheduler(name: str, field: str = "scheduler") -> str:
    if name not in vocabulary.SCHEDULERS:
        names = ", ".join(vocabulary.SCHEDULER_NAMES)
        raise InvalidArgument(field, f"unknown scheduler {name!r}; expected one of {names}")
    return name


def check_image_format(name: str, field: str = "output_format") -> str:
    if name not in vocabulary.IMAGE_FORMATS:
        names = ", ".join(vocabulary.IMAGE_FORMAT_NAMES)
        raise InvalidArgument(field, f"unknown format {name!r}; expected one of {names}")
    return name


def check_guidance(scale: float, field: str = "guidance_scale") -> float:
    if not vocabulary.is_valid_guidance(scale):
        raise InvalidArgument(
            field,
            f"must be between {vocabulary.MIN_GUIDANCE:g} and {vocabulary.MAX_GUIDANCE:g} "
            f"(1 disables guidance; 0 = default), got {scale}",
        )
    return scale


def check_adapter_scale(scale: float, field: str = "adapter_scale") -> float:
    if not vocabulary.is_valid_adapter_scale(scale):
        raise InvalidArgument(
            field,
            f"must be between {vocabulary.MIN_ADAPTER_SCALE:g} and {vocabulary.MAX_ADAPTER_SCALE:g} "
            f"(0 = the base alone; unset = {vocabulary.DEFAULT_ADAPTER_SCALE:g}), got {scale}",
        )
    return scale


def check_seed(seed: int, field: str = "seed") -> int:
    """Any seed in range works for any number of images: image seeds wrap (see the vocabulary)."""
    if not vocabulary.is_valid_seed(seed):
        raise InvalidArgument(
            field, f"must be between {vocabulary.MIN_SEED} and {vocabulary.MAX_SEED}, got {seed}"
        )
    return seed
