"""What decides a toy-world base's weights (PretrainSettings) and the `--minutes` cap (Deadline)."""

from __future__ import annotations

import dataclasses
import time


@dataclasses.dataclass(frozen=True)
class PretrainSettings:
    """Everything that decides the weights (recorded in the manifest)."""

    images: int = 11_520  # photos of the world drawn once (64 of each object x colour x background)
    vae_images: int = 4_000  # the VAE's own photos (patterned ones among them)
    vae_steps: int = 1_200  # the feasibility run reached 28 dB PSNR at 1,200 steps
    vae_batch: int = 32
    vae_crop: int = 32  # the VAE is convolutional: it trains on random crops, 1/4 of the cost
    vae_lr: float = 1e-3
    vae_patterned: float = 0.3  # share of the VAE's photos with patterns (not held-out identities)
    unet_steps: int = 3_500  # ~0.65 s per step of 32 on 2 idle cores: ~38 min
    unet_batch: int = 32
    unet_lr: float = 6e-4
    warmup_steps: int = 200
    ema_decay: float = 0.999
    min_snr_gamma: float = 5.0
    drop_caption: float = 0.1  # empty caption: the unconditional branch of guidance
    drop_colour: float = 0.15  # "a photo of a ball on the beach"
    drop_background: float = 0.1  # "a photo of a red ball" (and with drop_colour: "a photo of a ball")
    save_dtype: str = "float16"  # halves the committed size; loaded as float32
    eval_photos: int = 40  # VAE PSNR: this many fresh world photos and subject photos

    @classmethod
    def quick(cls) -> PretrainSettings:
        """A handful of steps on a few photos: checks the whole path, learns nothing."""
        return cls(
            images=48,
            vae_images=16,
            vae_steps=3,
            vae_batch=4,
            unet_steps=3,
            unet_batch=4,
            warmup_steps=1,
            eval_photos=4,
        )


class Deadline:
    """`--minutes`: a wall-clock cap. Stages stop early (and say so) when their share is spent."""

    def __init__(self, minutes: float | None) -> None:
        self.start = time.perf_counter()
        self.seconds = None if minutes is None else minutes * 60.0

    def passed(self, share: float = 1.0) -> bool:
        return self.seconds is not None and time.perf_counter() - self.start > share * self.seconds
