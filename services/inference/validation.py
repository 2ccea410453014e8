"""Checks of a Generate request, in two passes, both before any model is loaded.

`check_request` needs nothing but the request (ranges, names, formats); `check_against_model`
needs the model's light spec (default size, tokenizer): the prompt's token count decides whether
it fits the text encoder. Every failure is an InvalidArgument naming the proto field.
"""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Callable

from dreambooth_client import vocabulary

from services.common.errors import InvalidArgument
from services.common.request_checks import (
    check_adapter_scale,
    check_guidance,
    check_image_format,
    check_scheduler,
    check_seed,
)
from services.inference.params import GenerateParams

MAX_IMAGES = 8
MAX_STEPS = 150
MIN_SIZE = 64
SIZE_MULTIPLE = 8
DEFAULT_STEPS = 30


@dataclasses.dataclass(frozen=True)
class RequestLimits:
    max_width: int = 1024
    max_height: int = 1024
    max_prompt_chars: int = 4096


def check_request(params: GenerateParams, limits: RequestLimits) -> GenerateParams:
    """Validate what needs no model and fill the defaults that need none (size stays 0 = model's)."""
    num_images = params.num_images or 1
    if not 1 <= num_images <= MAX_IMAGES:
        raise InvalidArgument("num_images", f"must be between 1 and {MAX_IMAGES}, got {params.num_images}")
    _check_size("width", params.width, limits.max_width)
    _check_size("height", params.height, limits.max_height)
    steps = params.steps or DEFAULT_STEPS
    if not 1 <= steps <= MAX_STEPS:
        raise InvalidArgument("steps", f"must be between 1 and {MAX_STEPS}, got {params.steps}")
    guidance = check_guidance(params.guidance_scale or vocabulary.DEFAULT_GUIDANCE)
    check_scheduler(params.scheduler)
    check_image_format(params.output_format)
    if params.preview_interval < 0:
        raise InvalidArgument("preview_interval", f"must be >= 0, got {params.preview_interval}")
    if params.seed is not None:
        check_seed(params.seed)  # any seed in range, for any count: image seeds wrap
    if params.adapter_scale is not None:
        check_adapter_scale(params.adapter_scale)
    if not params.prompt.strip():
        raise InvalidArgument("prompt", "must not be empty")
    for field in ("prompt", "negative_prompt"):
        length = len(getattr(params, field))
        if length > limits.max_prompt_chars:
            raise InvalidArgument(field, f"is {length} characters; the limit is {limits.max_prompt_chars}")
    return dataclasses.replace(params, num_images=num_images, steps=steps, guidance_scale=guidance)


def _check_size(field: str, value: int, limit: int) -> None:
    if value == 0:
        return  # the model's default, checked against the limit once the model is known
    if value % SIZE_MULTIPLE or not MIN_SIZE <= value <= limit:
        raise InvalidArgument(
            field, f"must be a multiple of {SIZE_MULTIPLE} between {MIN_SIZE} and {limit}, got {value}"
        )


def check_against_model(
    params: GenerateParams,
    limits: RequestLimits,
    *,
    default_width: int,
    default_height: int,
    count_tokens: Callable[[str], int],
    max_tokens: int,
    is_lora: bool = False,
) -> GenerateParams:
    """Resolve the model-dependent defaults and check the prompts' token counts.

    `count_tokens(text)` counts the tokens the text encoder would see, start and end included.
    An adapter scale is for LoRA models only (unset there = 1).
    """
    adapter_scale = params.adapter_scale
    if is_lora and adapter_scale is None:
        adapter_scale = vocabulary.DEFAULT_ADAPTER_SCALE
    elif not is_lora and adapter_scale is not None:
        raise InvalidArgument(
            "adapter_scale", f"applies to LoRA models only; models/{params.model_id} is not one"
        )
    width = params.width or default_width
    height = params.height or default_height
    _check_size("width", width, limits.max_width)
    _check_size("height", height, limits.max_height)
    if not params.truncate_prompt:
        for field in ("prompt", "negative_prompt"):
            text = getattr(params, field)
            if not text:
                continue
            count = count_tokens(text)
            if count > max_tokens:
                raise InvalidArgument(
                    field,
                    f"is {count} tokens; the text encoder takes at most {max_tokens} "
                    "(set truncate_prompt to cut it)",
                )
    return dataclasses.replace(params, width=width, height=height, adapter_scale=adapter_scale)


def with_seed(params: GenerateParams) -> GenerateParams:
    """The request with its seed set: a random one when the client left it unset."""
    if params.seed is not None:
        return params
    return dataclasses.replace(params, seed=secrets.randbelow(vocabulary.SEED_MODULUS))
