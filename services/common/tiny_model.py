"""A tiny Stable Diffusion of the real architecture, built deterministically from a seed.

Tests, CI, the demo and CPU benchmarks use it instead of downloading a checkpoint: the same
classes as SD 1.x (UNet2DConditionModel, AutoencoderKL, CLIPTextModel, the real CLIP BPE
tokenizer, DDIM scheduler) at toy width, ~17 MB, 64x64 images, latents 1/8 of the image.

Two fixes make the random weights usable for DreamBooth (DESIGN §6):
- A random VAE predicts log-variance ~0, so sampled latents would be mostly noise: the
  log-variance half of `quant_conv` is pinned to a constant very low value.
- Its latent scale is arbitrary: the mean half is centred and `scaling_factor` set to 1/std of
  the latents of generic (smooth random) images, so scaled latents have std ~1 like real SD.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from services.common.clip_vocab import EOS_TOKEN, MODEL_MAX_LENGTH, VOCAB_SIZE, write_clip_tokenizer

IMAGE_SIZE = 64
LATENT_CHANNELS = 4
VAE_DOWNSCALE = 8  # 4 VAE blocks -> 3 downsamplings, as in SD
PINNED_LOGVAR = -30.0  # DiagonalGaussianDistribution clamps log-variance to [-30, 20]
CALIBRATION_IMAGES = 32
# SD's noise schedule: the one every SD 1.x scheduler config carries.
SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}


def build_tiny_model(out_dir: Path, seed: int = 0) -> Path:
    """Write a StableDiffusionPipeline folder at `out_dir`; same seed => byte-identical files.

    Built in a temporary sibling folder and renamed into place, so `out_dir` either does not
    exist or holds a complete model. Refuses to overwrite a non-empty `out_dir`.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} exists and is not empty")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        _write_pipeline(tmp, seed)
        tmp.chmod(0o755)  # mkdtemp makes it private; the model is an ordinary folder
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above); rename needs it gone
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _write_pipeline(folder: Path, seed: int) -> None:
    from diffusers import DDIMScheduler
    from transformers import CLIPTokenizer

    from services.common.pipelines import assemble_pipeline, disable_progress_bars

    disable_progress_bars()

    write_clip_tokenizer(folder / "tokenizer")
    pipe = assemble_pipeline(
        vae=_make_vae(seed),
        text_encoder=_make_text_encoder(seed + 1),
        tokenizer=CLIPTokenizer.from_pretrained(str(folder / "tokenizer")),
        unet=_make_unet(seed + 2),
        scheduler=DDIMScheduler(**SCHEDULER_CONFIG),
    )
    # Save everything but the tokenizer, whose files we wrote ourselves (transformers would add
    # a tokenizer.json with its own formatting); model_index.json still lists it.
    for name in ("vae", "text_encoder", "unet", "scheduler"):
        getattr(pipe, name).save_pretrained(folder / name)
    pipe.save_config(folder)


def _make_unet(seed: int) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE // VAE_DOWNSCALE,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        layers_per_block=2,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    ).eval()


def _make_text_encoder(seed: int) -> torch.nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MODEL_MAX_LENGTH,
        hidden_act="quick_gelu",
        bos_token_id=VOCAB_SIZE - 2,
        eos_token_id=VOCAB_SIZE - 1,  # pooled output is taken at the real <|endoftext|> id
        pad_token_id=VOCAB_SIZE - 1,
        projection_dim=32,
    )
    assert EOS_TOKEN == "<|endoftext|>"
    return CLIPTextModel(config).eval()


def _make_vae(seed: int) -> torch.nn.Module:
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 32, 32, 32),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=16,
        sample_size=IMAGE_SIZE,
    ).eval()
    _calibrate_latents(vae, seed)
    return vae


@torch.no_grad()
def _calibrate_latents(vae: torch.nn.Module, seed: int) -> None:
    """Pin the posterior log-variance, centre the mean and set scaling_factor = 1/std."""
    conv = vae.quant_conv  # 1x1 conv: encoder moments -> (mean, logvar)
    conv.weight[LATENT_CHANNELS:] = 0.0
    conv.bias[LATENT_CHANNELS:] = PINNED_LOGVAR
    means = vae.encode(generic_images(CALIBRATION_IMAGES, seed)).latent_dist.mean
    conv.bias[:LATENT_CHANNELS] -= means.mean(dim=(0, 2, 3))
    centred = vae.encode(generic_images(CALIBRATION_IMAGES, seed)).latent_dist.mean
    # Rounded so the config JSON does not carry float noise.
    vae.register_to_config(scaling_factor=round(1.0 / centred.std().item(), 5))


def generic_images(count: int, seed: int, size: int = IMAGE_SIZE) -> torch.Tensor:
    """Smooth random images in [-1, 1] (NCHW): coarse noise upsampled, like blurry photos."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(count, 3, 4, 4, generator=generator) * 2 - 1
    fine = torch.rand(count, 3, 16, 16, generator=generator) * 2 - 1
    image = torch.nn.functional.interpolate(coarse, size=size, mode="bicubic", align_corners=False)
    image += 0.3 * torch.nn.functional.interpolate(fine, size=size, mode="bilinear", align_corners=False)
    return image.clamp(-1, 1)
