"""Render the images of one prior set in batches whose tensor shapes never change.

Why fixed shapes? Measured here (torch 2.13 CPU, oneDNN/MKL, tiny model, 20 DDIM steps, 64x64):
kernels pick different algorithms and reduction splits for different batch sizes (small-M GEMMs
such as the timestep embedding, convolutions, GroupNorm), so the same image stacked by the plain
pipeline in a batch of 1 and of 3 differs by up to 6.5e-6 in float and in 5-6 of its 73,728
uint8 values: not byte for byte. GPU kernels choose per shape too. At a FIXED batch shape an
image's result depends neither on its slot nor on the other slots (checked: permuted slots,
zero-padded slots), once two slot-dependent parts are handled: the timestep path, computed once
per call (services/common/batch_invariance.py; 6- or 10-row GEMMs were slot-dependent), and
the VAE, which decodes one image at a time (its full-resolution GroupNorms were
slot-dependent in batches of 3 and 5).

So every denoising call carries exactly `width` slots (the compute width, part of the set's
key); a batch of `batch_size <= width` images fills the first slots, the rest are padding.
Image i starts from latents drawn from its own generator seeded `spec.image_seed(i)` (which the
scheduler also draws from), so its bytes are the same whichever batch, slot, run or worker makes it.
The images are the plain diffusers pipeline's for the same seeds, up to float rounding.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from services.common.errors import Unavailable
from services.common.pipelines import assemble_pipeline
from services.common.schedulers import make_scheduler
from services.priorgen.request import PriorSpec

if TYPE_CHECKING:
    import torch
    from diffusers import StableDiffusionPipeline

PNG_COMPRESS_LEVEL = 6  # fixed: PNG bytes depend only on the pixels (no metadata, no timestamps)
PAD_SEED = 0  # padding slots: their images are computed and thrown away


class Stopped(Exception):
    """The generator is shutting down; raised inside the sampling loop to abandon a batch."""


def encode_png(pixels: np.ndarray) -> bytes:
    """Deterministic PNG of an HxWx3 float image in [0, 1] (rounded as diffusers' numpy_to_pil)."""
    clean = np.nan_to_num(pixels, nan=0.0, posinf=1.0, neginf=0.0).clip(0.0, 1.0)
    out = io.BytesIO()
    Image.fromarray((clean * 255).round().astype(np.uint8), "RGB").save(
        out, format="PNG", compress_level=PNG_COMPRESS_LEVEL
    )
    return out.getvalue()


class SetRenderer:
    """Renders images of one set (one spec) from a loaded pipeline, `width` slots per call.

    Calls are serialised by the caller (one set worker); the pipeline's modules may be shared
    with other renderers, each call gets its own scheduler.
    """

    def __init__(
        self, pipe: StableDiffusionPipeline, spec: PriorSpec, width: int, stop: threading.Event
    ) -> None:
        self._modules = {name: getattr(pipe, name) for name in ("vae", "text_encoder", "tokenizer", "unet")}
        self._scheduler_config = pipe.scheduler.config
        self._spec = spec
        self._width = width
        self._stop = stop
        self._device = pipe.device
        self._dtype = pipe.unet.dtype
        latent_size = spec.resolution // pipe.vae_scale_factor
        self._latent_shape = (1, pipe.unet.config.in_channels, latent_size, latent_size)
        # The prompt is the same for every image: encode it once (batch of one, as the pipeline
        # does before repeating it per image).
        prompt_embeds, negative_embeds = pipe.encode_prompt(
            spec.class_prompt,
            self._device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=spec.guidance_scale > 1.0,
            negative_prompt=spec.negative_prompt or None,
        )
        self._prompt_embeds = prompt_embeds.repeat(width, 1, 1)
        self._negative_embeds = None if negative_embeds is None else negative_embeds.repeat(width, 1, 1)

    def render(self, indices: Sequence[int]) -> list[bytes]:
        """PNG bytes of images `indices` (at most `width`), in that order. Unavailable when stopped."""
        import torch

        if not 1 <= len(indices) <= self._width:
            raise ValueError(f"a batch holds 1..{self._width} images, got {len(indices)}")
        if self._stop.is_set():
            raise _shutting_down()
        spec = self._spec
        seeds = [spec.image_seed(index) for index in indices]
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
        generators += [torch.Generator("cpu").manual_seed(PAD_SEED) for _ in range(self._width - len(seeds))]
        # Each image's starting noise comes from its own generator (as prepare_latents draws it),
        # padding slots start from zeros.
        latents = [self._initial_noise(generator) for generator in generators[: len(seeds)]]
        latents += [torch.zeros(self._latent_shape, dtype=self._dtype)] * (self._width - len(seeds))
        pipe = assemble_pipeline(
            **self._modules, scheduler=make_scheduler(spec.scheduler, self._scheduler_config)
        )
        try:
            output = pipe(
                prompt_embeds=self._prompt_embeds,
                negative_prompt_embeds=self._negative_embeds,
                latents=torch.cat(latents),
                height=spec.resolution,
                width=spec.resolution,
                num_inference_steps=spec.steps,
                guidance_scale=spec.guidance_scale,
                generator=generators,  # per-slot noise for stochastic schedulers
                output_type="latent",
                callback_on_step_end=self._check_stop,
            )
        except Stopped:
            raise _shutting_down() from None
        return [self._decode(pipe, output.images[slot : slot + 1]) for slot in range(len(seeds))]

    @staticmethod
    def _decode(pipe: StableDiffusionPipeline, latents: torch.Tensor) -> bytes:
        """One image at a time: the VAE's GroupNorms at full resolution give slot-dependent
        results in a batch of 3 or 5 (measured), and decoding is one call per image, not per step."""
        import torch

        with torch.no_grad():
            image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
        pixels = pipe.image_processor.postprocess(image, output_type="np", do_denormalize=[True])
        return encode_png(pixels[0])

    def _initial_noise(self, generator: torch.Generator) -> torch.Tensor:
        from diffusers.utils.torch_utils import randn_tensor

        return randn_tensor(self._latent_shape, generator=generator, device=self._device, dtype=self._dtype)

    def _check_stop(self, pipe: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        if self._stop.is_set():
            raise Stopped()
        return kwargs


def _shutting_down() -> Unavailable:
    return Unavailable("prior generation is shutting down; ask again to resume the set")
