"""The fine-tuning recipes ToyBench compares (the rows of docs/quality.md), in one place.

`DREAMBOOTH` is the recipe ToyBench measured best on the toy-world base (docs/quality.md says
how it was chosen); the other rows each change one thing of it, as the DreamBooth paper's
ablations do, or of `LORA` for the adapter recipes (DoRA, and Prodigy, which is mostly used on
adapters and takes its learning rate of 1.0 with it). `CORE` are the rows the summary and
`--quick` runs need; the recipe rows after them are measured by a full run.
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

# Training recipes of the spec (docs/training.md), one each.
SNR_5 = dataclasses.replace(DREAMBOOTH, name="snr-5", snr_gamma=5.0)
NOISE_OFFSET = dataclasses.replace(DREAMBOOTH, name="noise-offset", noise_offset=0.05)
EMA = dataclasses.replace(DREAMBOOTH, name="ema", ema_decay=0.9999)
PRODIGY = dataclasses.replace(LORA, name="prodigy", optimizer="prodigy", learning_rate=1.0)
DORA = dataclasses.replace(LORA, name="dora", use_dora=True)

CORE = (DREAMBOOTH, NO_PRIOR, TEXT_ENCODER, LORA)
RECIPES: dict[str, Recipe] = {
    recipe.name: recipe for recipe in (*CORE, SNR_5, NOISE_OFFSET, EMA, PRODIGY, DORA)
}
