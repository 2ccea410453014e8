"""A job's training data on the worker: subject and class-prior latents and prompt embeddings,
computed once before the loop, and the per-micro-step random stream."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from dreambooth_client.vocabulary import image_seed

from services.common.errors import FailedPrecondition
from services.trainer.worker import data
from services.trainer.worker.models import Models
from services.trainer.worker.runtime import WorkerJob


@dataclass
class TrainingData:
    instance: data.LatentPool
    prior: data.LatentPool | None
    instance_ids: torch.Tensor  # [1, 77] token ids
    class_ids: torch.Tensor | None
    instance_embeds: torch.Tensor | None  # cached when the text encoder is frozen
    class_embeds: torch.Tensor | None


def prepare_data(job: WorkerJob, models: Models, store: Any, device: torch.device) -> TrainingData:
    spec = job.spec
    views = {"center_crop": spec.center_crop, "random_flip": spec.random_flip, "device": device}
    instance_images = data.load_images(store, data.dataset_image_keys(store, spec.dataset))
    instance = data.encode_views(models.vae, instance_images, spec.resolution, seed=spec.seed, **views)
    prior = class_ids = None
    if spec.with_prior_preservation:
        if not job.prior_prefix:
            raise FailedPrecondition("with_prior_preservation is on but no class-prior images were given")
        keys = data.prior_image_keys(store, job.prior_prefix, spec.num_class_images)
        prior_images = data.iter_images(store, keys)
        prior = data.encode_views(
            models.vae, prior_images, spec.resolution, seed=image_seed(spec.seed, 1), **views
        )
        prior = prior.to(device)
        class_ids = data.tokenize(models.tokenizer, spec.class_prompt)
    instance_ids = data.tokenize(models.tokenizer, spec.instance_prompt)
    instance_embeds = class_embeds = None
    if not spec.train_text_encoder:
        with torch.no_grad():
            instance_embeds = models.text_encoder(instance_ids.to(device))[0]
            if class_ids is not None:
                class_embeds = models.text_encoder(class_ids.to(device))[0]
    return TrainingData(
        instance=instance.to(device),
        prior=prior,
        instance_ids=instance_ids,
        class_ids=class_ids,
        instance_embeds=instance_embeds,
        class_embeds=class_embeds,
    )


def step_generator(seed: int, rank: int, step: int, micro: int) -> torch.Generator:
    """The random stream of one micro-step: a pure function of where it is (so resumable)."""
    mixed = (seed * 0x9E3779B1 + rank * 0x85EBCA77 + step * 0xC2B2AE3D + micro * 0x27D4EB2F) % (2**63 - 1)
    return torch.Generator().manual_seed(mixed)
