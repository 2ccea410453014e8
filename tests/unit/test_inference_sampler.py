"""The sampler on the real tiny model: batching never changes a request's bytes (DESIGN §8)."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
import torch
from dreambooth_client.vocabulary import MAX_SEED, SCHEDULER_NAMES
from PIL import Image

from services.inference.job import Job
from services.inference.params import FinalImage, GenerateEvent, GenerateParams, Preview, Progress
from services.inference.sampler import Sampler
from tests.fixtures.inference_server import TinyInference, run_jobs


def images(events: list[GenerateEvent]) -> list[FinalImage]:
    return [e for e in events if isinstance(e, FinalImage)]


def pixels(image: FinalImage) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(image.image.data)).convert("RGB"))


def request(tiny: TinyInference, prompt: str, **fields: object) -> GenerateParams:
    values: dict[str, object] = {"steps": 3, "seed": 11}
    values.update(fields)
    return tiny.resolve(GenerateParams("tiny-sd", prompt, **values))  # type: ignore[arg-type]


def test_a_solo_request_equals_the_diffusers_pipeline_on_the_same_modules(
    tiny_inference: TinyInference,
) -> None:
    params = request(tiny_inference, "a photo of a dog", steps=4, seed=3)
    [events] = run_jobs(tiny_inference.model, [params])
    reference = tiny_inference.model.pipeline(
        "a photo of a dog",
        num_inference_steps=4,
        generator=torch.Generator().manual_seed(3),
        output_type="np",
    ).images[0]
    assert np.array_equal(pixels(images(events)[0]), (reference * 255).round().astype("uint8"))


@pytest.mark.parametrize("guidance", [7.5, 1.0])
@pytest.mark.parametrize("scheduler", SCHEDULER_NAMES)
def test_batched_requests_get_exactly_their_solo_bytes(
    tiny_inference: TinyInference, scheduler: str, guidance: float
) -> None:
    common = {"scheduler": scheduler, "guidance_scale": guidance}
    requests = [
        request(tiny_inference, "a photo of a dog", seed=1, **common),
        request(tiny_inference, "a red car", seed=40, num_images=2, negative_prompt="blurry", **common),
        request(tiny_inference, "a castle", seed=7, num_images=2, **common),
    ]
    solo = [run_jobs(tiny_inference.model, [params])[0] for params in requests]
    batched = run_jobs(tiny_inference.model, requests)
    for alone, together in zip(solo, batched, strict=True):
        assert [i.image.data for i in images(together)] == [i.image.data for i in images(alone)]


@pytest.mark.parametrize(("seed", "next_seed"), [(100, 101), (MAX_SEED, 0)])  # image seeds wrap at 2**32
def test_image_i_is_image_0_of_seed_plus_i(tiny_inference: TinyInference, seed: int, next_seed: int) -> None:
    [two] = run_jobs(tiny_inference.model, [request(tiny_inference, "a cat", seed=seed, num_images=2)])
    [second] = run_jobs(tiny_inference.model, [request(tiny_inference, "a cat", seed=next_seed)])
    assert [i.seed for i in images(two)] == [seed, next_seed]
    assert images(two)[1].image.data == images(second)[0].image.data


def test_a_cancelled_request_leaves_the_batch_and_the_others_are_unchanged(
    tiny_inference: TinyInference,
) -> None:
    stays = request(tiny_inference, "a photo of a dog", seed=5, num_images=2)
    leaves = request(tiny_inference, "a tree", seed=9)

    def cancel_after_step_2(job: Job, event: GenerateEvent) -> None:
        if job.params is leaves and isinstance(event, Progress) and event.step == 2:
            job.cancel()

    [alone] = run_jobs(tiny_inference.model, [stays])
    kept, cancelled = run_jobs(tiny_inference.model, [stays, leaves], on_event=cancel_after_step_2)
    assert [e.step for e in cancelled if isinstance(e, Progress)] == [1, 2]
    assert not images(cancelled)
    assert [i.image.data for i in images(kept)] == [i.image.data for i in images(alone)]


def test_stream_order_with_previews(tiny_inference: TinyInference) -> None:
    params = request(tiny_inference, "a house", steps=5, num_images=2, preview_interval=2)
    [events] = run_jobs(tiny_inference.model, [params], sampler=Sampler(preview_max_size=32))
    kinds = [(type(e).__name__, getattr(e, "step", None), getattr(e, "index", None)) for e in events]
    assert kinds == [
        ("Progress", 1, None),
        ("Progress", 2, None),
        ("Preview", 2, 0),
        ("Preview", 2, 1),
        ("Progress", 3, None),
        ("Progress", 4, None),
        ("Preview", 4, 0),
        ("Preview", 4, 1),
        ("Progress", 5, None),
        ("FinalImage", None, 0),
        ("FinalImage", None, 1),
    ]
    preview = next(e for e in events if isinstance(e, Preview))
    decoded = Image.open(io.BytesIO(preview.image.data))
    assert decoded.format == "JPEG" and decoded.size == (32, 32) == (
        preview.image.width,
        preview.image.height,
    )
    assert all(e.total_steps == 5 for e in events if isinstance(e, Progress))


@pytest.mark.parametrize(("fmt", "pil_format"), [("png", "PNG"), ("jpeg", "JPEG"), ("webp", "WEBP")])
def test_output_formats(tiny_inference: TinyInference, fmt: str, pil_format: str) -> None:
    params = request(tiny_inference, "a boat", steps=2, output_format=fmt, width=128, height=64)
    [events] = run_jobs(tiny_inference.model, [params])
    [image] = images(events)
    decoded = Image.open(io.BytesIO(image.image.data))
    assert decoded.format == pil_format and decoded.size == (128, 64)
    assert (image.image.format, image.image.width, image.image.height) == (fmt, 128, 64)


def test_previews_are_skipped_when_not_asked(tiny_inference: TinyInference) -> None:
    params = dataclasses.replace(request(tiny_inference, "a boat", steps=2), preview_interval=0)
    [events] = run_jobs(tiny_inference.model, [params])
    assert not [e for e in events if isinstance(e, Preview)]
