"""The one spec table (dreambooth_client.training_spec) against everything derived from it:
the proto, the trainer's JobSpec, validation of single fields, and the CLI's flags."""

from __future__ import annotations

import dataclasses
import json

import pytest
from dreambooth.v1 import trainer_pb2
from dreambooth_client import cli, messages

from services.common.errors import InvalidArgument
from services.trainer.job_spec import (
    CONCEPT_FIELDS,
    FIELDS,
    FIELDS_BY_NAME,
    Concept,
    ConceptRequest,
    JobSpec,
    SpecRequest,
)
from services.trainer.jobs.spec_fields import check_field
from services.trainer.settings import SpecLimits

LIMITS = SpecLimits()
PROTO_FIELDS = trainer_pb2.TrainingJobSpec.DESCRIPTOR.fields


def test_the_table_has_one_row_per_proto_field() -> None:
    assert sorted(field.name for field in FIELDS) == sorted(f.name for f in PROTO_FIELDS)


def test_every_scalar_proto_field_has_presence() -> None:
    """One convention for "unset": proto3 optional presence (the repeated fields have none)."""
    for field in PROTO_FIELDS:
        if field.is_repeated:
            assert FIELDS_BY_NAME[field.name].type is tuple
            assert (field.message_type is not None) == (FIELDS_BY_NAME[field.name].item is not None)
        else:
            assert field.has_presence, field.name


def test_a_repeated_message_row_is_its_items_rows() -> None:
    """TrainingConcept: the proto's fields, the rows and the SDK's `Concept` are one list."""
    row = FIELDS_BY_NAME["additional_concepts"]
    assert row.item is Concept and Concept.FIELDS is CONCEPT_FIELDS
    proto = trainer_pb2.TrainingConcept.DESCRIPTOR.fields
    assert (
        [f.name for f in proto]
        == [r.name for r in CONCEPT_FIELDS]
        == [f.name for f in dataclasses.fields(Concept)]
    )
    assert [f.name for f in dataclasses.fields(ConceptRequest)] == [r.name for r in CONCEPT_FIELDS]
    assert all(f.has_presence for f in proto)
    assert row.high in {f.name for f in dataclasses.fields(SpecLimits)}


def test_a_jobspec_with_concepts_survives_its_job_record() -> None:
    concept = Concept("b" * 64, "a photo of zwx cat", "zwx", "a photo of cat")
    spec = JobSpec(dataset="a" * 64, additional_concepts=(concept,), validation_prompts=("x",))
    assert JobSpec.from_json(json.loads(json.dumps(spec.to_json()))) == spec
    assert JobSpec.from_json({"dataset": "a" * 64}).additional_concepts == ()  # a record from before


def test_concept_items_are_checked_by_their_rows() -> None:
    row = FIELDS_BY_NAME["additional_concepts"]
    good = ConceptRequest("datasets/x", "a zwx cat", "zwx")
    assert check_field(row, (good,), LIMITS, use_lora=False) == (
        Concept("datasets/x", "a zwx cat", "zwx", ""),
    )
    for bad, field in (
        (dataclasses.replace(good, identifier_token="z w"), "identifier_token"),
        (dataclasses.replace(good, instance_prompt=" "), "instance_prompt"),
        (dataclasses.replace(good, dataset=None), "dataset"),
    ):
        with pytest.raises(InvalidArgument) as info:
            check_field(row, (good, bad), LIMITS, use_lora=False)
        assert info.value.field == f"spec.additional_concepts[1].{field}"
    with pytest.raises(InvalidArgument) as info:
        check_field(row, (good,) * 8, LIMITS, use_lora=False)  # 7 besides the spec's own, by default
    assert info.value.field == "spec.additional_concepts"


def test_enum_rows_list_exactly_the_enum_values() -> None:
    for field in PROTO_FIELDS:
        if field.enum_type is None:
            continue
        row = FIELDS_BY_NAME[field.name]
        names = [value.name for value in field.enum_type.values if value.number]
        assert len(row.choices) == len(names), field.name
        for choice, name in zip(row.choices, names, strict=True):
            assert name.lower().endswith(choice), (field.name, choice, name)


def test_jobspec_and_specrequest_are_the_table() -> None:
    assert [f.name for f in dataclasses.fields(JobSpec)] == [row.name for row in FIELDS]
    assert all(f.default is None for f in dataclasses.fields(SpecRequest))
    spec = JobSpec()
    assert all(getattr(spec, row.name) == row.default for row in FIELDS)
    assert JobSpec.from_json(spec.to_json()) == spec


def test_named_bounds_are_server_limits() -> None:
    limit_names = {f.name for f in dataclasses.fields(SpecLimits)}
    for row in FIELDS:
        for value in (row.low, row.high):
            if isinstance(value, str):
                assert value in limit_names, (row.name, value)


def test_unset_takes_the_default_and_lora_its_own() -> None:
    lr = FIELDS_BY_NAME["learning_rate"]
    assert check_field(lr, None, LIMITS, use_lora=False) == 5e-6
    assert check_field(lr, None, LIMITS, use_lora=True) == 1e-4
    assert check_field(FIELDS_BY_NAME["resolution"], None, LIMITS, use_lora=False) is None  # derived


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("prior_loss_weight", 0.0),  # was silently 1.0
        ("max_train_steps", 0),
        ("lora_rank", 0),
        ("num_workers", 0),
        ("train_batch_size", 0),
        ("identifier_token", ""),
        ("lr_schedule", "unspecified"),
        ("seed", 2**32),
        ("seed", 1.5),
        ("learning_rate", float("inf")),
        ("resolution", 68),
        ("snr_gamma", -1.0),
        ("noise_offset", -0.1),
        ("ema_decay", 1.0),  # the average would never move
        ("ema_decay", -0.5),
        ("optimizer", "unspecified"),
        ("optimizer", "unknown enum value 9"),
    ],
)
def test_an_explicit_value_that_is_not_allowed_is_refused(name: str, value: object) -> None:
    with pytest.raises(InvalidArgument) as info:
        check_field(FIELDS_BY_NAME[name], value, LIMITS, use_lora=False)
    assert info.value.field == f"spec.{name}"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("checkpointing_steps", 0),
        ("max_grad_norm", 0.0),
        ("validation_steps", 0),
        ("seed", 2**32 - 1),
        ("snr_gamma", 0.0),
        ("noise_offset", 0.0),
        ("ema_decay", 0.0),
        ("ema_decay", 0.9999),
    ],
)
def test_zero_where_zero_has_a_documented_meaning_is_kept(name: str, value: object) -> None:
    assert check_field(FIELDS_BY_NAME[name], value, LIMITS, use_lora=False) == value


def test_the_cli_has_a_flag_per_row_and_sends_only_what_was_given() -> None:
    parser = cli.build_parser()
    train = parser.parse_args(
        ["train", "--base-model", "tiny", "--dataset", "datasets/x", "--instance-prompt", "sks dog"]
    )
    for row in FIELDS:
        assert hasattr(train, row.name), row.name
    given = parser.parse_args(
        [
            "train",
            "--base-model",
            "tiny",
            "--dataset",
            "datasets/" + "a" * 64,
            "--instance-prompt",
            "a sks dog",
            "--checkpointing-steps",
            "0",
            "--lr-schedule",
            "cosine",
            "--lora",
            "--validation-prompt",
            "one",
            "--validation-prompt",
            "two",
            "--optimizer",
            "prodigy",
            "--ema-decay",
            "0.999",
            "--dora",
        ]
    )
    spec = messages.build_training_spec(**{row.name: getattr(given, row.name) for row in FIELDS})
    assert spec.HasField("checkpointing_steps") and spec.checkpointing_steps == 0
    assert spec.lr_schedule == trainer_pb2.LR_SCHEDULE_COSINE and spec.use_lora
    assert list(spec.validation_prompts) == ["one", "two"]
    assert spec.optimizer == trainer_pb2.OPTIMIZER_PRODIGY and spec.use_dora
    assert spec.ema_decay == pytest.approx(0.999) and not spec.HasField("snr_gamma")
    assert not spec.HasField("max_train_steps") and not spec.HasField("prior_loss_weight")


def test_the_cli_concept_flag_takes_three_or_four_values() -> None:
    parser = cli.build_parser()
    base = ["train", "--base-model", "tiny", "--dataset", "datasets/a", "--instance-prompt", "a sks dog"]
    args = parser.parse_args(
        [
            *base,
            "--concept", "datasets/b", "zwx", "a photo of zwx cat", "a photo of cat",
            "--concept", "datasets/c", "ohwx", "a photo of ohwx bird",
        ]
    )  # fmt: skip
    assert args.additional_concepts == [
        Concept("datasets/b", "a photo of zwx cat", "zwx", "a photo of cat"),
        Concept("datasets/c", "a photo of ohwx bird", "ohwx"),
    ]
    spec = messages.build_training_spec(**{row.name: getattr(args, row.name) for row in FIELDS})
    assert [(c.dataset, c.identifier_token, c.class_prompt) for c in spec.additional_concepts] == [
        ("datasets/b", "zwx", "a photo of cat"),
        ("datasets/c", "ohwx", ""),
    ]
    assert not parser.parse_args(base).additional_concepts
    for values in (["datasets/b", "zwx"], ["d", "t", "p", "c", "extra"]):
        with pytest.raises(SystemExit):
            parser.parse_args([*base, "--concept", *values])


def test_sdk_aliases_come_from_the_cli_flags() -> None:
    assert messages.SPEC_ALIASES["steps"] == "max_train_steps"
    assert messages.SPEC_ALIASES["lr"] == "learning_rate"
    assert messages.build_training_spec(steps=7, workers=2).num_workers == 2


def test_the_cli_refuses_an_ema_decay_of_one() -> None:
    parser = cli.build_parser()
    required = ["train", "--base-model", "tiny", "--dataset", "datasets/x", "--instance-prompt", "sks dog"]
    with pytest.raises(SystemExit):
        parser.parse_args([*required, "--ema-decay", "1"])
    assert parser.parse_args([*required, "--ema-decay", "0.99"]).ema_decay == 0.99
