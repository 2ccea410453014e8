"""ToyBench's prompt set for a subject: what each prompt asks for is what the metrics check."""

from __future__ import annotations

import pytest

from toybench.dreambooth import IDENTIFIER, Recipe, class_prompt, instance_prompt
from toybench.evaluation import prompts_for
from toyworld import BACKGROUNDS, HELD_OUT_SUBJECTS, OBJECTS, Subject, parse_prompt


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
