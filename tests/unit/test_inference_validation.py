"""Request checks of the inference service: every bad field is named, defaults are filled."""

from __future__ import annotations

import dataclasses
import math

import pytest
from dreambooth_client.vocabulary import MAX_SEED

from services.common.errors import InvalidArgument
from services.inference.params import GenerateParams
from services.inference.validation import (
    RequestLimits,
    check_against_model,
    check_request,
    with_seed,
)

LIMITS = RequestLimits(max_width=512, max_height=256, max_prompt_chars=1000)
BASE = GenerateParams(model_id="tiny-sd", prompt="a photo of a dog")


def words(count: int) -> str:
    return " ".join(["dog"] * count)


def test_defaults_follow_the_proto() -> None:
    params = check_request(BASE, LIMITS)
    assert (params.num_images, params.steps, params.guidance_scale) == (1, 30, 7.5)
    assert (params.width, params.height) == (0, 0)  # the model's default, resolved later
    assert params.scheduler == "ddim" and params.output_format == "png" and params.seed is None


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"num_images": 9}, "num_images"),
        ({"num_images": -1}, "num_images"),
        ({"width": 100}, "width"),  # not a multiple of 8
        ({"width": 520}, "width"),  # over the limit
        ({"width": 56}, "width"),  # under 64
        ({"width": -64}, "width"),
        ({"height": 264}, "height"),
        ({"steps": 151}, "steps"),
        ({"steps": -3}, "steps"),
        ({"guidance_scale": 0.5}, "guidance_scale"),
        ({"guidance_scale": 30.5}, "guidance_scale"),
        ({"guidance_scale": -2.0}, "guidance_scale"),
        ({"guidance_scale": math.nan}, "guidance_scale"),
        ({"guidance_scale": math.inf}, "guidance_scale"),
        ({"scheduler": "lms"}, "scheduler"),
        ({"output_format": "gif"}, "output_format"),
        ({"preview_interval": -1}, "preview_interval"),
        ({"seed": -1}, "seed"),
        ({"seed": MAX_SEED + 1}, "seed"),  # 2**32: every service takes uint32 seeds
        ({"seed": 2**63 - 1}, "seed"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": " \n\t "}, "prompt"),
        ({"prompt": "x" * 1001}, "prompt"),
        ({"negative_prompt": "x" * 1001}, "negative_prompt"),
    ],
)
def test_each_bad_field_is_named(changes: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        check_request(dataclasses.replace(BASE, **changes), LIMITS)
    assert caught.value.field == field
    assert str(caught.value).startswith(f"{field}: ")


def test_limits_are_inclusive() -> None:
    params = dataclasses.replace(
        BASE, num_images=8, width=512, height=64, steps=150, guidance_scale=30.0, seed=MAX_SEED
    )
    assert check_request(params, LIMITS).num_images == 8  # the last seed, 8 images: their seeds wrap
    assert check_request(dataclasses.replace(BASE, guidance_scale=1.0), LIMITS).guidance_scale == 1.0


def resolve(params: GenerateParams, count_tokens=lambda text: len(text.split()) + 2) -> GenerateParams:
    return check_against_model(
        check_request(params, LIMITS),
        LIMITS,
        default_width=64,
        default_height=64,
        count_tokens=count_tokens,
        max_tokens=77,
    )


def test_model_default_size_fills_zero() -> None:
    assert (resolve(BASE).width, resolve(BASE).height) == (64, 64)
    assert resolve(dataclasses.replace(BASE, width=128)).width == 128


def test_model_default_size_over_the_limit_is_refused() -> None:
    with pytest.raises(InvalidArgument) as caught:
        check_against_model(
            check_request(BASE, LIMITS),
            LIMITS,
            default_width=768,
            default_height=768,
            count_tokens=len,
            max_tokens=77,
        )
    assert caught.value.field == "width"


@pytest.mark.parametrize("field", ["prompt", "negative_prompt"])
def test_prompts_longer_than_the_text_encoder_are_refused(field: str) -> None:
    assert resolve(dataclasses.replace(BASE, **{field: words(75)})).width == 64  # 77 tokens: fits
    with pytest.raises(InvalidArgument) as caught:
        resolve(dataclasses.replace(BASE, **{field: words(76)}))
    assert caught.value.field == field
    assert "78 tokens" in str(caught.value)


def test_truncate_prompt_lets_long_prompts_through() -> None:
    params = dataclasses.replace(BASE, prompt=words(100), truncate_prompt=True)
    assert resolve(params).prompt == words(100)


def test_with_seed_keeps_a_given_seed_and_draws_a_missing_one() -> None:
    assert with_seed(dataclasses.replace(BASE, seed=0)).seed == 0
    drawn = {with_seed(BASE).seed for _ in range(20)}
    assert all(seed is not None and 0 <= seed < 2**32 for seed in drawn)
    assert len(drawn) > 1
