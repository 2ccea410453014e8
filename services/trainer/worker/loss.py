"""The DreamBooth loss of one micro-batch (DESIGN §7), with the spec's loss recipes: offset
noise and min-SNR-gamma weighting (each off by default, leaving the plain loss as it was)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from services.trainer.job_spec import JobSpec
from services.trainer.worker.models import Models
from services.trainer.worker.snr import min_snr_weights
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
    noise = draw_noise(latents.shape, generator, spec.noise_offset).to(device)
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
    weights = min_snr_weights(models.noise_scheduler, timesteps, spec.snr_gamma) if spec.snr_gamma else None
    if not batch_data.prior:
        loss = weighted_mse(prediction, target, weights)
        return loss, loss
    # Prior preservation (Ray's template, diffusers): the batch is [instance; class] -> chunk(2).
    prediction, prior_prediction = prediction.chunk(2)
    target, prior_target = target.chunk(2)
    weights, prior_weights = weights.chunk(2) if weights is not None else (None, None)
    instance_loss = weighted_mse(prediction, target, weights)
    prior_loss = weighted_mse(prior_prediction, prior_target, prior_weights)
    return instance_loss + spec.prior_loss_weight * prior_loss, instance_loss


def draw_noise(shape: torch.Size, generator: torch.Generator, offset: float) -> torch.Tensor:
    """Gaussian noise of `shape` (b, c, h, w); with an offset, plus offset x one more normal draw
    per example and channel (offset noise: lets the model learn to shift an image's mean).
    Both come from the step's generator, after the same draws as without, so runs resume exactly."""
    noise = torch.randn(shape, generator=generator)
    if offset:
        noise += offset * torch.randn((shape[0], shape[1], 1, 1), generator=generator)
    return noise


def weighted_mse(
    prediction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None
) -> torch.Tensor:
    """The mean squared error; with per-example weights, the mean of each example's MSE x its weight."""
    if weights is None:
        return F.mse_loss(prediction.float(), target.float())
    per_example = F.mse_loss(prediction.float(), target.float(), reduction="none")
    per_example = per_example.mean(dim=list(range(1, per_example.dim())))
    return (per_example * weights).mean()
