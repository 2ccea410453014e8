"""One vocabulary: every proto enum value has a name, a server implementation, one meaning."""

from __future__ import annotations

import pytest
from dreambooth.v1 import common_pb2
from dreambooth_client import vocabulary

from services.common.errors import InvalidArgument
from services.common.images import ENCODERS
from services.common.request_checks import (
    check_guidance,
    check_seed,
    image_format_from_proto,
    scheduler_from_proto,
)
from services.common.schedulers import SCHEDULER_CLASSES


def specified(enum: object) -> dict[str, int]:
    return {v.name: v.number for v in enum.DESCRIPTOR.values if v.number != 0}  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("enum", "prefix", "names", "server_table"),
    [
        (common_pb2.Scheduler, "SCHEDULER_", vocabulary.SCHEDULERS, SCHEDULER_CLASSES),
        (common_pb2.ImageFormat, "IMAGE_FORMAT_", vocabulary.IMAGE_FORMATS, ENCODERS),
    ],
)
def test_every_enum_value_has_a_name_and_a_server_entry(
    enum: object, prefix: str, names: dict[str, int], server_table: dict[str, object]
) -> None:
    values = specified(enum)
    expected = {name.removeprefix(prefix).lower(): number for name, number in values.items()}
    assert dict(names) == expected
    missing = sorted(set(names) - set(server_table))
    assert not missing, f"proto values with no server implementation: {missing}"
    assert set(server_table) <= set(names), "server entries the proto cannot ask for"


def test_unspecified_means_the_default_everywhere() -> None:
    assert vocabulary.scheduler_name(common_pb2.SCHEDULER_UNSPECIFIED) == "ddim"
    assert scheduler_from_proto(common_pb2.SCHEDULER_UNSPECIFIED) == vocabulary.DEFAULT_SCHEDULER
    assert scheduler_from_proto(common_pb2.SCHEDULER_EULER_ANCESTRAL) == "euler_ancestral"
    assert image_format_from_proto(common_pb2.IMAGE_FORMAT_UNSPECIFIED) == "png"
    assert image_format_from_proto(common_pb2.IMAGE_FORMAT_WEBP) == "webp"


def test_names_and_numbers_round_trip() -> None:
    for name, number in vocabulary.SCHEDULERS.items():
        assert vocabulary.scheduler_value(name) == number and vocabulary.scheduler_name(number) == name
    for name, number in vocabulary.IMAGE_FORMATS.items():
        assert vocabulary.image_format_value(name) == number
        assert vocabulary.image_format_name(number) == name
    for bad in ("unspecified", "ddpm", "DDIM"):
        with pytest.raises(ValueError, match="scheduler"):
            vocabulary.scheduler_value(bad)


@pytest.mark.parametrize(
    ("convert", "field"), [(scheduler_from_proto, "scheduler"), (image_format_from_proto, "output_format")]
)
def test_unknown_enum_numbers_are_refused_by_field(convert, field: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        convert(99)
    assert caught.value.field == field and "99" in str(caught.value)


def test_seed_range_is_uint32_and_image_seeds_wrap() -> None:
    assert (vocabulary.MIN_SEED, vocabulary.MAX_SEED) == (0, 2**32 - 1)
    assert [vocabulary.image_seed(2**32 - 1, i) for i in range(3)] == [2**32 - 1, 0, 1]
    assert check_seed(0) == 0 and check_seed(2**32 - 1) == 2**32 - 1
    for seed in (-1, 2**32, 2**63 - 1):
        with pytest.raises(InvalidArgument) as caught:
            check_seed(seed)
        assert caught.value.field == "seed"


def test_guidance_bounds() -> None:
    assert check_guidance(vocabulary.MIN_GUIDANCE) == 1.0 and check_guidance(vocabulary.MAX_GUIDANCE) == 30.0
    assert vocabulary.is_valid_guidance(vocabulary.DEFAULT_GUIDANCE)
    for scale in (0.99, 30.01, float("nan"), float("inf")):
        with pytest.raises(InvalidArgument):
            check_guidance(scale)
