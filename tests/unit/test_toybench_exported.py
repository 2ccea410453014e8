"""ToyBench scores of an exported model folder (what `dreambooth train --toybench-subject` runs on
each model a sweep publishes): the committed toy-world base, a diffusers folder as an export is."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.common.toy_base_files import COMMITTED_BASE
from toybench.exported import COLUMNS, ExportedModelScorer


@pytest.mark.slow  # 7 images on the toy-world base: 1-3 minutes on 2 busy cores
def test_an_exported_folder_gets_the_sweep_columns() -> None:
    scorer = ExportedModelScorer("striped-ball", images_per_prompt=1, class_images=2)
    scores = scorer.score(COMMITTED_BASE)
    assert set(COLUMNS) <= set(scores)
    assert -1 <= scores["subject_fidelity"] <= 1
    assert 0 <= scores["prompt_fidelity"] <= 1 and scores["class_accuracy"] in (0.0, 0.5, 1.0)
    # The base has never seen the subject: nowhere near its real photos (docs/quality.md: -0.07).
    assert scores["subject_fidelity"] < 0.3


def test_folders_it_cannot_score_are_refused_in_words(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no held-out subject 'red-ball'; one of striped-ball"):
        ExportedModelScorer("red-ball")
    scorer = ExportedModelScorer("striped-ball", images_per_prompt=1, class_images=2)
    (tmp_path / "pytorch_lora_weights.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="is a LoRA adapter: score it on its base model's folder"):
        scorer.score(tmp_path)
    with pytest.raises(ValueError, match="not a diffusers model folder"):
        scorer.score(tmp_path / "nothing-here")
