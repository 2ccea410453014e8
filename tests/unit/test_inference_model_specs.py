"""What validation learns about a model without loading it: default size, token counts."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import CLIPTokenizer

from services.common.errors import NotFound
from services.common.local_store import LocalObjectStore
from services.common.model_store import ModelStore
from services.inference.model_specs import ModelSpecs


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def models(tmp_path: Path, tiny_model_dir: Path) -> ModelStore:
    models = ModelStore(LocalObjectStore(tmp_path / "store"), tmp_path / "cache")
    models.import_folder(tiny_model_dir, "tiny-sd")
    return models


def test_spec_of_the_tiny_model(models: ModelStore, tmp_path: Path, tiny_model_dir: Path) -> None:
    spec = ModelSpecs(models, tmp_path / "cache").get("tiny-sd")
    assert (spec.default_width, spec.default_height, spec.max_tokens) == (64, 64, 77)
    reference = CLIPTokenizer.from_pretrained(str(tiny_model_dir / "tokenizer"))
    text = "a photo of sks dog on the moon, highly detailed"
    assert spec.count_tokens(text) == len(reference(text).input_ids)
    assert spec.count_tokens(" ".join(["dog"] * 100)) == 102  # not truncated: start + 100 + end
    assert not (tmp_path / "cache" / "models").exists()  # no weights were materialised


def test_unknown_model_is_not_found(models: ModelStore, tmp_path: Path) -> None:
    with pytest.raises(NotFound):
        ModelSpecs(models, tmp_path / "cache").get("missing")


def test_models_with_the_same_tokenizer_files_share_one_tokenizer(
    models: ModelStore, tmp_path: Path, tiny_model_dir: Path
) -> None:
    models.import_folder(tiny_model_dir, "tiny-copy", kind="fine_tuned", base_model="tiny-sd")
    specs = ModelSpecs(models, tmp_path / "cache")
    assert specs.get("tiny-sd").count_tokens is specs.get("tiny-copy").count_tokens


def test_specs_are_cached_for_the_ttl_then_reread(
    models: ModelStore, tmp_path: Path, tiny_model_dir: Path
) -> None:
    clock = Clock()
    specs = ModelSpecs(models, tmp_path / "cache", ttl_seconds=2.0, clock=clock)
    first = specs.get("tiny-sd")
    models.import_folder(tiny_model_dir, "tiny-sd", labels={"version": "2"}, overwrite=True)
    clock.now = 1.0
    assert specs.get("tiny-sd") is first  # within the TTL: no store read
    clock.now = 3.0
    second = specs.get("tiny-sd")
    assert second.manifest.labels == {"version": "2"} and second.digest != first.digest
    models.delete("tiny-sd")
    clock.now = 6.0
    with pytest.raises(NotFound):
        specs.get("tiny-sd")
