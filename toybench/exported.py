"""ToyBench scores of a model exported from the service (`dreambooth models export`): the
scores bench/quality.py gives the models it trains itself, for a model trained by the service.

    scorer = ExportedModelScorer("striped-ball")
    scorer.score(Path("exported/"))                              # a full fine-tune
    scorer.score(Path("exported-lora/"), base=Path("exported-base/"))  # a LoRA and its base

The model is sampled as the benchmark samples (toybench.dreambooth.sample_images: 64x64, the
services' guidance and scheduler) on ToyBench's recontextualisation and class prompts for the
subject (`all_prompts=False`, the quick form test_learning.py uses) and scored with the
evaluation net against the subject's real photos. The `dreambooth train --toybench-subject`
sweep column reads this; a model not trained on that subject's photos scores as the base does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from services.common.errors import DomainError
from services.common.pipelines import load_pipeline
from services.trainer.worker.publish import LORA_WEIGHTS_FILE, load_lora_pipeline
from toybench.dreambooth import RENDER_WIDTH, Sampling, sample_images
from toybench.evalnet import embed, load_evalnet
from toybench.evaluation import score_model
from toyworld import subject

# The columns a sweep shows, in its table's order (score_model gives two more: see its doc).
COLUMNS = ("subject_fidelity", "prompt_fidelity", "class_accuracy")


class ExportedModelScorer:
    """Scores exported models on one held-out subject; the evaluation net is loaded once."""

    def __init__(
        self,
        subject_name: str,
        images_per_prompt: int = 2,
        class_images: int = 8,
        sampling: Sampling | None = None,
    ) -> None:
        if images_per_prompt < 1 or class_images < 2:  # class diversity compares pairs
            raise ValueError("images_per_prompt must be at least 1 and class_images at least 2")
        self.subject = subject(subject_name)  # ValueError naming the held-out subjects
        self.images_per_prompt = images_per_prompt
        self.class_images = class_images
        self.sampling = sampling or Sampling()
        self.net = load_evalnet()
        self.real = embed(self.net, self.subject.photos())

    def score(self, model_dir: Path, base: Path | None = None) -> dict[str, float]:
        """Subject fidelity, prompt fidelity (backgrounds), class accuracy and more of a diffusers
        folder, or of a LoRA export (`pytorch_lora_weights.safetensors`) on the base folder `base`."""
        try:
            pipe = self._pipeline(Path(model_dir), base)
        except DomainError as err:  # not a model folder, a broken config
            raise ValueError(str(err)) from err
        return score_model(
            self.net,
            # As few slots as the images asked for: a sweep asks for 1-2 per prompt, and the
            # benchmark's 8-slot calls would cost 4-8 times as much for the same images
            # (up to float rounding).
            lambda prompt, count: sample_images(
                pipe, prompt, count, 0, self.sampling, width=min(count, RENDER_WIDTH)
            ),
            self.subject,
            self.real,
            self.images_per_prompt,
            self.class_images,
            all_prompts=False,
        )

    @staticmethod
    def _pipeline(model_dir: Path, base: Path | None) -> Any:
        if (model_dir / LORA_WEIGHTS_FILE).is_file():
            if base is None:
                raise ValueError(f"{model_dir} is a LoRA adapter: score it on its base model's folder")
            return load_lora_pipeline(base, model_dir)
        return load_pipeline(model_dir)
