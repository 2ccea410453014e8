"""Multi-subject specs (`additional_concepts`): every subject must be told apart and exist, and
each refusal names the concept's field (`spec.additional_concepts[1].identifier_token`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from services.common.errors import InvalidArgument, NotFound
from services.common.local_store import LocalObjectStore
from services.common.model_store import ModelStore
from services.trainer.job_spec import Concept, ConceptRequest
from services.trainer.jobs.datasets import DatasetStore
from services.trainer.jobs.validation import SpecRequest, StoreModelCatalog, validate_spec
from services.trainer.settings import SpecLimits, TrainerSettings
from tests.fixtures.trainer_server import make_dataset

LIMITS = SpecLimits()


@dataclasses.dataclass(frozen=True)
class Env:
    models: StoreModelCatalog
    datasets: DatasetStore
    other_tenant: DatasetStore  # sees none of the implicit tenant's datasets
    names: tuple[str, ...]  # three datasets of the implicit tenant, `datasets/{sha256}`


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Env:
    root = tmp_path_factory.mktemp("concepts")
    store = LocalObjectStore(root / "store")
    models = ModelStore(store, root / "cache")
    models.import_folder(tiny_model_dir, "tiny-sd")
    datasets = DatasetStore(store)
    names = tuple(make_dataset(datasets, count=count).name for count in (2, 3, 4))
    return Env(StoreModelCatalog(models), datasets, DatasetStore(store, "beta"), names)


def request(env: Env, *concepts: ConceptRequest, **changes: object) -> SpecRequest:
    values = {
        "base_model": "models/tiny-sd",
        "dataset": env.names[0],
        "instance_prompt": "a photo of sks dog",
        "with_prior_preservation": True,
        "class_prompt": "a photo of dog",
        "max_train_steps": 10,
        "additional_concepts": concepts or None,
    }
    return SpecRequest(**{**values, **changes})


def cat(env: Env, **changes: object) -> ConceptRequest:
    values = {
        "dataset": env.names[1],
        "instance_prompt": "a photo of zwx cat",
        "identifier_token": "zwx",
        "class_prompt": "a photo of cat",
    }
    return ConceptRequest(**{**values, **changes})


def bird(env: Env, **changes: object) -> ConceptRequest:
    values = {
        "dataset": env.names[2],
        "instance_prompt": "a photo of ohwx bird",
        "identifier_token": "ohwx",
        "class_prompt": "a photo of dog",  # the same class as the first subject's: one prior set
    }
    return ConceptRequest(**{**values, **changes})


def validate(env: Env, spec: SpecRequest, limits: SpecLimits = LIMITS, datasets: DatasetStore | None = None):
    return validate_spec(spec, limits=limits, models=env.models, datasets=datasets or env.datasets)


def test_concepts_are_resolved_in_order(env: Env) -> None:
    spec = validate(env, request(env, cat(env), bird(env, class_prompt=None), with_prior_preservation=False))
    assert spec.additional_concepts == (
        Concept(env.names[1].removeprefix("datasets/"), "a photo of zwx cat", "zwx", "a photo of cat"),
        Concept(env.names[2].removeprefix("datasets/"), "a photo of ohwx bird", "ohwx", ""),
    )
    assert validate(env, request(env)).additional_concepts == ()  # a single-subject job, as before


BAD_CONCEPTS = [
    # Each subject needs its own identifier token, images and prompts.
    (
        lambda e: [cat(e), bird(e, identifier_token="zwx", instance_prompt="a zwx bird")],
        "[1].identifier_token",
    ),
    (lambda e: [cat(e, identifier_token="sks", instance_prompt="a sks cat")], "[0].identifier_token"),
    (lambda e: [cat(e), bird(e, identifier_token="ZWX", instance_prompt="ZWX")], "[1].identifier_token"),
    (
        lambda e: [cat(e, instance_prompt="a photo of zwx cat and SKS")],
        "[0].instance_prompt",
    ),  # CLIP lowercases
    (lambda e: [cat(e, dataset=e.names[0])], "[0].dataset"),
    (lambda e: [cat(e), bird(e, dataset=e.names[1])], "[1].dataset"),
    (lambda e: [cat(e, instance_prompt="a photo of a cat")], "[0].instance_prompt"),
    (lambda e: [cat(e, instance_prompt="a photo of zwx cat and sks dog")], "[0].instance_prompt"),
    (lambda e: [cat(e, class_prompt=None)], "[0].class_prompt"),  # with prior preservation
    (lambda e: [cat(e, class_prompt="a photo of sks cat")], "[0].class_prompt"),
    # Single fields, by the concept's rows of the spec table.
    (lambda e: [cat(e, dataset=None)], "[0].dataset"),
    (lambda e: [cat(e, dataset="datasets/not-a-digest")], "[0].dataset"),
    (lambda e: [cat(e), bird(e, instance_prompt=None)], "[1].instance_prompt"),
    (lambda e: [cat(e, instance_prompt="x" * 1001 + " zwx")], "[0].instance_prompt"),
    (lambda e: [cat(e, identifier_token=None)], "[0].identifier_token"),
    (lambda e: [cat(e, identifier_token="two words")], "[0].identifier_token"),
]


@pytest.mark.parametrize(("concepts", "field"), BAD_CONCEPTS, ids=[f for _, f in BAD_CONCEPTS])
def test_a_bad_concept_is_refused_naming_its_field(env: Env, concepts, field: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        validate(env, request(env, *concepts(env)))
    assert info.value.field == f"spec.additional_concepts{field}"
    assert str(info.value).startswith(f"spec.additional_concepts{field}: ")


def test_the_spec_own_instance_prompt_may_not_name_another_subject(env: Env) -> None:
    with pytest.raises(InvalidArgument) as info:
        validate(env, request(env, cat(env), instance_prompt="a photo of sks dog with zwx"))
    assert info.value.field == "spec.instance_prompt" and "'zwx'" in str(info.value)


def test_more_concepts_than_the_server_allows_are_refused(env: Env) -> None:
    limits = TrainerSettings(max_concepts=2).spec_limits  # the spec's own subject and one more
    assert validate(env, request(env, cat(env)), limits).additional_concepts
    with pytest.raises(InvalidArgument) as info:
        validate(env, request(env, cat(env), bird(env)), limits)
    assert info.value.field == "spec.additional_concepts"
    assert "at most 2 subjects" in str(info.value)


def test_a_missing_dataset_is_not_found_naming_the_concept(env: Env) -> None:
    missing = "datasets/" + "0" * 64
    with pytest.raises(NotFound) as info:
        validate(env, request(env, cat(env), bird(env, dataset=missing)))
    assert str(info.value).startswith("spec.additional_concepts[1].dataset: ") and missing in str(info.value)


def test_another_tenants_dataset_is_not_found_as_a_missing_one(env: Env) -> None:
    """The concept's dataset is looked up in the caller's datasets, as the spec's own is."""
    other = env.other_tenant
    own = make_dataset(other, count=5).name  # the spec's own dataset is the other tenant's own
    with pytest.raises(NotFound) as info:
        validate(env, request(env, cat(env), dataset=own), datasets=other)
    assert str(info.value).startswith("spec.additional_concepts[0].dataset: ")
