"""The fine-tuning recipes ToyBench compares (the rows of docs/quality.md), in one place.

`DREAMBOOTH` is the recipe ToyBench measured best on the toy-world base (docs/quality.md says
how it was chosen); the other rows each change one thing of it, as the DreamBooth paper's
ablations do.
"""

from __future__ import annotations

import dataclasses

from toybench.dreambooth import Recipe

DREAMBOOTH = Recipe(name="dreambooth", steps=200, learning_rate=2e-4)
NO_PRIOR = dataclasses.replace(DREAMBOOTH, name="no-prior", with_prior_preservation=False)
TEXT_ENCODER = dataclasses.replace(
    DREAMBOOTH, name="text-encoder", train_text_encoder=True, text_encoder_learning_rate=5e-5
)
LORA = dataclasses.replace(DREAMBOOTH, name="lora", use_lora=True, learning_rate=1e-3)

RECIPES: dict[str, Recipe] = {recipe.name: recipe for recipe in (DREAMBOOTH, NO_PRIOR, TEXT_ENCODER, LORA)}
