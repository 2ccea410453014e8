"""Measuring what a model learned about a subject (tests and benchmarks, not the service)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from services.trainer.worker import data
from services.trainer.worker.publish import load_lora_pipeline


@torch.no_grad()
def subject_loss(
    folder: Path,
    images: list[Any],
    prompt: str,
    *,
    resolution: int,
    seed: int = 1234,
    samples: int = 8,
    lora_folder: Path | None = None,
) -> float:
    """Mean noise-prediction MSE of a model on the subject images, at fixed timesteps and noise.

    Every model sees the same (image, timestep, noise) draws, so comparing the base model with a
    fine-tuned one measures what training taught it about the subject under `prompt`.
    """
    from diffusers import DDPMScheduler

    from services.common.pipelines import load_pipeline

    pipe = load_lora_pipeline(folder, lora_folder) if lora_folder else load_pipeline(folder)
    scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    pool = data.encode_views(
        pipe.vae,
        images,
        resolution,
        center_crop=True,
        random_flip=False,
        seed=seed,
        device=torch.device("cpu"),
    )
    embeds = pipe.text_encoder(data.tokenize(pipe.tokenizer, prompt))[0]
    generator = torch.Generator().manual_seed(seed)
    timesteps = torch.linspace(50, scheduler.config.num_train_timesteps - 50, samples).long()
    losses = []
    for mean in pool.means:
        latents = mean[:1].expand(samples, -1, -1, -1) * pipe.vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=generator)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        prediction = pipe.unet(noisy, timesteps, embeds.expand(samples, -1, -1)).sample
        losses.append(F.mse_loss(prediction, noise).item())
    return sum(losses) / len(losses)
