"""The committed toy-world base (models/toy-world-base): its files match the manifest's digests,
it is of this world, and it loads and samples as a Stable Diffusion pipeline."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from services.common.pipelines import load_pipeline
from services.common.toy_base_files import COMMITTED_BASE, MANIFEST_FILE, verify_base


def test_the_committed_base_matches_its_manifest() -> None:
    manifest = verify_base(COMMITTED_BASE)
    assert manifest["seed"] == 0
    assert manifest["command"].startswith("dreambooth-server pretrain-base --out models/toy-world-base")
    assert manifest["stages"]["unet"]["steps"] > 0


def test_a_changed_file_is_refused(tmp_path: Path) -> None:
    copy = tmp_path / "base"
    shutil.copytree(COMMITTED_BASE, copy)
    config = copy / "unet" / "config.json"
    config.write_text(config.read_text().replace("{", "{ ", 1))
    with pytest.raises(ValueError, match="does not match its manifest"):
        verify_base(copy)


def test_a_base_of_another_world_is_refused(tmp_path: Path) -> None:
    copy = tmp_path / "base"
    shutil.copytree(COMMITTED_BASE, copy)
    manifest = json.loads((copy / MANIFEST_FILE).read_text())
    manifest["world_fingerprint"] = "0" * 64
    (copy / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="another drawing of the toy world"):
        verify_base(copy)


def test_the_committed_base_loads_and_samples() -> None:
    pipe = load_pipeline(COMMITTED_BASE)
    images = pipe(
        "a photo of a red ball on the beach",
        num_inference_steps=2,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()
