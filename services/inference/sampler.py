"""The denoising loop of one batch run: several requests' images in each UNet call.

Written over the diffusers components rather than `pipe(...)` so requests can share UNet calls,
and so each request's result is exactly what it gets alone (DESIGN §8):
1. Prompts are encoded one text at a time (batch 1), as a solo run does.
2. Image i of a request starts from noise drawn by its own generator seeded `image_seed(seed, i)`
   (seed + i, wrapping at 2**32: the vocabulary's one rule for every service).
3. Each request has its own scheduler (state such as step index and multistep history is per
   request), so a cancelled request's rows can leave the batch at any step.
4. One UNet call per step over every image of every request, conditional and unconditional rows
   in the same call (classifier-free guidance); guidance 1 skips the unconditional rows.
5. Previews every k steps (only when asked: a VAE decode costs more than a UNet step here), then
   the final images, each decoded on its own (batch 1) and encoded.
6. LoRA requests run on their base: each row of a UNet call (CFG rows too) and each prompt
   encoding carries its request's adapter and scale (row_adapters.py), so requests for
   different LoRA models of one base share UNet calls.
See batch_invariance.py for why batched rows carry the same bits as solo ones.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from dreambooth_client.vocabulary import PREVIEW_IMAGE_FORMAT, image_seed
from PIL import Image

from services.common.images import encode_image
from services.common.schedulers import make_scheduler
from services.inference.job import Job
from services.inference.metrics import InferenceMetrics
from services.inference.model_cache import LoadedModel
from services.inference.params import EncodedImage, FinalImage, Preview, Progress
from services.inference.row_adapters import RowAdapter, RowPlan, applied, row_plan

log = logging.getLogger(__name__)

PREVIEW_QUALITY = 75


@dataclasses.dataclass
class _Request:
    """One job's share of the batch: its rows, scheduler and generators."""

    job: Job
    scheduler: Any
    latents: torch.Tensor  # (n, C, h, w)
    cond: torch.Tensor  # (n, tokens, dim)
    uncond: torch.Tensor | None  # (n, tokens, dim) when guidance is on
    step_kwargs: dict[str, Any]
    adapter: RowAdapter  # the LoRA adapter and scale of every row of this request, or None
    estimate: torch.Tensor | None = None  # the scheduler's predicted x0, for previews

    @property
    def size(self) -> int:
        return self.latents.shape[0]


class Sampler:
    def __init__(self, metrics: InferenceMetrics | None = None, preview_max_size: int = 256) -> None:
        self._metrics = metrics
        self._preview_max_size = preview_max_size

    @torch.inference_mode()
    def run(self, model: LoadedModel, jobs: Sequence[Job]) -> None:
        """Sample every job (all share one BatchKey) and emit their events, in order."""
        requests = [self._prepare(model, job) for job in jobs if not job.cancelled]
        if not requests:
            return
        first = requests[0].job.params
        if self._metrics is not None:
            self._metrics.batch_size.observe(sum(r.size for r in requests))
        timesteps = requests[0].scheduler.timesteps
        plans = _RowPlans()
        for index, timestep in enumerate(timesteps):
            requests = [r for r in requests if not r.job.cancelled]  # cancelled rows leave the batch
            if not requests:
                return
            started = time.perf_counter()
            self._step(model, requests, timestep, first.guidance_scale, plans)
            if self._metrics is not None:
                self._metrics.step_duration.observe(time.perf_counter() - started)
            step = index + 1
            for request in requests:
                request.job.emit(Progress(step=step, total_steps=len(timesteps)))
                interval = request.job.params.preview_interval
                if interval and step % interval == 0 and step < len(timesteps):
                    self._send_previews(model, request, step)
        for request in requests:
            if not request.job.cancelled:
                self._send_images(model, request)

    # ---- the steps ----------------------------------------------------------------------------

    def _prepare(self, model: LoadedModel, job: Job) -> _Request:
        params = job.params
        assert params.seed is not None
        unet, vae = model.unet, model.vae
        scheduler = make_scheduler(params.scheduler, model.scheduler_config)
        scheduler.set_timesteps(params.steps, device=unet.device)
        scale = 2 ** (len(vae.config.block_out_channels) - 1)
        shape = (1, unet.config.in_channels, params.height // scale, params.width // scale)
        seeds = [image_seed(params.seed, i) for i in range(params.num_images)]
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
        noise = [torch.randn(shape, generator=g, device="cpu", dtype=unet.dtype) for g in generators]
        latents = torch.cat(noise).to(unet.device) * scheduler.init_noise_sigma
        n = params.num_images
        adapter: RowAdapter = None
        if job.adapter is not None:
            assert params.adapter_scale is not None
            adapter = (job.adapter, params.adapter_scale)
        cond = self._encode(model, params.prompt, adapter).expand(n, -1, -1)
        uncond = (
            self._encode(model, params.negative_prompt, adapter).expand(n, -1, -1)
            if params.uses_guidance
            else None
        )
        step_kwargs: dict[str, Any] = {}
        if "generator" in inspect.signature(scheduler.step).parameters:
            # Stochastic schedulers draw each image's noise from its own generator.
            step_kwargs["generator"] = generators if n > 1 else generators[0]
        return _Request(job, scheduler, latents, cond, uncond, step_kwargs, adapter)

    def _encode(self, model: LoadedModel, text: str, adapter: RowAdapter) -> torch.Tensor:
        """(1, tokens, dim) embeddings of one text, as StableDiffusionPipeline.encode_prompt makes them
        (with the request's text-encoder adapter, if it has one)."""
        tokenizer = model.tokenizer
        with model.tokenizer_lock:
            ids = tokenizer(
                text,
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids
        encoder = model.text_encoder
        with applied(row_plan("text_encoder", [adapter])):
            return encoder(ids.to(encoder.device))[0].to(dtype=encoder.dtype)

    def _step(
        self, model: LoadedModel, requests: list[_Request], timestep: Any, guidance: float, plans: _RowPlans
    ) -> None:
        latents = torch.cat([r.scheduler.scale_model_input(r.latents, timestep) for r in requests])
        cond = torch.cat([r.cond for r in requests])
        adapters = [r.adapter for r in requests for _ in range(r.size)]
        if requests[0].uncond is not None:
            uncond = torch.cat([r.uncond for r in requests if r.uncond is not None])
            embeddings = torch.cat([uncond, cond])
            noise = self._unet(
                model, torch.cat([latents, latents]), timestep, embeddings, adapters * 2, plans
            )
            noise_uncond, noise_cond = noise.chunk(2)
            noise = noise_uncond + guidance * (noise_cond - noise_uncond)
        else:
            noise = self._unet(model, latents, timestep, cond, adapters, plans)
        offset = 0
        for request in requests:
            output = request.scheduler.step(
                noise[offset : offset + request.size], timestep, request.latents, **request.step_kwargs
            )
            offset += request.size
            request.latents = output.prev_sample
            request.estimate = getattr(output, "pred_original_sample", None)

    @staticmethod
    def _unet(
        model: LoadedModel,
        latents: torch.Tensor,
        timestep: Any,
        embeddings: torch.Tensor,
        adapters: list[RowAdapter],
        plans: _RowPlans,
    ) -> torch.Tensor:
        """One UNet call; row i runs with `adapters[i]` (CFG rows carry their request's adapter)."""
        rows = latents.shape[0]
        if rows == 1:  # oneDNN convolutions take another path at batch 1: keep every call >= 2 rows
            latents, embeddings = torch.cat([latents, latents]), torch.cat([embeddings, embeddings])
            adapters = adapters * 2
        with applied(plans.get(adapters)):
            output = model.unet(latents, timestep, encoder_hidden_states=embeddings, return_dict=False)
        return output[0][:rows]

    # ---- images -------------------------------------------------------------------------------

    def _send_previews(self, model: LoadedModel, request: _Request, step: int) -> None:
        source = request.estimate if request.estimate is not None else request.latents
        for index, pixels in enumerate(_decode(model, source)):
            image = Image.fromarray(pixels)
            image.thumbnail((self._preview_max_size, self._preview_max_size))
            data = encode_image(image, PREVIEW_IMAGE_FORMAT, quality=PREVIEW_QUALITY)
            encoded = EncodedImage(data, PREVIEW_IMAGE_FORMAT, image.width, image.height)
            request.job.emit(Preview(step=step, index=index, image=encoded))

    def _send_images(self, model: LoadedModel, request: _Request) -> None:
        params = request.job.params
        assert params.seed is not None
        for index, pixels in enumerate(_decode(model, request.latents)):
            data = encode_image(Image.fromarray(pixels), params.output_format)
            encoded = EncodedImage(data, params.output_format, pixels.shape[1], pixels.shape[0])
            request.job.emit(FinalImage(index=index, image=encoded, seed=image_seed(params.seed, index)))
            if self._metrics is not None:
                self._metrics.images_generated.inc()


class _RowPlans:
    """The UNet row plan of one batch run, built again only when its rows change (a cancel)."""

    def __init__(self) -> None:
        self._key: tuple[object, ...] | None = None
        self._plan: RowPlan | None = None

    def get(self, adapters: list[RowAdapter]) -> RowPlan | None:
        key = tuple(None if a is None else (id(a[0]), a[1]) for a in adapters)
        if key != self._key:
            self._key, self._plan = key, row_plan("unet", adapters)
        return self._plan


def _decode(model: LoadedModel, latents: torch.Tensor) -> list[np.ndarray]:
    """uint8 (H, W, 3) images, post-processed as diffusers' VaeImageProcessor does.

    One image per VAE call: the decoder's kernels differ with the batch size (measured), and
    image i of a request must equal image 0 of a request seeded `image_seed(seed, i)`.
    """
    vae = model.vae
    decoded = []
    for row in latents.split(1):
        image = vae.decode(row / vae.config.scaling_factor, return_dict=False)[0]
        image = (image / 2 + 0.5).clamp(0, 1)
        array = image.cpu().permute(0, 2, 3, 1).float().numpy()[0]
        decoded.append((array * 255).round().astype("uint8"))
    return decoded
