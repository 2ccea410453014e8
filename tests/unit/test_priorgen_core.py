"""The prior-generation core without a server: local store, tiny model."""

from __future__ import annotations

import dataclasses
import io
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from services.common.errors import InvalidArgument, NotFound, Unavailable
from services.common.local_store import LocalObjectStore
from services.common.model_store import ModelStore
from services.common.pipelines import load_pipeline
from services.priorgen.cache_key import image_key, manifest_key
from services.priorgen.generate import PriorGenerator
from services.priorgen.request import PriorRequest
from services.priorgen.settings import PriorGenSettings

SETTINGS = PriorGenSettings(batch_size=2, compute_width=2, default_resolution=64, default_steps=4)


def request(**fields: object) -> PriorRequest:
    values: dict[str, object] = {
        "base_model": "models/tiny-sd",
        "class_prompt": "a photo of dog",
        "num_images": 4,
        "seed": 3,
    }
    values.update(fields)
    return PriorRequest(**values)  # type: ignore[arg-type]


@pytest.fixture
def generator(local_model_store: ModelStore) -> PriorGenerator:
    core = PriorGenerator(local_model_store.store, local_model_store, SETTINGS)
    yield core  # type: ignore[misc]
    core.close()


def set_objects(store: LocalObjectStore, prefix: str) -> dict[str, bytes]:
    return {info.key: store.get_bytes(info.key) for info in store.list(prefix)}


def test_images_are_the_plain_pipeline_images_of_seed_plus_i(
    generator: PriorGenerator, local_model_store: ModelStore, tiny_model_dir: Path
) -> None:
    progress: list[tuple[int, int]] = []
    result = generator.generate(request(num_images=3), lambda done, total: progress.append((done, total)))
    assert (result.count, result.cached, result.generated) == (3, False, 3)
    assert progress == [(0, 3), (2, 3), (3, 3)]  # batches of 2

    pipe = load_pipeline(tiny_model_dir)
    for index in range(3):
        plain = pipe(
            "a photo of dog",
            height=64,
            width=64,
            num_inference_steps=4,
            guidance_scale=7.5,
            generator=torch.Generator().manual_seed(3 + index),
            output_type="np",
        ).images[0]
        expected = (plain * 255).round().astype(np.int16)
        data = local_model_store.store.get_bytes(image_key(result.key, index))
        ours = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)
        # Same image; float rounding (the timestep path runs as 1 row here, 2 in the pipeline)
        # may move a rare value by one level.
        assert ours.shape == expected.shape == (64, 64, 3)
        assert np.abs(ours - expected).max() <= 1
        assert (ours != expected).mean() < 0.001


def test_the_last_seed_takes_several_images_whose_seeds_wrap(
    generator: PriorGenerator, local_model_store: ModelStore
) -> None:
    store = local_model_store.store
    last = generator.generate(request(num_images=2, seed=2**32 - 1))
    first = generator.generate(request(num_images=1, seed=0))
    assert store.get_bytes(image_key(last.key, 1)) == store.get_bytes(image_key(first.key, 0))


def test_an_interrupted_set_is_completed_with_only_the_missing_images(
    generator: PriorGenerator, local_model_store: ModelStore, tmp_path: Path
) -> None:
    store = local_model_store.store
    reference = generator.generate(request(num_images=5))
    complete = set_objects(store, reference.prefix)

    # What a killed run leaves: some whole images, no manifest.
    store.delete(manifest_key(reference.key))
    for index in (1, 3, 4):
        store.delete(image_key(reference.key, index))
    progress: list[tuple[int, int]] = []
    resumed = generator.generate(request(num_images=5), lambda done, total: progress.append((done, total)))
    assert (resumed.key, resumed.cached, resumed.generated) == (reference.key, False, 3)
    assert progress[0] == (2, 5) and progress[-1] == (5, 5)
    assert set_objects(store, reference.prefix) == complete
    assert generator.metrics.images_generated_total._value.get() == 8


def test_the_manifest_lists_every_image_and_the_inputs(
    generator: PriorGenerator, local_model_store: ModelStore
) -> None:
    result = generator.generate(request(num_images=2, negative_prompt="blurry"))
    manifest = json.loads(local_model_store.store.get_bytes(manifest_key(result.key)))
    assert manifest["count"] == 2 and manifest["key"] == result.key
    assert manifest["model_digest"] == local_model_store.get("tiny-sd").digest
    assert manifest["inputs"]["negative_prompt"] == "blurry" and manifest["inputs"]["steps"] == 4
    assert [image["key"] for image in manifest["images"]] == [image_key(result.key, i) for i in range(2)]


def test_a_complete_set_is_cached(generator: PriorGenerator) -> None:
    first = generator.generate(request(num_images=2))
    second = generator.generate(request(num_images=2))
    assert (second.key, second.cached, second.generated) == (first.key, True, 0)
    assert generator.metrics.cache_hits_total._value.get() == 1


def test_identical_concurrent_requests_share_one_generation(generator: PriorGenerator) -> None:
    # Hold the model load so the first request is certainly still running when the others come.
    with generator._pipelines._lock:
        tickets = [generator.start(request(num_images=4)) for _ in range(3)]
    results = [ticket.future.result(timeout=120) for ticket in tickets]
    assert [r.generated for r in results] == [4, 0, 0]
    assert [r.cached for r in results] == [False, False, False]  # followers waited, not cached
    assert generator.metrics.images_generated_total._value.get() == 4
    assert generator.metrics.single_flight_joins_total._value.get() == 2


def test_bad_requests_fail_before_any_model_load(generator: PriorGenerator) -> None:
    with pytest.raises(InvalidArgument):
        generator.start(request(num_images=0))
    with pytest.raises(NotFound):
        generator.start(request(base_model="models/missing"))
    assert generator._pipelines.loaded() == 0


def test_close_stops_a_running_set_and_keeps_its_whole_images(
    local_model_store: ModelStore,
) -> None:
    core = PriorGenerator(local_model_store.store, local_model_store, SETTINGS)
    first_batch = threading.Event()
    ticket = core.start(request(num_images=40, steps=20), lambda done, total: done >= 2 and first_batch.set())
    assert first_batch.wait(120)
    core.close()
    with pytest.raises(Unavailable):
        ticket.future.result(timeout=60)
    store = local_model_store.store
    images = [info for info in store.list("priors/") if "/images/" in info.key]
    assert 2 <= len(images) < 40
    assert not any(info.key.endswith("manifest.json") for info in store.list("priors/"))
    with pytest.raises(Unavailable):
        core.start(request())


def _images(store: LocalObjectStore) -> list[str]:
    return [info.key for info in store.list("priors/") if "/images/" in info.key]


def test_a_set_every_caller_cancelled_stops_and_keeps_its_whole_images(generator: PriorGenerator) -> None:
    """A job cancelled during priors used to leave priorgen rendering its whole set."""
    first_batch = threading.Event()
    ticket = generator.start(
        request(num_images=40, steps=20), lambda done, total: done >= 2 and first_batch.set()
    )
    assert first_batch.wait(120)
    ticket.release()  # the only caller went away (its RPC was cancelled)
    flights = generator._flights
    deadline = time.monotonic() + 60
    while flights.in_flight() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert flights.in_flight() == 0, "the abandoned set is still rendering"
    store = generator._store
    assert 2 <= len(_images(store)) < 40
    assert not any(key.endswith("manifest.json") for key in (info.key for info in store.list("priors/")))
    # Asked again, the set resumes from the images already stored.
    result = generator.generate(request(num_images=40, steps=20))
    assert result.count == 40 and result.generated < 40


def test_a_set_goes_on_while_one_caller_still_waits(generator: PriorGenerator) -> None:
    with generator._pipelines._lock:  # both callers attach before the generation starts
        leaving = generator.start(request(num_images=4))
        staying = generator.start(request(num_images=4))
    leaving.release()
    assert staying.future.result(timeout=120).count == 4
    assert len(_images(generator._store)) == 4


@pytest.mark.parametrize("scheduler", ["ddim", "euler_ancestral"])  # the second draws noise every step
def test_batch_size_does_not_change_the_images(local_model_store: ModelStore, scheduler: str) -> None:
    store = local_model_store.store
    sets = []
    for batch_size in (1, 3):
        settings = dataclasses.replace(SETTINGS, batch_size=batch_size, compute_width=3)
        generator = PriorGenerator(store, local_model_store, settings)
        try:
            result = generator.generate(request(num_images=5, scheduler=scheduler))
        finally:
            generator.close()
        assert result.generated == 5
        sets.append(set_objects(store, result.prefix))
        store.delete_prefix(result.prefix)
    assert sets[0] == sets[1]
