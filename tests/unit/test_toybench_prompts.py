"""ToyBench's prompt set for a subject: what each prompt asks for is what the metrics check."""

from __future__ import annotations

import pytest

from services.trainer.api import convert
from services.trainer.job_spec import concepts
from services.trainer.jobs.validation import BaseModelInfo, validate_spec
from services.trainer.settings import SpecLimits
from toybench.dreambooth import (
    IDENTIFIER,
    IDENTIFIERS,
    Recipe,
    class_prompt,
    instance_prompt,
    multi_subject_spec,
)
from toybench.evaluation import prompts_for
from toybench.recipes import DREAMBOOTH
from toyworld import BACKGROUNDS, HELD_OUT_SUBJECTS, OBJECTS, Subject, parse_prompt, subject


@pytest.mark.parametrize("subject", HELD_OUT_SUBJECTS, ids=lambda s: s.name)
def test_every_prompt_names_what_it_is_scored_on(subject: Subject) -> None:
    prompts = prompts_for(subject)
    assert set(prompts.recontext) == set(BACKGROUNDS)
    for background, prompt in prompts.recontext.items():
        assert IDENTIFIER in prompt.split()
        assert parse_prompt(prompt) == {"object": subject.object, "background": background}
    assert len(prompts.property_change) == 5 and subject.colour not in prompts.property_change
    for colour, prompt in prompts.property_change.items():
        assert parse_prompt(prompt) == {"object": subject.object, "colour": colour}
    assert parse_prompt(prompts.class_prompt) == {"object": subject.object}
    assert IDENTIFIER not in prompts.class_prompt.split()
    assert set(prompts.other_classes) == set(OBJECTS) - {subject.object}
    for obj, prompt in prompts.other_classes.items():
        assert parse_prompt(prompt)["object"] == obj


def test_a_recipe_becomes_the_job_spec_the_trainer_runs() -> None:
    subject = HELD_OUT_SUBJECTS[0]
    recipe = Recipe(name="r", steps=10, learning_rate=1e-4, train_text_encoder=True)
    spec = recipe.job_spec(subject, "d" * 64, "model-1", seed=3)
    assert spec.instance_prompt == instance_prompt(subject) == f"a photo of {IDENTIFIER} {subject.object}"
    assert spec.class_prompt == class_prompt(subject) == f"a photo of a {subject.object}"
    assert (spec.max_train_steps, spec.seed, spec.model_id) == (10, 3, "model-1")
    assert spec.text_encoder_learning_rate == 1e-4  # follows the UNet's unless the recipe says
    assert spec.with_prior_preservation and spec.checkpointing_steps == 0


class EveryDataset:
    """A catalog in which every dataset exists: what is checked here is the spec's own rules."""

    def exists(self, dataset_id: str) -> bool:
        return True


class OnlyBases:
    """A catalog in which every name is a base model and no fine-tuned model exists yet."""

    def exists(self, model_id: str) -> bool:
        return False

    def describe(self, model_id: str) -> BaseModelInfo:
        return BaseModelInfo(model_id, "base", 64)


def test_a_multi_subject_job_names_each_subject_by_its_own_identifier() -> None:
    subjects = [subject(name) for name in ("striped-ball", "spotted-ball", "dotted-cube")]
    spec = multi_subject_spec(DREAMBOOTH, subjects, ["a" * 64, "b" * 64, "c" * 64], "m", seed=1, steps=600)
    assert [c.identifier_token for c in concepts(spec)] == list(IDENTIFIERS)
    for concept, held_out in zip(concepts(spec), subjects, strict=True):
        assert concept.instance_prompt == instance_prompt(held_out, identifier=concept.identifier_token)
        assert parse_prompt(concept.instance_prompt) == {"object": held_out.object}
    assert spec.max_train_steps == 600 and spec.additional_concepts[0].class_prompt == spec.class_prompt
    # The trainer would accept it as it is.
    request = convert.spec_request_from_proto(convert.spec_to_proto(spec))  # as it would arrive
    assert validate_spec(request, limits=SpecLimits(), models=OnlyBases(), datasets=EveryDataset()) == spec
    with pytest.raises(ValueError, match="at most 3 subjects"):
        multi_subject_spec(DREAMBOOTH, subjects * 2, ["a" * 64] * 6, "m", seed=1, steps=1)
