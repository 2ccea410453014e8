"""Validation previews: rank 0 samples the validation prompts with the live weights."""

from __future__ import annotations

import io
from typing import Any

import torch

from services.trainer.training_events import PreviewEvent
from services.trainer.worker.models import Models
from services.trainer.worker.runtime import Runtime, WorkerJob

PREVIEW_STEPS = 20  # denoising steps of a validation preview
PREVIEW_GUIDANCE = 7.5
PREVIEW_JPEG_QUALITY = 85


def make_pipeline(models: Models) -> Any:
    """A sampling pipeline over the live (unwrapped) modules: no copies, no DDP hooks."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=models.vae,
        text_encoder=models.text_encoder,
        tokenizer=models.tokenizer,
        unet=models.unet,
        scheduler=DDIMScheduler.from_config(models.noise_scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def send_previews(
    job: WorkerJob, models: Models, step: int, runtime: Runtime, amp_dtype: torch.dtype | None
) -> None:
    """Sample the validation prompts with the live weights (seeded: comparable across steps).
    Under autocast when training is: frozen half-precision and trained fp32 modules then mix."""
    spec = job.spec
    modes = models.unet.training, models.text_encoder.training
    models.unet.eval()
    models.text_encoder.eval()
    try:
        pipe = make_pipeline(models)
        for index, prompt in enumerate(spec.validation_prompts):
            generator = torch.Generator().manual_seed(spec.seed + index)
            autocast = torch.autocast(runtime.device.type, dtype=amp_dtype, enabled=amp_dtype is not None)
            with torch.no_grad(), autocast:
                image = pipe(
                    prompt,
                    num_inference_steps=PREVIEW_STEPS,
                    guidance_scale=PREVIEW_GUIDANCE,
                    height=spec.resolution,
                    width=spec.resolution,
                    generator=generator,
                ).images[0]
            out = io.BytesIO()
            image.convert("RGB").save(out, format="JPEG", quality=PREVIEW_JPEG_QUALITY)
            runtime.send(PreviewEvent(step=step, prompt=prompt, jpeg=out.getvalue()))
    finally:
        models.unet.train(modes[0])
        models.text_encoder.train(modes[1])
