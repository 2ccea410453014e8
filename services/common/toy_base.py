"""The toy-world base: a Stable Diffusion of the real architecture, pretrained on the toy world.

`pretrain_base(out, settings)` draws the world, trains the VAE (stage 1), caches the latents of
the photos, trains UNet + text encoder together with caption dropout for classifier-free
guidance (stage 2), and writes a diffusers folder (safetensors) with `pretrain_manifest.json`:
file digests, the command, seed, settings, versions, the world's version and fingerprint, and
what each stage measured. Same settings, seed and thread count => the same bytes.

Sizes follow the feasibility run in issue 9: 64x64 photos, a 3-block VAE (latents 4x16x16,
needed for a 7-pixel stripe to survive), UNet (32, 64, 128), a 2-layer 64-wide text encoder with
the real CLIP vocabulary. The UNet and text encoder never see a pattern; the VAE, like SD's,
is a general image codec and also sees patterned objects (never a held-out subject's identity).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import toyworld
from services.common.clip_vocab import MODEL_MAX_LENGTH, VOCAB_SIZE, write_clip_tokenizer
from services.common.tiny_model import LATENT_CHANNELS, SCHEDULER_CONFIG
from services.common.toy_base_files import MANIFEST_FILE, folder_digests
from services.common.toy_base_settings import Deadline, PretrainSettings
from services.common.toy_base_stages import encode_latents, train_unet, train_vae, world_photos

IMAGE_SIZE = 64
VAE_DOWNSCALE = 4  # 3 VAE blocks -> 2 downsamplings: 16x16 latents at 64x64
TEXT_WIDTH = 64


# ---------------------------------------------------------------- the architecture


def make_vae(seed: int) -> torch.nn.Module:
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=16,
        sample_size=IMAGE_SIZE,
    )


def make_unet(seed: int) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE // VAE_DOWNSCALE,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        layers_per_block=1,
        block_out_channels=(32, 64, 128),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=8,
        norm_num_groups=32,
    )


def make_text_encoder(seed: int) -> torch.nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=VOCAB_SIZE,
            hidden_size=TEXT_WIDTH,
            intermediate_size=4 * TEXT_WIDTH,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=MODEL_MAX_LENGTH,
            hidden_act="quick_gelu",
            bos_token_id=VOCAB_SIZE - 2,
            eos_token_id=VOCAB_SIZE - 1,  # pooled output at the real <|endoftext|> id
            pad_token_id=VOCAB_SIZE - 1,
            projection_dim=TEXT_WIDTH,
        )
    )


# ---------------------------------------------------------------- the run


def pretrain_base(
    out_dir: Path,
    seed: int,
    settings: PretrainSettings,
    *,
    command: str,
    overwrite: bool = False,
    minutes: float | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Pretrain and write the model folder at `out_dir`; returns the manifest.

    Built in a temporary sibling folder and moved into place at the end, so `out_dir` is either
    the old content or a complete model. Refuses an existing `out_dir` unless `overwrite`.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists: pass --overwrite to replace it")
    deadline = Deadline(minutes)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        started = time.perf_counter()
        photos, scenes = world_photos(seed, settings.images, patterned=0.0)
        vae_photos, _ = world_photos(seed + 1, settings.vae_images, patterned=settings.vae_patterned)
        drawn_s = time.perf_counter() - started
        log(f"drew {settings.images + settings.vae_images} photos of the world in {drawn_s:.0f} s")
        vae, vae_report = train_vae(make_vae(seed), vae_photos, seed, settings, deadline, log)
        latents = encode_latents(vae, photos)
        tokenizer = _tokenizer(tmp / "tokenizer")
        unet, text_encoder, unet_report = train_unet(
            make_unet(seed + 1),
            make_text_encoder(seed + 2),
            tokenizer,
            latents,
            scenes,
            seed,
            settings,
            deadline,
            log,
        )
        _write_folder(tmp, vae, text_encoder, tokenizer, unet, settings.save_dtype)
        manifest = {
            "model": "toy-world base (Stable Diffusion architecture)",
            "world_version": toyworld.WORLD_VERSION,
            "world_fingerprint": toyworld.world_fingerprint(),
            "command": command,
            "seed": seed,
            "threads": torch.get_num_threads(),
            "settings": dataclasses.asdict(settings),
            "minutes_cap": minutes,
            "versions": versions(),
            "stages": {"draw_seconds": round(drawn_s, 1), "vae": vae_report, "unet": unet_report},
            "total_seconds": round(time.perf_counter() - started, 1),
            "files": folder_digests(tmp),
        }
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
        tmp.chmod(0o755)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _tokenizer(folder: Path) -> Any:
    """The real CLIP tokenizer, written into the model folder and loaded from there."""
    from transformers import CLIPTokenizer

    write_clip_tokenizer(folder)
    return CLIPTokenizer.from_pretrained(str(folder))


def _write_folder(
    folder: Path, vae: Any, text_encoder: Any, tokenizer: Any, unet: Any, save_dtype: str
) -> None:
    """The diffusers folder. The tokenizer's files are already there (written by us, not
    transformers, so no tokenizer.json is added); model_index.json still lists it."""
    from diffusers import DDIMScheduler

    from services.common.pipelines import assemble_pipeline, disable_progress_bars

    disable_progress_bars()
    pipe = assemble_pipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=DDIMScheduler(**SCHEDULER_CONFIG),
    )
    dtype = getattr(torch, save_dtype)
    from diffusers.utils import logging as diffusers_logging

    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # casting for the file: no "keep in float32" notes
    try:
        for name in ("vae", "text_encoder", "unet"):
            getattr(pipe, name).to(dtype).save_pretrained(folder / name)
    finally:
        diffusers_logging.set_verbosity(verbosity)
    pipe.scheduler.save_pretrained(folder / "scheduler")
    pipe.save_config(folder)


# ---------------------------------------------------------------- the manifest


def versions() -> dict[str, str]:
    import diffusers
    import numpy
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "numpy": numpy.__version__,
        "toyworld": toyworld.WORLD_VERSION,
    }
