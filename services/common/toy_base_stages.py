"""The stages of pretraining the toy-world base: draw the world, train the VAE, cache latents,
train UNet + text encoder (see toy_base.py for the whole run and its settings)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from services.common.tiny_model import SCHEDULER_CONFIG
from services.common.toy_base_settings import Deadline, PretrainSettings
from toyworld import HELD_OUT_SUBJECTS, PLAIN, Scene, all_identities, draw_array, pretraining_scenes
from toyworld.scene import jittered_scene, rng_for
from toyworld.vocabulary import BACKGROUNDS, caption

Log = Callable[[str], None]
LOG_EVERY = 100


# ---------------------------------------------------------------- the world's photos


def world_photos(seed: int, count: int, patterned: float) -> tuple[np.ndarray, list[Scene]]:
    """(count, 64, 64, 3) uint8 photos and their scenes.

    patterned = 0: the pretraining world (balanced plain objects). Otherwise that share of the
    photos shows patterned objects, never of a held-out subject's identity (for the VAE only).
    """
    scenes = pretraining_scenes(seed, count)
    if patterned > 0:
        held_out = {(s.object, s.colour, s.pattern, s.pattern_colour) for s in HELD_OUT_SUBJECTS}
        pool = [entry for entry in all_identities() if entry[2] != PLAIN and entry not in held_out]
        for index in range(count):
            rng = rng_for(seed, 10**6 + index)
            if rng.random() < patterned:
                obj, colour, pattern, pattern_colour = pool[int(rng.integers(len(pool)))]
                background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
                scenes[index] = jittered_scene(rng, obj, colour, background, pattern, pattern_colour)
    photos = np.stack([draw_array(scene, 64) for scene in scenes])
    return photos, scenes


def to_model_input(photos: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [-1, 1]."""
    return torch.from_numpy(photos).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _lr_factor(step: int, steps: int, warmup: int) -> float:
    """Linear warm-up, then cosine down to 10%."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# ---------------------------------------------------------------- stage 1: the VAE


def train_vae(
    vae: Any, photos: np.ndarray, seed: int, settings: PretrainSettings, deadline: Deadline, log: Log
) -> tuple[Any, dict[str, Any]]:
    """L1 + MSE reconstruction (+ SD's tiny KL) on random crops; then scaling_factor = 1/std."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=settings.vae_lr, weight_decay=0.0, fused=True)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: _lr_factor(step, settings.vae_steps, min(50, settings.vae_steps))
    )
    crop = settings.vae_crop
    vae.train()
    started, step, recent = time.perf_counter(), 0, []
    for step in range(1, settings.vae_steps + 1):
        rows = torch.randint(len(photos), (settings.vae_batch,), generator=generator).numpy()
        top, left = (int(v) for v in torch.randint(0, 64 - crop + 1, (2,), generator=generator))
        batch = to_model_input(photos[rows, top : top + crop, left : left + crop])
        if bool(torch.rand(1, generator=generator) < 0.5):
            batch = batch.flip(3)
        posterior = vae.encode(batch).latent_dist
        recon = vae.decode(posterior.sample(generator=generator)).sample
        kl = posterior.kl().sum() / batch.numel()  # SD's weight 1e-6 on summed KL vs summed error
        loss = (recon - batch).abs().mean() + (recon - batch).pow(2).mean() + 1e-6 * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        recent = [*recent[-(LOG_EVERY - 1) :], loss.item()]
        if step % LOG_EVERY == 0:
            log(_progress("vae", step, settings.vae_steps, started, float(np.mean(recent))))
        if deadline.passed(share=0.2):
            log(f"vae: stopped at step {step} of {settings.vae_steps} (--minutes)")
            break
    vae.eval()
    report = {
        "steps": step,
        "stopped_early": step < settings.vae_steps,
        "seconds": round(time.perf_counter() - started, 1),
        "final_loss": round(float(np.mean(recent)), 5) if recent else None,
        **_calibrate(vae, photos),
        **_reconstruction_psnr(vae, seed, settings.eval_photos),
    }
    log(f"vae: {report}")
    return vae, report


@torch.no_grad()
def _calibrate(vae: Any, photos: np.ndarray) -> dict[str, float]:
    means = encode_latents(vae, photos[:512], scale=1.0)
    scale = round(1.0 / means.std().item(), 5)
    vae.register_to_config(scaling_factor=scale)
    return {"scaling_factor": scale, "latent_mean": round(means.mean().item(), 4)}


@torch.no_grad()
def _reconstruction_psnr(vae: Any, seed: int, count: int) -> dict[str, float]:
    """PSNR of mode reconstructions: fresh world photos, and the held-out subjects' photos."""

    def psnr(photos: np.ndarray) -> float:
        images = to_model_input(photos)
        recon = vae.decode(vae.encode(images).latent_dist.mode()).sample.clamp(-1, 1)
        mse = ((recon - images) / 2).pow(2).mean().item()
        return round(10 * math.log10(1.0 / max(mse, 1e-12)), 2)

    world, _ = world_photos(seed + 7, count, patterned=0.0)
    scenes = [scene for subject in HELD_OUT_SUBJECTS for scene in subject.scenes()][:count]
    subjects = np.stack([draw_array(scene, 64) for scene in scenes])
    return {"psnr_world": psnr(world), "psnr_subjects": psnr(subjects)}


@torch.no_grad()
def encode_latents(vae: Any, photos: np.ndarray, scale: float | None = None) -> torch.Tensor:
    """Latents (N, 4, 16, 16) of the photos times `scale` (default: the VAE's scaling_factor),
    computed once: the VAE is frozen from here."""
    chunks = [
        vae.encode(to_model_input(photos[first : first + 128])).latent_dist.mode()
        for first in range(0, len(photos), 128)
    ]
    return torch.cat(chunks) * (vae.config.scaling_factor if scale is None else scale)


# ---------------------------------------------------------------- stage 2: UNet + text encoder


def caption_variants(scene: Scene) -> list[str]:
    """[full, no colour, no background, neither, empty]: what caption dropout picks from."""
    return [
        caption(scene.object, scene.colour, scene.background),
        caption(scene.object, None, scene.background),
        caption(scene.object, scene.colour, None),
        caption(scene.object, None, None),
        "",
    ]


def _variant_weights(settings: PretrainSettings) -> torch.Tensor:
    keep = 1.0 - settings.drop_caption
    c, b = settings.drop_colour, settings.drop_background
    return torch.tensor(
        [
            keep * (1 - c) * (1 - b),
            keep * c * (1 - b),
            keep * (1 - c) * b,
            keep * c * b,
            settings.drop_caption,
        ]
    )


def train_unet(
    unet: Any,
    text_encoder: Any,
    tokenizer: Any,
    latents: torch.Tensor,
    scenes: list[Scene],
    seed: int,
    settings: PretrainSettings,
    deadline: Deadline,
    log: Log,
) -> tuple[Any, Any, dict[str, Any]]:
    """Epsilon prediction on the cached latents, min-SNR weighted, EMA of the weights."""
    from diffusers import DDPMScheduler

    generator = torch.Generator().manual_seed(seed + 100)
    torch.manual_seed(seed + 100)
    noise_keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type")
    noise_scheduler = DDPMScheduler(**{key: SCHEDULER_CONFIG[key] for key in noise_keys})
    alphas = noise_scheduler.alphas_cumprod
    token_ids = _tokenize(tokenizer, scenes)  # (N, 5 variants, 77)
    weights = _variant_weights(settings)
    params = [*unet.parameters(), *text_encoder.parameters()]
    ema = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=settings.unet_lr, weight_decay=1e-2, fused=True)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: _lr_factor(step, settings.unet_steps, settings.warmup_steps)
    )
    unet.train()
    text_encoder.train()
    started, step, recent = time.perf_counter(), 0, []
    for step in range(1, settings.unet_steps + 1):
        rows = torch.randint(len(latents), (settings.unet_batch,), generator=generator)
        batch = latents[rows]
        flip = torch.rand(len(rows), generator=generator) < 0.5
        batch = torch.where(flip[:, None, None, None], batch.flip(3), batch)
        variant = torch.multinomial(weights, len(rows), replacement=True, generator=generator)
        ids = token_ids[rows, variant]
        noise = torch.randn(batch.shape, generator=generator)
        timesteps = torch.randint(0, len(alphas), (len(rows),), generator=generator)
        noisy = noise_scheduler.add_noise(batch, noise, timesteps)
        context = text_encoder(ids)[0]
        predicted = unet(noisy, timesteps, context).sample
        snr = alphas[timesteps] / (1 - alphas[timesteps])
        weight = torch.clamp(snr, max=settings.min_snr_gamma) / snr
        loss = (weight * (predicted - noise).pow(2).mean(dim=(1, 2, 3))).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        decay = min(settings.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
        recent = [*recent[-(LOG_EVERY - 1) :], loss.item()]
        if step % LOG_EVERY == 0:
            log(_progress("unet", step, settings.unet_steps, started, float(np.mean(recent))))
        if deadline.passed(share=0.95):
            log(f"unet: stopped at step {step} of {settings.unet_steps} (--minutes)")
            break
    with torch.no_grad():
        for param, average in zip(params, ema, strict=True):
            param.copy_(average)
    unet.eval()
    text_encoder.eval()
    report = {
        "steps": step,
        "stopped_early": step < settings.unet_steps,
        "seconds": round(time.perf_counter() - started, 1),
        "final_loss": round(float(np.mean(recent)), 5) if recent else None,
        "unet_parameters": sum(p.numel() for p in unet.parameters()),
        "text_encoder_parameters": sum(p.numel() for p in text_encoder.parameters()),
    }
    log(f"unet: {report}")
    return unet, text_encoder, report


def _tokenize(tokenizer: Any, scenes: list[Scene]) -> torch.Tensor:
    captions = [caption_variants(scene) for scene in scenes]
    unique = sorted({text for variants in captions for text in variants})
    encoded = tokenizer(
        unique,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    index = {text: row for row, text in enumerate(unique)}
    return torch.stack([encoded[[index[text] for text in variants]] for variants in captions])


def _progress(stage: str, step: int, steps: int, started: float, loss: float) -> str:
    elapsed = time.perf_counter() - started
    eta = elapsed / step * (steps - step)
    return (
        f"{stage}: step {step}/{steps}, loss {loss:.4f}, {elapsed / step:.2f} s/step, eta {eta / 60:.1f} min"
    )
