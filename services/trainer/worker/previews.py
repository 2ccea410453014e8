"""Validation previews: rank 0 samples the validation prompts with the live weights."""

from __future__ import annotations

import io
from typing import Any

import torch
from dreambooth_client.vocabulary import DEFAULT_GUIDANCE, DEFAULT_SCHEDULER, image_seed

from services.common.pipelines import assemble_pipeline
from services.common.schedulers import make_scheduler
from services.trainer.training_events import PreviewEvent
from services.trainer.worker.models import Models
from services.trainer.worker.runtime import Runtime, WorkerJob

PREVIEW_STEPS = 20  # denoising steps of a validation preview
PREVIEW_JPEG_QUALITY = 85


def make_pipeline(models: Models) -> Any:
    """A sampling pipeline over the live (unwrapped) modules: no copies, no DDP hooks."""
    return assemble_pipeline(
        vae=models.vae,
        text_encoder=models.text_encoder,
        tokenizer=models.tokenizer,
        unet=models.unet,
        scheduler=make_scheduler(DEFAULT_SCHEDULER, models.noise_scheduler.config),
    )


def send_previews(
    job: WorkerJob, models: Models, step: int, runtime: Runtime, amp_dtype: torch.dtype | None
) -> list[PreviewEvent]:
    """Sample the validation prompts with the live weights (seeded: comparable across steps) and
    send them; returns them (for the training logs). Under autocast when training is: frozen
    half-precision and trained fp32 modules then mix."""
    spec = job.spec
    sent = []
    modes = models.unet.training, models.text_encoder.training
    models.unet.eval()
    models.text_encoder.eval()
    try:
        pipe = make_pipeline(models)
        for index, prompt in enumerate(spec.validation_prompts):
            generator = torch.Generator().manual_seed(image_seed(spec.seed, index))
            autocast = torch.autocast(runtime.device.type, dtype=amp_dtype, enabled=amp_dtype is not None)
            with torch.no_grad(), autocast:
                image = pipe(
                    prompt,
                    num_inference_steps=PREVIEW_STEPS,
                    guidance_scale=DEFAULT_GUIDANCE,
                    height=spec.resolution,
                    width=spec.resolution,
                    generator=generator,
                ).images[0]
            out = io.BytesIO()
            image.convert("RGB").save(out, format="JPEG", quality=PREVIEW_JPEG_QUALITY)
            sent.append(PreviewEvent(step=step, prompt=prompt, jpeg=out.getvalue()))
            runtime.send(sent[-1])
    finally:
        models.unet.train(modes[0])
        models.text_encoder.train(modes[1])
    return sent
