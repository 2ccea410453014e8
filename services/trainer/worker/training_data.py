"""A job's training data on the worker: every subject's latents and prompt embeddings and every
class-prior set's, computed once before the loop; the per-micro-step random stream; and which
subject each example of a micro-step trains on.

A job trains one subject or several (`job_spec.concepts`): subject i has its own images and
instance prompt and, with prior preservation, the prior set of its class prompt (subjects with
the same class prompt share one set, encoded once). Examples go to the subjects in turn, so every
subject gets the same share of the run, and each example is paired with its subject's instance
prompt and a prior image of its subject's class. With one subject every draw is what it was
before subjects existed: the same random stream, the same batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from dreambooth_client.vocabulary import image_seed

from services.common.errors import FailedPrecondition
from services.trainer.job_spec import concepts
from services.trainer.worker import data
from services.trainer.worker.models import Models
from services.trainer.worker.runtime import WorkerJob


@dataclass
class TrainingData:
    instance: list[data.LatentPool]  # per subject
    prior: list[data.LatentPool]  # per prior set; empty without prior preservation
    prior_of: list[int]  # subject -> its prior set
    instance_ids: list[torch.Tensor]  # per subject, [1, 77] token ids
    class_ids: list[torch.Tensor]  # per prior set
    instance_embeds: list[torch.Tensor] | None  # cached when the text encoder is frozen
    class_embeds: list[torch.Tensor] | None

    @property
    def subject_count(self) -> int:
        return len(self.instance)


def prepare_data(job: WorkerJob, models: Models, store: Any, device: torch.device) -> TrainingData:
    spec = job.spec
    subjects = concepts(spec)
    views = {"center_crop": spec.center_crop, "random_flip": spec.random_flip, "device": device}
    instance = []
    for concept in subjects:
        images = data.load_images(store, data.dataset_image_keys(store, concept.dataset))
        pool = data.encode_views(models.vae, images, spec.resolution, seed=spec.seed, **views)
        instance.append(pool.to(device))
    prior: list[data.LatentPool] = []
    prior_of: list[int] = []
    class_ids: list[torch.Tensor] = []
    if spec.with_prior_preservation:
        prefixes = job.prior_prefixes
        if len(prefixes) != len(subjects):
            raise FailedPrecondition(
                "with_prior_preservation is on but not every subject's class-prior images were given"
            )
        sets = list(dict.fromkeys(prefixes))
        prior_seed = image_seed(spec.seed, 1)  # shared sets once, in first-use order
        prior_of = [sets.index(prefix) for prefix in prefixes]
        for prefix in sets:
            keys = data.prior_image_keys(store, prefix, spec.num_class_images)
            images = data.iter_images(store, keys)
            pool = data.encode_views(models.vae, images, spec.resolution, seed=prior_seed, **views)
            prior.append(pool.to(device))
            class_prompt = subjects[prefixes.index(prefix)].class_prompt
            class_ids.append(data.tokenize(models.tokenizer, class_prompt))
    instance_ids = [data.tokenize(models.tokenizer, concept.instance_prompt) for concept in subjects]
    instance_embeds = class_embeds = None
    if not spec.train_text_encoder:
        with torch.no_grad():
            instance_embeds = [models.text_encoder(ids.to(device))[0] for ids in instance_ids]
            class_embeds = [models.text_encoder(ids.to(device))[0] for ids in class_ids]
    return TrainingData(
        instance=instance,
        prior=prior,
        prior_of=prior_of,
        instance_ids=instance_ids,
        class_ids=class_ids,
        instance_embeds=instance_embeds,
        class_embeds=class_embeds,
    )


def step_generator(seed: int, rank: int, step: int, micro: int) -> torch.Generator:
    """The random stream of one micro-step: a pure function of where it is (so resumable)."""
    mixed = (seed * 0x9E3779B1 + rank * 0x85EBCA77 + step * 0xC2B2AE3D + micro * 0x27D4EB2F) % (2**63 - 1)
    return torch.Generator().manual_seed(mixed)


@dataclass(frozen=True)
class SubjectSchedule:
    """Which subject each example trains on: the run's examples, numbered across micro-steps,
    workers and batch positions, go to the subjects in turn (from a seed-chosen first one). Any
    N consecutive examples hold each of k subjects N/k rounded up or down; a pure function of
    (seed, rank, step, micro), so a resumed run trains the same subjects."""

    subjects: int
    seed: int
    world_size: int
    accumulation: int
    batch_size: int

    def batch(self, rank: int, step: int, micro: int) -> list[int]:
        """The subject of each instance example of this worker's micro-batch."""
        first = ((step * self.accumulation + micro) * self.world_size + rank) * self.batch_size
        return [(self.seed + first + offset) % self.subjects for offset in range(self.batch_size)]


def draw_latents(
    batch_data: TrainingData, subjects: Sequence[int], generator: torch.Generator
) -> torch.Tensor:
    """Unscaled latents: one of its subject's images per example, then (with priors) one of its
    subject's class images per example: [instance; class], the one-batch layout of DreamBooth."""
    latents = _draw(batch_data.instance, list(range(batch_data.subject_count)), subjects, generator)
    if batch_data.prior:
        latents = torch.cat([latents, _draw(batch_data.prior, batch_data.prior_of, subjects, generator)])
    return latents


def _draw(
    pools: list[data.LatentPool], pool_of: list[int], subjects: Sequence[int], generator: torch.Generator
) -> torch.Tensor:
    """Subject by subject (in index order), as many draws as it has examples, put in place."""
    drawn: list[torch.Tensor | None] = [None] * len(subjects)
    for subject in sorted(set(subjects)):
        places = [place for place, each in enumerate(subjects) if each == subject]
        for place, latent in zip(places, pools[pool_of[subject]].sample(len(places), generator), strict=True):
            drawn[place] = latent
    return torch.stack(drawn)  # type: ignore[arg-type]


def conditioning(
    batch_data: TrainingData, subjects: Sequence[int], text_encoder: torch.nn.Module, device: torch.device
) -> torch.Tensor:
    """Each example's prompt embedding, in the layout of `draw_latents`: its subject's instance
    prompt, then (with priors) its subject's class prompt."""
    classes = [batch_data.prior_of[subject] for subject in subjects] if batch_data.prior else []
    if batch_data.instance_embeds is not None and batch_data.class_embeds is not None:
        embeds = [batch_data.instance_embeds[s] for s in subjects]
        return torch.cat(embeds + [batch_data.class_embeds[c] for c in classes])
    ids = [batch_data.instance_ids[s] for s in subjects] + [batch_data.class_ids[c] for c in classes]
    return text_encoder(torch.cat(ids).to(device))[0]
