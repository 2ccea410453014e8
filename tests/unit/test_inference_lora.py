"""LoRA models as adapters on a resident base: one base load, adapters loaded once, mixed-adapter
batches byte-identical to solo runs, the adapter scale, and adapters that do not fit refused."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from prometheus_client import CollectorRegistry
from safetensors.torch import load_file, save_file

from services.common.errors import FailedPrecondition, InvalidArgument
from services.common.local_store import LocalObjectStore
from services.common.model_store import ModelStore
from services.common.settings import StoreSettings
from services.inference.adapter_cache import AdapterCache
from services.inference.core import InferenceCore
from services.inference.lora import LORA_WEIGHTS_FILE, LoraAdapter
from services.inference.metrics import InferenceMetrics
from services.inference.model_cache import ModelCache
from services.inference.model_specs import ModelSpecs
from services.inference.params import FinalImage, GenerateEvent, GenerateParams
from services.inference.settings import InferenceSettings
from tests.fixtures.inference_server import TinyInference, run_jobs
from tests.fixtures.loras import make_lora

LORAS = ("lora-0", "lora-1", "lora-2", "lora-3")


@dataclasses.dataclass
class LoraStore:
    root: Path
    models: ModelStore
    tiny: TinyInference  # the base loaded once for the module, with its specs

    def adapter(self, model_id: str) -> LoraAdapter:
        return AdapterCache(self.models, max_bytes=2**30).get(self.tiny.specs.get(model_id), self.tiny.model)

    def resolve(self, model_id: str, prompt: str, **fields: Any) -> GenerateParams:
        values: dict[str, Any] = {"steps": 3, "seed": 1}
        values.update(fields)
        return self.tiny.resolve(GenerateParams(model_id, prompt, **values), self.tiny.specs.get(model_id))


@pytest.fixture(scope="module")
def loras(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> LoraStore:
    """A local store with the tiny model and four LoRA models of it (UNet + text encoder; lora-3
    of rank 8, the others of rank 4)."""
    root = tmp_path_factory.mktemp("loras")
    models = ModelStore(LocalObjectStore(root / "store"), root / "cache")
    models.import_folder(tiny_model_dir, "tiny-sd")
    for seed, model_id in enumerate(LORAS):
        folder = make_lora(tiny_model_dir, root / model_id, seed=seed, rank=8 if model_id == "lora-3" else 4)
        models.import_folder(folder, model_id, kind="lora", base_model="tiny-sd")
    specs = ModelSpecs(models, root / "cache")
    cache = ModelCache(models, max_models=2, max_bytes=2**34)
    spec = specs.get("tiny-sd")
    return LoraStore(root, models, TinyInference(models, specs, cache, spec, cache.get(spec)))


@contextlib.contextmanager
def running_core(store: LoraStore, registry: CollectorRegistry, **overrides: Any) -> Iterator[InferenceCore]:
    settings = InferenceSettings(
        store=StoreSettings(store_dir=str(store.root / "store"), cache_dir=str(store.root / "cache")),
        default_model="",
        **overrides,
    )
    core = InferenceCore(settings, store.models, InferenceMetrics.create(registry))
    core.start()
    try:
        yield core
    finally:
        core.close()


async def generated(core: InferenceCore, params: GenerateParams) -> list[bytes]:
    return [event.image.data async for event in core.generate(params) if isinstance(event, FinalImage)]


def final_bytes(events: list[GenerateEvent]) -> list[bytes]:
    return [event.image.data for event in events if isinstance(event, FinalImage)]


def sample(registry: CollectorRegistry, name: str) -> float:
    return registry.get_sample_value(f"dreambooth_inference_{name}") or 0.0


def test_two_loras_of_one_base_alternate_with_one_base_load_and_each_adapter_loaded_once(
    loras: LoraStore,
) -> None:
    registry = CollectorRegistry()
    order = ["lora-0", "lora-1", "lora-0", "lora-1", "tiny-sd"]
    with running_core(loras, registry, max_wait_ms=0) as core:

        async def alternate() -> list[list[bytes]]:
            return [
                await generated(core, GenerateParams(m, "a photo of sks dog", steps=2, seed=5)) for m in order
            ]

        images = asyncio.run(alternate())
    assert sample(registry, "model_loads_total") == 1  # the base, once, for both LoRAs and itself
    assert sample(registry, "adapter_loads_total") == 2  # each adapter once
    assert sample(registry, "adapter_cache_hits_total") == 2
    assert sample(registry, "adapters_loaded") == 2
    assert images[0] == images[2] and images[1] == images[3]  # the same request, the same bytes
    assert len({images[0][0], images[1][0], images[4][0]}) == 3  # each adapter changes the image


def test_four_concurrent_requests_on_four_loras_share_unet_calls_and_equal_their_solo_runs(
    loras: LoraStore,
) -> None:
    requests = [
        GenerateParams(model_id, f"a photo of sks dog, style {index}", steps=4, seed=10 + index)
        for index, model_id in enumerate(LORAS)
    ]
    registry = CollectorRegistry()
    # A batching window far longer than the test: the batch runs because it is full (4 images).
    with running_core(loras, registry, max_batch=4, max_wait_ms=600_000) as batching:

        async def together() -> list[list[bytes]]:
            return list(await asyncio.gather(*(generated(batching, params) for params in requests)))

        batched = asyncio.run(together())
    assert sample(registry, "batch_size_images_count") == 1  # one batch run ...
    assert sample(registry, "batch_size_images_sum") == 4  # ... of all four requests' images
    assert sample(registry, "denoising_step_duration_seconds_count") == 4  # one UNet call per step
    with running_core(loras, CollectorRegistry(), max_wait_ms=0) as solo_core:

        async def solo() -> list[list[bytes]]:
            return [await generated(solo_core, params) for params in requests]

        alone = asyncio.run(solo())
    assert batched == alone
    assert len({images[0] for images in batched}) == 4


@pytest.mark.parametrize("guidance", [7.5, 1.0])
def test_mixed_batches_of_loras_scales_and_the_base_give_each_request_its_solo_bytes(
    loras: LoraStore, guidance: float
) -> None:
    cases = [
        ("lora-0", loras.resolve("lora-0", "a photo of sks dog", seed=1, guidance_scale=guidance)),
        ("lora-1", loras.resolve("lora-1", "a red car", seed=2, num_images=2, negative_prompt="blurry")),
        ("tiny-sd", loras.resolve("tiny-sd", "a castle", seed=3)),
        ("lora-0", loras.resolve("lora-0", "a tree", seed=4, adapter_scale=0.3)),  # one adapter, two scales
        ("lora-0", loras.resolve("lora-0", "a cat", seed=5, num_images=2)),
        ("lora-3", loras.resolve("lora-3", "a boat", seed=6)),  # another rank
    ]
    cases = [(m, dataclasses.replace(p, guidance_scale=guidance)) for m, p in cases]
    adapters = {m: loras.adapter(m) for m in ("lora-0", "lora-1", "lora-3")}
    model = loras.tiny.model
    per_request = [adapters.get(m) for m, _ in cases]
    solo = [
        run_jobs(model, [params], adapters=[a])[0] for (_, params), a in zip(cases, per_request, strict=True)
    ]
    batched = run_jobs(model, [params for _, params in cases], adapters=per_request)
    assert [final_bytes(events) for events in batched] == [final_bytes(events) for events in solo]


def test_adapter_scale_zero_is_the_base_and_scales_in_between_differ(loras: LoraStore) -> None:
    model, adapter = loras.tiny.model, loras.adapter("lora-2")
    base = run_jobs(model, [loras.resolve("tiny-sd", "a boat")])[0]
    at = {
        scale: run_jobs(model, [loras.resolve("lora-2", "a boat", adapter_scale=scale)], adapters=[adapter])[
            0
        ]
        for scale in (0.0, 0.5, 1.0)
    }
    assert final_bytes(at[0.0]) == final_bytes(base)  # no delta at all: exactly the base
    assert len({final_bytes(at[s])[0] for s in (0.0, 0.5, 1.0)}) == 3
    assert loras.resolve("lora-2", "a boat").adapter_scale == 1.0  # unset on a LoRA: full strength


def test_an_adapter_scale_is_refused_out_of_range_and_on_other_models(loras: LoraStore) -> None:
    with pytest.raises(InvalidArgument, match=r"^adapter_scale: must be between 0 and 2"):
        loras.resolve("lora-0", "a boat", adapter_scale=2.5)
    with pytest.raises(InvalidArgument, match=r"^adapter_scale: applies to LoRA models only"):
        loras.resolve("tiny-sd", "a boat", adapter_scale=1.0)


def test_the_adapter_cache_evicts_by_bytes_and_never_reloads_the_base(loras: LoraStore) -> None:
    registry = CollectorRegistry()
    metrics = InferenceMetrics.create(registry)
    one_adapter = loras.adapter("lora-0").size_bytes
    cache = AdapterCache(loras.models, max_bytes=one_adapter, metrics=metrics.adapters)
    specs, base = loras.tiny.specs, loras.tiny.model
    first = cache.get(specs.get("lora-0"), base)
    cache.get(specs.get("lora-1"), base)  # does not fit beside lora-0: evicts it
    assert cache.loaded_model_ids() == ["lora-1"] and cache.bytes_loaded == one_adapter
    assert cache.get(specs.get("lora-0"), base) is not first  # read again
    assert sample(registry, "adapter_loads_total") == 3
    assert sample(registry, "adapter_cache_evictions_total") == 2
    assert sample(registry, "model_loads_total") == 0  # adapters never load a pipeline


def test_an_adapter_that_does_not_fit_its_base_is_refused_naming_the_layer(
    loras: LoraStore, tmp_path: Path
) -> None:
    weights = load_file(str(loras.root / "lora-0" / LORA_WEIGHTS_FILE))
    key = next(k for k in sorted(weights) if k.startswith("unet.") and k.endswith("down.weight"))
    wrong_shape = dict(weights)
    wrong_shape[key] = torch.zeros(4, 7)
    unsupported = dict(weights)
    unsupported["unet.conv_in.lora.down.weight"] = torch.zeros(4, 4, 3, 3)
    for model_id, state, message in (
        ("lora-bad-shape", wrong_shape, "does not fit its base: layer 'unet.down_blocks"),
        ("lora-conv", unsupported, "does not fit its base: unet has no Linear layer 'conv_in'"),
    ):
        folder = tmp_path / model_id
        folder.mkdir()
        save_file(state, str(folder / LORA_WEIGHTS_FILE))
        loras.models.import_folder(folder, model_id, kind="lora", base_model="tiny-sd")
        with pytest.raises(FailedPrecondition, match=message):
            loras.adapter(model_id)
    shutil.rmtree(tmp_path)
