"""The DreamBooth loss of one micro-batch (DESIGN §7)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from services.trainer.job_spec import JobSpec
from services.trainer.worker.models import Models
from services.trainer.worker.training_data import TrainingData, conditioning, draw_latents


def dreambooth_loss(
    unet: torch.nn.Module,
    text_encoder: torch.nn.Module,
    models: Models,
    batch_data: TrainingData,
    spec: JobSpec,
    generator: torch.Generator,
    device: torch.device,
    subjects: Sequence[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """(total, instance) loss of one micro-batch: instance and class examples in ONE forward.
    `subjects`: the subject of each instance example (`SubjectSchedule.batch`)."""
    latents = draw_latents(batch_data, subjects, generator) * models.vae.config.scaling_factor
    noise = torch.randn(latents.shape, generator=generator).to(device)
    timesteps = torch.randint(
        0, models.noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator
    ).to(device)
    noisy = models.noise_scheduler.add_noise(latents, noise, timesteps)

    encoder_states = conditioning(batch_data, subjects, text_encoder, device)

    prediction = unet(noisy, timesteps, encoder_states).sample
    if models.noise_scheduler.config.prediction_type == "v_prediction":
        target = models.noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    if not batch_data.prior:
        loss = F.mse_loss(prediction.float(), target.float())
        return loss, loss
    # Prior preservation (Ray's template, diffusers): the batch is [instance; class] -> chunk(2).
    prediction, prior_prediction = prediction.chunk(2)
    target, prior_target = target.chunk(2)
    instance_loss = F.mse_loss(prediction.float(), target.float())
    prior_loss = F.mse_loss(prior_prediction.float(), prior_target.float())
    return instance_loss + spec.prior_loss_weight * prior_loss, instance_loss
