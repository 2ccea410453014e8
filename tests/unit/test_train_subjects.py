"""Several subjects in one job: which subject each example trains on (evenly, resumably), and
that each example is paired with its own subject's latents, instance prompt and class prior."""

from __future__ import annotations

import collections
from pathlib import Path

import pytest
import torch

from services.common.local_store import LocalObjectStore
from services.common.settings import StoreSettings
from services.trainer.dataset_layout import write_dataset
from services.trainer.job_spec import Concept, JobSpec
from services.trainer.worker import data
from services.trainer.worker.models import load_base_model
from services.trainer.worker.runtime import WorkerJob
from services.trainer.worker.training_data import (
    SubjectSchedule,
    TrainingData,
    conditioning,
    draw_latents,
    prepare_data,
    step_generator,
)
from tests.fixtures.trainer_server import make_png


@pytest.mark.parametrize(
    ("subjects", "world_size", "accumulation", "batch_size"),
    [(2, 1, 1, 1), (3, 1, 1, 1), (2, 2, 1, 1), (3, 2, 2, 3), (5, 1, 3, 2), (8, 4, 1, 2)],
)
def test_every_subject_gets_its_share_of_any_run(
    subjects: int, world_size: int, accumulation: int, batch_size: int
) -> None:
    schedule = SubjectSchedule(
        subjects, seed=11, world_size=world_size, accumulation=accumulation, batch_size=batch_size
    )
    for steps in (1, 7, 50):
        counts = collections.Counter(
            subject
            for step in range(steps)
            for micro in range(accumulation)
            for rank in range(world_size)
            for subject in schedule.batch(rank, step, micro)
        )
        examples = steps * accumulation * world_size * batch_size
        for subject in range(subjects):  # N examples: each of k subjects N/k, rounded either way
            assert abs(counts[subject] - examples / subjects) <= 1, (steps, subject, counts)


def test_the_schedule_is_a_pure_function_of_where_the_run_is() -> None:
    schedule = SubjectSchedule(3, seed=5, world_size=2, accumulation=2, batch_size=2)
    again = SubjectSchedule(3, seed=5, world_size=2, accumulation=2, batch_size=2)
    assert all(
        schedule.batch(rank, step, micro) == again.batch(rank, step, micro)
        for rank in range(2)
        for step in range(10)
        for micro in range(2)
    )
    # On one worker with one example per step, the subjects alternate from a seed-chosen one.
    one = [
        SubjectSchedule(2, seed=seed, world_size=1, accumulation=1, batch_size=1).batch(0, 0, 0)
        for seed in (0, 1)
    ]
    assert one == [[0], [1]]
    assert SubjectSchedule(1, seed=9, world_size=2, accumulation=1, batch_size=4).batch(1, 3, 0) == [
        0,
        0,
        0,
        0,
    ]


def constant_pool(value: float, images: int = 2) -> data.LatentPool:
    return data.LatentPool(
        means=[torch.full((1, 4, 2, 2), value)] * images, stds=[torch.zeros(1, 4, 2, 2)] * images
    )


def fake_data(frozen: bool) -> TrainingData:
    """Subject i's latents are all 10 + i, its prior set's 100 + set; prompts likewise."""
    embed = [torch.full((1, 3, 2), float(10 + subject)) for subject in range(3)]
    class_embed = [torch.full((1, 3, 2), float(100 + index)) for index in range(2)]
    return TrainingData(
        instance=[constant_pool(10 + subject) for subject in range(3)],
        prior=[constant_pool(100), constant_pool(101)],
        prior_of=[0, 1, 0],  # subjects 0 and 2 share a class prompt, so a prior set
        instance_ids=[torch.tensor([[10 + subject]]) for subject in range(3)],
        class_ids=[torch.tensor([[100]]), torch.tensor([[101]])],
        instance_embeds=embed if frozen else None,
        class_embeds=class_embed if frozen else None,
    )


class EchoEncoder(torch.nn.Module):
    """A text encoder whose embedding of token ids is the ids themselves (shape [n, 3, 2])."""

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor]:
        return (ids.float()[:, :, None, None].expand(-1, 3, 2, 1).reshape(len(ids), 3, 2),)


@pytest.mark.parametrize("frozen", [True, False], ids=["cached embeddings", "text encoder trained"])
def test_each_example_is_paired_with_its_own_subject_and_class(frozen: bool) -> None:
    batch = fake_data(frozen)
    subjects = [2, 0, 1, 2]
    latents = draw_latents(batch, subjects, step_generator(0, 0, 0, 0))
    states = conditioning(batch, subjects, EchoEncoder(), torch.device("cpu"))
    per_example = [float(latent.mean()) for latent in latents]
    assert per_example == [12, 10, 11, 12, 100, 100, 101, 100]  # [instance; class], in order
    assert [float(state.mean()) for state in states] == per_example


def test_one_subject_draws_exactly_what_a_single_subject_job_drew() -> None:
    """A single-subject job is unchanged: the same draws from the same random stream."""
    pool = data.LatentPool(
        means=[torch.randn(2, 4, 2, 2, generator=torch.Generator().manual_seed(i)) for i in range(3)],
        stds=[torch.full((2, 4, 2, 2), 0.5)] * 3,
    )
    prior = constant_pool(3.0, images=4)
    batch = TrainingData([pool], [prior], [0], [torch.tensor([[1]])], [torch.tensor([[2]])], None, None)
    generator = step_generator(4, 0, 9, 1)
    expected = torch.cat([pool.sample(3, generator), prior.sample(3, generator)])
    assert torch.equal(draw_latents(batch, [0, 0, 0], step_generator(4, 0, 9, 1)), expected)


def test_prepare_data_encodes_each_subject_and_each_shared_prior_set_once(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    store = LocalObjectStore(tmp_path / "store")
    for index, dataset in enumerate(("a" * 64, "b" * 64, "c" * 64)):
        write_dataset(store, dataset, [make_png(10 * index + image) for image in range(index + 1)])
    for prefix in ("priors/dog/", "priors/cat/"):
        for image in range(2):
            store.put_bytes(f"{prefix}images/{image:05d}.png", make_png(50 + image + len(prefix)))
    spec = JobSpec(
        dataset="a" * 64,
        instance_prompt="a photo of sks dog",
        class_prompt="a photo of dog",
        with_prior_preservation=True,
        num_class_images=2,
        resolution=64,
        additional_concepts=(
            Concept("b" * 64, "a photo of zwx cat", "zwx", "a photo of cat"),
            Concept("c" * 64, "a photo of ohwx dog", "ohwx", "a photo of dog"),
        ),
    )
    job = WorkerJob(
        "job", spec, StoreSettings(), "priors/dog/", additional_prior_prefixes=("priors/cat/", "priors/dog/")
    )
    models = load_base_model(tiny_model_dir)
    batch = prepare_data(job, models, store, torch.device("cpu"))

    assert [len(pool) for pool in batch.instance] == [1, 2, 3]  # each subject's own images
    assert len(batch.prior) == 2 and batch.prior_of == [0, 1, 0]  # the dog set is shared
    assert batch.instance_embeds is not None and batch.class_embeds is not None
    assert len(batch.instance_embeds) == 3 and len(batch.class_embeds) == 2
    assert not torch.equal(batch.instance_embeds[1], batch.instance_embeds[2])
