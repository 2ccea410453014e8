"""Min-SNR-gamma loss weights (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR
Weighting Strategy"), as diffusers' training scripts compute them.

Each example's MSE is weighted by its timestep's signal-to-noise ratio, clipped at gamma:
min(SNR, gamma) / SNR for epsilon prediction and min(SNR, gamma) / (SNR + 1) for v-prediction
(diffusers' train_text_to_image.py; SNR from `diffusers.training_utils.compute_snr`). Timesteps
with little noise (high SNR) stop dominating the loss.
"""

from __future__ import annotations

from typing import Any

import torch


def signal_to_noise(noise_scheduler: Any, timesteps: torch.Tensor) -> torch.Tensor:
    """alpha_t^2 / sigma_t^2 of each timestep, in float32 (diffusers' compute_snr)."""
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(device=timesteps.device, dtype=torch.float32)
    signal = alphas_cumprod[timesteps]
    return signal / (1.0 - signal)


def min_snr_weights(noise_scheduler: Any, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """One loss weight per example (shape [batch])."""
    snr = signal_to_noise(noise_scheduler, timesteps)
    clipped = torch.clamp(snr, max=gamma)
    if noise_scheduler.config.prediction_type == "v_prediction":
        return clipped / (snr + 1.0)
    # At SNR 0 (a zero-terminal-SNR schedule) min(SNR, gamma) / SNR tends to 1: use the limit.
    return torch.where(snr > 0, clipped / snr, torch.ones_like(snr))
