"""Validation of prior-set requests and the content-addressed key."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest

from services.common.errors import InvalidArgument
from services.common.settings import from_env
from services.priorgen.cache_key import image_key, manifest_key, parse_image_index, prior_key, set_prefix
from services.priorgen.request import PriorRequest, PriorSpec, validate_request
from services.priorgen.settings import ENV_PREFIX, PriorGenSettings

SETTINGS = PriorGenSettings(default_resolution=64, default_steps=20, default_guidance_scale=7.5)
DIGEST = "ab" * 32


def request(**fields: object) -> PriorRequest:
    values: dict[str, object] = {
        "base_model": "models/tiny-sd",
        "class_prompt": "a photo of dog",
        "num_images": 4,
    }
    values.update(fields)
    return PriorRequest(**values)  # type: ignore[arg-type]


def test_defaults_are_resolved() -> None:
    spec = validate_request(request(), SETTINGS)
    assert spec == PriorSpec(
        model_id="tiny-sd",
        class_prompt="a photo of dog",
        negative_prompt="",
        num_images=4,
        resolution=64,
        steps=20,
        guidance_scale=7.5,
        scheduler="ddim",
        seed=0,
    )


def test_zero_and_the_explicit_default_give_one_key() -> None:
    implicit = validate_request(request(), SETTINGS)
    explicit = validate_request(
        request(
            resolution=64, steps=20, guidance_scale=7.5, scheduler="ddim", class_prompt=" a photo of dog "
        ),
        SETTINGS,
    )
    assert prior_key(DIGEST, implicit, 4) == prior_key(DIGEST, explicit, 4)


@pytest.mark.parametrize(
    "change",
    [
        {"class_prompt": "a photo of cat"},
        {"negative_prompt": "blurry"},
        {"num_images": 5},
        {"resolution": 128},
        {"steps": 21},
        {"guidance_scale": 5.0},
        {"scheduler": "euler"},
        {"seed": 1},
    ],
)
def test_every_input_changes_the_key(change: dict[str, object]) -> None:
    base = prior_key(DIGEST, validate_request(request(), SETTINGS), 4)
    assert prior_key(DIGEST, validate_request(request(**change), SETTINGS), 4) != base


def test_the_model_digest_and_compute_width_change_the_key_but_not_the_model_id() -> None:
    spec = validate_request(request(), SETTINGS)
    assert prior_key(DIGEST, spec, 4) != prior_key("cd" * 32, spec, 4)
    assert prior_key(DIGEST, spec, 4) != prior_key(DIGEST, spec, 1)
    renamed = dataclasses.replace(spec, model_id="other")
    assert prior_key(DIGEST, renamed, 4) == prior_key(DIGEST, spec, 4)


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"base_model": "tiny-sd"}, "base_model"),
        ({"base_model": "models/"}, "base_model"),
        ({"base_model": "models/UPPER"}, "base_model"),
        ({"class_prompt": ""}, "class_prompt"),
        ({"class_prompt": "   "}, "class_prompt"),
        ({"class_prompt": "x" * 1001}, "class_prompt"),
        ({"negative_prompt": "x" * 1001}, "negative_prompt"),
        ({"num_images": 0}, "num_images"),
        ({"num_images": -1}, "num_images"),
        ({"num_images": 1001}, "num_images"),
        ({"resolution": 60}, "resolution"),
        ({"resolution": -64}, "resolution"),
        ({"resolution": 1032}, "resolution"),
        ({"steps": -1}, "steps"),
        ({"steps": 151}, "steps"),
        ({"guidance_scale": 0.5}, "guidance_scale"),
        ({"guidance_scale": 30.5}, "guidance_scale"),
        ({"guidance_scale": float("nan")}, "guidance_scale"),
        ({"guidance_scale": -1.0}, "guidance_scale"),
        ({"scheduler": "ddpm"}, "scheduler"),
        ({"scheduler": ""}, "scheduler"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**32}, "seed"),  # uint32 seeds in every service
        ({"num_images": 1000, "resolution": 1024, "steps": 150}, "request"),  # over the cost ceiling
    ],
)
def test_bad_fields_are_refused_by_name(fields: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        validate_request(request(**fields), SETTINGS)
    assert info.value.field == field


def test_limits_come_from_settings() -> None:
    settings = dataclasses.replace(SETTINGS, max_images=10, max_resolution=128, max_steps=30)
    assert validate_request(request(num_images=10, resolution=128, steps=30), settings).num_images == 10
    for fields, field in [({"num_images": 11}, "num_images"), ({"resolution": 136}, "resolution")]:
        with pytest.raises(InvalidArgument) as info:
            validate_request(request(**fields), settings)
        assert info.value.field == field


def test_image_seeds_follow_the_index_and_wrap() -> None:
    spec = validate_request(request(seed=2**32 - 1), SETTINGS)
    assert spec.seed == 2**32 - 1
    assert [spec.image_seed(i) for i in range(3)] == [2**32 - 1, 0, 1]


def legacy_key(spec: PriorSpec, compute_width: int) -> str:
    """The key as key format 1 first defined it (before image seeds wrapped at 2**32)."""
    inputs = {k: v for k, v in dataclasses.asdict(spec).items() if k != "model_id"}
    payload = {"format": 1, "model_digest": DIGEST, "compute_width": compute_width, "inputs": inputs}
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def test_sets_whose_seeds_do_not_wrap_keep_their_keys_and_the_others_get_new_ones() -> None:
    for seed, count in [(0, 4), (2**32 - 4, 4)]:
        spec = validate_request(request(seed=seed, num_images=count), SETTINGS)
        assert prior_key(DIGEST, spec, 4) == legacy_key(spec, 4)
    wrapping = validate_request(request(seed=2**32 - 3, num_images=4), SETTINGS)
    assert prior_key(DIGEST, wrapping, 4) != legacy_key(wrapping, 4)


def test_layout() -> None:
    key = "k" * 64
    assert set_prefix(key) == f"priors/{key}/"
    assert image_key(key, 7) == f"priors/{key}/images/00007.png"
    assert manifest_key(key) == f"priors/{key}/manifest.json"
    assert parse_image_index(key, image_key(key, 123)) == 123
    assert parse_image_index(key, manifest_key(key)) is None
    assert parse_image_index(key, f"priors/{key}/images/00007.png.tmp") is None
    assert parse_image_index(key, "priors/other/images/00007.png") is None


def test_settings_from_env() -> None:
    settings = from_env(
        PriorGenSettings,
        ENV_PREFIX,
        {
            "DREAMBOOTH_PRIORGEN_PORT": "6000",
            "DREAMBOOTH_PRIORGEN_BATCH_SIZE": "8",
            "DREAMBOOTH_PRIORGEN_COMPUTE_WIDTH": "8",
            "DREAMBOOTH_S3_BUCKET": "b",
        },
    )
    assert (settings.server.port, settings.server.metrics_port, settings.batch_size) == (6000, 9182, 8)
    assert settings.store.s3_bucket == "b"
    with pytest.raises(ValueError, match="batch_size"):
        PriorGenSettings(batch_size=0)
    with pytest.raises(ValueError, match="compute_width"):
        PriorGenSettings(batch_size=8, compute_width=4)
    with pytest.raises(ValueError, match="default_guidance_scale"):
        PriorGenSettings(default_guidance_scale=40.0)
