"""DreamBooth on ToyBench subjects, run through the project's own code in one process.

A `Workbench` is a local object store holding a toy-world base model. It uploads a held-out
subject's photos as a dataset (the trainer's dataset layout), makes the class-prior set with the
prior-generation core (`PriorGenerator`), fine-tunes with the training loop every Ray worker runs
(`worker.loop.train`, single-process runtime: the same steps, without Ray's start-up), and
samples images with the prior-generation renderer (the services' sampling: per-image seeds,
classifier-free guidance). Only the Ray and gRPC wrapping is skipped; the e2e tests cover those.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from dreambooth_client.vocabulary import DEFAULT_GUIDANCE, DEFAULT_SCHEDULER
from PIL import Image

from services.common.local_store import LocalObjectStore
from services.common.model_store import ModelStore
from services.common.pipelines import load_pipeline
from services.common.settings import StoreSettings
from services.common.toy_base_files import verify_base
from services.priorgen.generate import PriorGenerator
from services.priorgen.render import SetRenderer
from services.priorgen.request import PriorRequest, PriorSpec
from services.priorgen.settings import PriorGenSettings
from services.trainer.dataset_layout import write_dataset
from services.trainer.job_spec import Concept, JobSpec, concepts
from services.trainer.worker.loop import train
from services.trainer.worker.publish import load_lora_pipeline
from services.trainer.worker.runtime import Runtime, WorkerJob
from toyworld import Subject
from toyworld.vocabulary import caption

BASE_MODEL_ID = "toy-world-base"
IDENTIFIER = "sks"
# One per subject of a multi-subject job, the first being IDENTIFIER: single tokens of the CLIP
# vocabulary that the world's captions never use.
IDENTIFIERS = (IDENTIFIER, "ohwx", "bnha")
RESOLUTION = 64
RENDER_WIDTH = 8  # images per sampling call


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How every image of the benchmark is sampled (priors included)."""

    steps: int = 20
    guidance_scale: float = DEFAULT_GUIDANCE  # the services' default
    scheduler: str = DEFAULT_SCHEDULER


@dataclasses.dataclass(frozen=True)
class Recipe:
    """One way to fine-tune (a row of the quality table)."""

    name: str
    steps: int
    learning_rate: float
    with_prior_preservation: bool = True
    prior_loss_weight: float = 1.0
    num_class_images: int = 48
    prior_steps: int = 20
    train_text_encoder: bool = False
    text_encoder_learning_rate: float | None = None
    use_lora: bool = False
    lora_rank: int = 8
    train_batch_size: int = 2
    snr_gamma: float = 0.0
    noise_offset: float = 0.0
    ema_decay: float = 0.0
    optimizer: str = "adamw"
    use_dora: bool = False

    def job_spec(self, subject: Subject, dataset_id: str, model_id: str, seed: int) -> JobSpec:
        return JobSpec(
            base_model=BASE_MODEL_ID,
            dataset=dataset_id,
            instance_prompt=instance_prompt(subject),
            identifier_token=IDENTIFIER,
            class_prompt=class_prompt(subject),
            with_prior_preservation=self.with_prior_preservation,
            prior_loss_weight=self.prior_loss_weight,
            num_class_images=self.num_class_images,
            prior_steps=self.prior_steps,
            max_train_steps=self.steps,
            learning_rate=self.learning_rate,
            train_text_encoder=self.train_text_encoder,
            text_encoder_learning_rate=self.text_encoder_learning_rate or self.learning_rate,
            resolution=RESOLUTION,
            train_batch_size=self.train_batch_size,
            checkpointing_steps=0,
            random_flip=True,
            use_lora=self.use_lora,
            lora_rank=self.lora_rank,
            snr_gamma=self.snr_gamma,
            noise_offset=self.noise_offset,
            ema_decay=self.ema_decay,
            optimizer=self.optimizer,
            use_dora=self.use_dora,
            seed=seed,
            model_id=model_id,
        )


def instance_prompt(subject: Subject, background: str | None = None, identifier: str = IDENTIFIER) -> str:
    """ "a photo of sks ball" (on a background: "a photo of sks ball on the beach")."""
    return caption(subject.object, None, background, identifier=identifier)


def multi_subject_spec(
    recipe: Recipe,
    subjects: Sequence[Subject],
    dataset_ids: Sequence[str],
    model_id: str,
    seed: int,
    steps: int,
) -> JobSpec:
    """One job training every subject, subject i named by IDENTIFIERS[i]: the recipe's spec for
    the first subject, the others as its additional concepts, `steps` in all."""
    first = recipe.job_spec(subjects[0], dataset_ids[0], model_id, seed)
    others = tuple(
        Concept(
            dataset=dataset_id,
            instance_prompt=instance_prompt(subject, identifier=identifier),
            identifier_token=identifier,
            class_prompt=class_prompt(subject),
        )
        for subject, dataset_id, identifier in zip(
            subjects[1:], dataset_ids[1:], IDENTIFIERS[1:], strict=False
        )
    )
    if len(others) != len(subjects) - 1:
        raise ValueError(f"at most {len(IDENTIFIERS)} subjects in one job, got {len(subjects)}")
    return dataclasses.replace(first, max_train_steps=steps, additional_concepts=others)


def class_prompt(subject: Subject) -> str:
    """ "a photo of a ball": the class the subject belongs to."""
    return caption(subject.object, None, None)


class Workbench:
    """A local store with the base model in it; fine-tunes and samples on it."""

    def __init__(self, root: Path, base_folder: Path, sampling: Sampling = Sampling()) -> None:
        self.manifest = verify_base(base_folder)  # refuses a model of another world
        self.sampling = sampling
        self.settings = StoreSettings(store_dir=str(root / "store"), cache_dir=str(root / "cache"))
        self.store = LocalObjectStore(root / "store")
        self.models = ModelStore(self.store, root / "cache")
        if not self.models.exists(BASE_MODEL_ID):
            self.models.import_folder(base_folder, BASE_MODEL_ID)
        prior_settings = PriorGenSettings(
            store=self.settings,
            batch_size=RENDER_WIDTH,
            compute_width=RENDER_WIDTH,
            max_concurrent_sets=1,
            default_resolution=RESOLUTION,
        )
        self.priors = PriorGenerator(self.store, self.models, prior_settings)
        self._pipelines: dict[str, Any] = {}

    def close(self) -> None:
        self.priors.close()

    # ---- DreamBooth ---------------------------------------------------------------------------

    def upload(self, subject: Subject) -> str:
        """The subject's photos as a dataset (as a user uploads them); returns its id."""
        pngs = [_png(photo) for photo in subject.photos()]
        dataset_id = hashlib.sha256(b"".join(pngs)).hexdigest()
        write_dataset(self.store, dataset_id, pngs)
        return dataset_id

    def class_priors(self, spec: JobSpec) -> str:
        """The job's class-prior set, asked for as the trainer asks (cached in the store); its prefix."""
        result = self.priors.generate(
            PriorRequest(
                base_model=f"models/{spec.base_model}",
                class_prompt=spec.class_prompt,
                negative_prompt=spec.class_negative_prompt,
                num_images=spec.num_class_images,
                resolution=spec.resolution,
                steps=spec.prior_steps,
                seed=spec.seed,
            )
        )
        return result.prefix

    def finetune(self, subject: Subject, recipe: Recipe, seed: int, model_id: str | None = None) -> str:
        """Train `recipe` on the subject; returns the published model's id."""
        model_id = model_id or f"{subject.name}-{recipe.name}-{seed}"
        if self.models.exists(model_id):
            return model_id
        spec = recipe.job_spec(subject, self.upload(subject), model_id, seed)
        prior_prefix = self.class_priors(spec) if spec.with_prior_preservation else None
        train(WorkerJob(f"job-{model_id}", spec, self.settings, prior_prefix), Runtime())
        return model_id

    def finetune_subjects(
        self, subjects: Sequence[Subject], recipe: Recipe, seed: int, steps: int, model_id: str | None = None
    ) -> str:
        """Train `recipe` on several subjects in one job (subject i named by IDENTIFIERS[i]);
        returns the published model's id."""
        model_id = model_id or f"{'.'.join(s.name for s in subjects)}-{recipe.name}-{seed}-{steps}"
        if self.models.exists(model_id):
            return model_id
        datasets = [self.upload(subject) for subject in subjects]
        spec = multi_subject_spec(recipe, subjects, datasets, model_id, seed, steps)
        prefixes: tuple[str, ...] = ()
        if spec.with_prior_preservation:  # as the trainer asks: one set per class prompt
            prefixes = tuple(
                self.class_priors(dataclasses.replace(spec, class_prompt=concept.class_prompt))
                for concept in concepts(spec)
            )
        job = WorkerJob(
            f"job-{model_id}",
            spec,
            self.settings,
            prefixes[0] if prefixes else None,
            additional_prior_prefixes=prefixes[1:],
        )
        train(job, Runtime())
        return model_id

    # ---- sampling -----------------------------------------------------------------------------

    def sample(self, model_id: str, prompt: str, count: int, seed: int = 0) -> list[np.ndarray]:
        """`count` images of `prompt` (image i from seed + i), as uint8 arrays."""
        return sample_images(self.pipeline(model_id), prompt, count, seed, self.sampling, model_id)

    def pipeline(self, model_id: str) -> Any:
        """The model's pipeline (a LoRA model: the base with its adapters loaded); the last few kept."""
        if model_id not in self._pipelines:
            manifest = self.models.get(model_id)
            folder = self.models.materialize(model_id)
            if manifest.kind == "lora":
                pipe = load_lora_pipeline(
                    self.models.materialize(manifest.base_model or BASE_MODEL_ID), folder
                )
            else:
                pipe = load_pipeline(folder)
            while len(self._pipelines) >= 3:
                self._pipelines.pop(next(iter(self._pipelines)))
            self._pipelines[model_id] = pipe
        return self._pipelines[model_id]


def sample_images(
    pipe: Any,
    prompt: str,
    count: int,
    seed: int,
    sampling: Sampling,
    model_id: str = "",
    width: int = RENDER_WIDTH,
) -> list[np.ndarray]:
    """`count` images of `prompt` from a loaded pipeline (image i from seed + i), as uint8 arrays:
    how every image of the benchmark is made. `width` slots per denoising call: the benchmark's
    images are made at RENDER_WIDTH; another width gives the same images up to float rounding
    (services/priorgen/render.py) at its own cost."""
    spec = PriorSpec(
        model_id=model_id,
        class_prompt=prompt,
        negative_prompt="",
        num_images=count,
        resolution=RESOLUTION,
        steps=sampling.steps,
        guidance_scale=sampling.guidance_scale,
        scheduler=sampling.scheduler,
        seed=seed,
    )
    renderer = SetRenderer(pipe, spec, width, threading.Event())
    images: list[np.ndarray] = []
    for start in range(0, count, width):
        batch = list(range(start, min(count, start + width)))
        images += [np.asarray(Image.open(io.BytesIO(png)).convert("RGB")) for png in renderer.render(batch)]
    return images


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
