"""The tiny Stable Diffusion: deterministic, real architecture, loads offline, well-scaled latents.

Nothing is asserted about what the untrained model draws: its images mean nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from dreambooth_client.vocabulary import SCHEDULER_NAMES

from services.common import tiny_model_cli
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound
from services.common.pipelines import assemble_pipeline, load_pipeline
from services.common.schedulers import make_scheduler
from services.common.tiny_model import build_tiny_model, generic_images


def file_digests(folder: Path) -> dict[str, str]:
    return {
        path.relative_to(folder).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


@pytest.fixture(scope="module")
def pipe(tiny_model_dir: Path):
    return load_pipeline(tiny_model_dir)


def test_same_seed_gives_identical_files(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    assert tiny_model_cli.main(["--out", str(tmp_path / "again"), "--seed", "0"]) == 0
    assert "wrote" in capsys.readouterr().out
    first, second = file_digests(tiny_model_dir), file_digests(tmp_path / "again")
    assert first == second
    assert "unet/diffusion_pytorch_model.safetensors" in first
    assert not any(name.endswith((".bin", ".pt", ".ckpt")) for name in first)
    assert [p.name for p in tmp_path.iterdir()] == ["again"]  # no temp folder left behind


def test_other_seed_changes_weights_not_tokenizer(tiny_model_dir: Path, tmp_path: Path) -> None:
    other = file_digests(build_tiny_model(tmp_path / "seed1", seed=1))
    base = file_digests(tiny_model_dir)
    assert (
        other["unet/diffusion_pytorch_model.safetensors"] != base["unet/diffusion_pytorch_model.safetensors"]
    )
    assert other["tokenizer/vocab.json"] == base["tokenizer/vocab.json"]


def test_refuses_a_non_empty_output_folder(tmp_path: Path) -> None:
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    with pytest.raises(FileExistsError):
        build_tiny_model(tmp_path / "taken")
    assert tiny_model_cli.main(["--out", str(tmp_path / "taken")]) == 1


def test_folder_has_the_real_architecture_at_toy_size(tiny_model_dir: Path) -> None:
    index = json.loads((tiny_model_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert index["vae"] == ["diffusers", "AutoencoderKL"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert index["tokenizer"] == ["transformers", "CLIPTokenizer"]
    assert index["scheduler"] == ["diffusers", "DDIMScheduler"]
    assert index["requires_safety_checker"] is False
    size = sum(p.stat().st_size for p in tiny_model_dir.rglob("*") if p.is_file())
    assert 5e6 < size < 30e6


def test_pipeline_makes_a_64x64_image(pipe) -> None:
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == 64
    assert pipe.text_encoder.config.vocab_size == 49408
    assert pipe.safety_checker is None and pipe.feature_extractor is None
    assert pipe._progress_bar_config == {"disable": True}
    out = pipe(
        "a photo of sks dog",
        num_inference_steps=20,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    )
    assert out.images.shape == (1, 64, 64, 3)
    assert np.isfinite(out.images).all()
    first, again = (
        pipe("a dog", num_inference_steps=3, generator=torch.Generator().manual_seed(1)).images[0]
        for _ in range(2)
    )
    assert first.size == (64, 64)
    assert first.tobytes() == again.tobytes()  # same seed, same pixels


def test_assemble_pipeline_shares_the_modules_and_takes_the_scheduler(pipe) -> None:
    scheduler = make_scheduler("euler", pipe.scheduler.config)
    modules = {name: getattr(pipe, name) for name in ("vae", "text_encoder", "tokenizer", "unet")}
    assembled = assemble_pipeline(**modules, scheduler=scheduler)
    assert all(getattr(assembled, name) is module for name, module in modules.items())
    assert assembled.scheduler is scheduler and assembled.safety_checker is None
    assert assembled._progress_bar_config == {"disable": True}


def test_latents_of_generic_images_are_well_scaled(pipe) -> None:
    images = generic_images(32, seed=1234)  # not the calibration images (those use the model seed)
    with torch.no_grad():
        posterior = pipe.vae.encode(images).latent_dist
    latents = posterior.sample(torch.Generator().manual_seed(0)) * pipe.vae.config.scaling_factor
    assert latents.shape == (32, 4, 8, 8)
    assert 0.8 < latents.std().item() < 1.25
    assert abs(latents.mean().item()) < 0.2
    assert posterior.std.max().item() < 1e-4  # pinned log-variance: sampling adds ~no noise


def test_from_pretrained_works_offline(tiny_model_dir: Path) -> None:
    """The plain diffusers call, in a fresh process with the hub off and any proxy a dead end."""
    script = textwrap.dedent(
        """
        import sys
        from diffusers import StableDiffusionPipeline
        pipe = StableDiffusionPipeline.from_pretrained(sys.argv[1])
        print(type(pipe).__name__, pipe.tokenizer("a photo of sks dog").input_ids)
        """
    )
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HTTPS_PROXY": "http://127.0.0.1:9",
        "HTTP_PROXY": "http://127.0.0.1:9",
    }
    done = subprocess.run(
        [sys.executable, "-c", script, str(tiny_model_dir)],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "StableDiffusionPipeline [49406, 320, 1125, 539, 48136, 1929, 49407]" in done.stdout


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_every_scheduler_keeps_the_model_noise_schedule(pipe, name: str) -> None:
    scheduler = make_scheduler(name, pipe.scheduler.config)
    assert scheduler.config.beta_schedule == "scaled_linear"
    assert scheduler.config.beta_end == pytest.approx(0.012)
    scheduler.set_timesteps(5)
    assert len(scheduler.timesteps) >= 5


def test_dpmpp_2m_karras_is_configured_as_named(pipe) -> None:
    scheduler = make_scheduler("dpmpp_2m_karras", pipe.scheduler.config)
    assert type(scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert scheduler.config.use_karras_sigmas is True
    assert scheduler.config.algorithm_type == "dpmsolver++"
    assert scheduler.config.solver_order == 2


def test_unknown_scheduler_names_the_field(pipe) -> None:
    with pytest.raises(InvalidArgument) as err:
        make_scheduler("lms", pipe.scheduler.config)
    assert err.value.field == "scheduler"


def test_load_pipeline_refuses_pickle_only_weights(tiny_model_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    (folder / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"not loaded, ever")
    with pytest.raises(FailedPrecondition, match="safetensors"):
        load_pipeline(folder)
    with pytest.raises(NotFound):
        load_pipeline(tmp_path / "nowhere")
