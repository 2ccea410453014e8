"""CI proves that DreamBooth learns (issue 9): one held-out subject fine-tuned on the committed
toy-world base with ToyBench's recipe (prior preservation, the UNet trained), through the
project's training loop and prior-generation core, then measured with ToyBench's evaluation net.

Thresholds from 5 training seeds of the same run (docs/quality.md; striped-ball, 2 images per
prompt, 8 of the class prompt, at 245a56d + def562d): subject fidelity gain over the base 0.319,
0.130, 0.298, 0.356, 0.276 (mean 0.276, sd 0.078; the base scores -0.071); class accuracy of "a
photo of a ball" 0.75, 0.625, 0.875, 0.875, 0.875 (the base: 0.875); background accuracy of the
composed prompts 0.3, 0.3, 0.3, 0.4, 0.5 (the base: 0.5). CI runs seed 0 (gain 0.319, drop 0.125).
The background target (80 %) is not met by this base: that test is a strict expected failure, so
it turns red the day it passes and the threshold can be enforced.
"""

from __future__ import annotations

import time

import pytest

from services.common.toy_base_files import COMMITTED_BASE
from toybench.dreambooth import BASE_MODEL_ID, Workbench
from toybench.evalnet import embed, load_evalnet
from toybench.evaluation import score_model
from toybench.recipes import DREAMBOOTH
from toyworld import subject

SUBJECT = subject("striped-ball")
IMAGES_PER_PROMPT = 2
CLASS_IMAGES = 8
MIN_FIDELITY_GAIN = 0.1  # below every seed's gain (min 0.13), far above an unlearned model's 0
MIN_BACKGROUND_ACCURACY = 0.8
MAX_CLASS_ACCURACY_DROP = 0.25  # the worst seed's drop


@pytest.fixture(scope="module")
def scores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, float]]:
    bench = Workbench(tmp_path_factory.mktemp("toybench"), COMMITTED_BASE)
    net = load_evalnet()
    real = embed(net, SUBJECT.photos())
    try:
        base = score_model(
            net,
            _sampler(bench, BASE_MODEL_ID),
            SUBJECT,
            real,
            IMAGES_PER_PROMPT,
            CLASS_IMAGES,
            all_prompts=False,
        )
        bench.class_priors(DREAMBOOTH.job_spec(SUBJECT, bench.upload(SUBJECT), "unused", seed=0))
        started = time.perf_counter()
        model_id = bench.finetune(SUBJECT, DREAMBOOTH, seed=0)
        trained_s = time.perf_counter() - started
        tuned = score_model(
            net, _sampler(bench, model_id), SUBJECT, real, IMAGES_PER_PROMPT, CLASS_IMAGES, all_prompts=False
        )
    finally:
        bench.close()
    return {"base": base, "tuned": {**tuned, "train_s": trained_s}}


def _sampler(bench: Workbench, model_id: str):
    return lambda prompt, count: bench.sample(model_id, prompt, count)


def test_the_fine_tune_learns_the_subject(scores: dict[str, dict[str, float]]) -> None:
    gain = scores["tuned"]["subject_fidelity"] - scores["base"]["subject_fidelity"]
    assert gain > MIN_FIDELITY_GAIN, scores


@pytest.mark.xfail(strict=True, reason="the base follows backgrounds in half its images (issue 9 is open)")
def test_composed_prompts_keep_their_background(scores: dict[str, dict[str, float]]) -> None:
    assert scores["tuned"]["prompt_fidelity"] >= MIN_BACKGROUND_ACCURACY, scores


def test_prior_preservation_keeps_the_class(scores: dict[str, dict[str, float]]) -> None:
    drop = scores["base"]["class_accuracy"] - scores["tuned"]["class_accuracy"]
    assert drop <= MAX_CLASS_ACCURACY_DROP, scores
