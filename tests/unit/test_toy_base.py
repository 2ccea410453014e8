"""`dreambooth-server pretrain-base` in quick mode: a loadable diffusers folder of the real
architecture with 16x16 latents, a manifest that checks its files, and refusals of an existing
folder (without --overwrite) and of a model of another world. The full run is not made here."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import toyworld
from services import cli
from services.common import toy_base_cli
from services.common.pipelines import load_pipeline
from services.common.toy_base import PretrainSettings
from services.common.toy_base_files import MANIFEST_FILE, verify_base
from services.common.toy_base_stages import _variant_weights, caption_variants


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Toy sizes: a second torch thread only adds waiting on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def quick_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("toy-base") / "base"
    assert toy_base_cli.main(["--out", str(out), "--seed", "0", "--quick", "--threads", "1"]) == 0
    return out


def test_quick_pretraining_writes_a_loadable_model_of_the_real_architecture(quick_base: Path) -> None:
    manifest = verify_base(quick_base)
    command = f"dreambooth-server pretrain-base --out {quick_base} --seed 0 --quick --threads 1"
    assert manifest["command"] == command
    assert manifest["seed"] == 0 and manifest["threads"] == 1
    assert manifest["world_version"] == toyworld.WORLD_VERSION
    assert manifest["world_fingerprint"] == toyworld.world_fingerprint()
    assert {"torch", "diffusers", "transformers", "numpy", "python"} <= set(manifest["versions"])
    assert manifest["stages"]["vae"]["steps"] == manifest["stages"]["unet"]["steps"] == 3
    assert manifest["settings"] == {**PretrainSettings.quick().__dict__}
    assert not any(name.endswith((".bin", ".pt", ".ckpt")) for name in manifest["files"])
    index = json.loads((quick_base / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert index["vae"] == ["diffusers", "AutoencoderKL"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]

    pipe = load_pipeline(quick_base)
    assert pipe.unet.dtype == torch.float32  # saved as float16, loaded as float32
    assert len(pipe.tokenizer) == 49408 and pipe.tokenizer.model_max_length == 77
    with torch.no_grad():
        latents = pipe.vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mode()
    assert latents.shape == (1, 4, 16, 16)
    image = pipe(
        "a photo of a red ball on the beach",
        num_inference_steps=2,
        height=64,
        width=64,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()


def test_an_existing_folder_is_refused_without_overwrite(tmp_path: Path, capsys) -> None:
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep").write_text("mine")
    assert toy_base_cli.main(["--out", str(taken), "--quick"]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert (taken / "keep").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir()] == ["taken"]  # no temporary folder left behind


@pytest.mark.slow  # a second quick run (~5 s idle, more on a busy machine)
def test_overwrite_replaces_the_folder_with_the_same_bytes(quick_base: Path, tmp_path: Path) -> None:
    """Same seed, same threads => the same files as the first run (and the old content is gone)."""
    again = tmp_path / "again"
    again.mkdir()
    (again / "stale").write_text("old")
    args = ["--out", str(again), "--seed", "0", "--quick", "--threads", "1", "--overwrite"]
    assert toy_base_cli.main(args) == 0
    assert not (again / "stale").exists()
    first = json.loads((quick_base / MANIFEST_FILE).read_text())["files"]
    assert verify_base(again)["files"] == first


def test_a_changed_file_or_another_world_is_refused(quick_base: Path, tmp_path: Path) -> None:
    copy = shutil.copytree(quick_base, tmp_path / "copy")
    config = copy / "unet" / "config.json"
    config.write_text(config.read_text().replace("32", "33", 1))
    with pytest.raises(ValueError, match=r"unet/config\.json"):
        verify_base(copy)
    other = shutil.copytree(quick_base, tmp_path / "other")
    manifest = json.loads((other / MANIFEST_FILE).read_text())
    (other / MANIFEST_FILE).write_text(json.dumps({**manifest, "world_version": "0"}))
    with pytest.raises(ValueError, match="world version"):
        verify_base(other)
    with pytest.raises(FileNotFoundError):
        verify_base(tmp_path)


def test_pretrain_base_is_a_server_command() -> None:
    assert cli.COMMANDS["pretrain-base"][0] == "services.common.toy_base_cli"


def test_caption_dropout_keeps_the_background_in_most_captions() -> None:
    scene = toyworld.pretraining_scenes(0, 1)[0]
    full, no_colour, no_background, bare, empty = caption_variants(scene)
    assert full == scene.caption() and empty == ""
    assert toyworld.parse_prompt(no_colour).keys() == {"object", "background"}
    assert toyworld.parse_prompt(no_background).keys() == {"object", "colour"}
    assert toyworld.parse_prompt(bare) == {"object": scene.object}
    weights = _variant_weights(PretrainSettings())
    assert float(weights.sum()) == pytest.approx(1.0)
    assert float(weights[0] + weights[1]) >= 0.75  # captions naming the background
