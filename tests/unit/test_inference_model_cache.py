"""The model cache: single-flight loads, components shared by digest, LRU by count and bytes."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from services.common.local_store import LocalObjectStore
from services.common.model_store import ModelStore
from services.common.tiny_model import build_tiny_model
from services.inference.metrics import InferenceMetrics
from services.inference.model_cache import ModelCache
from services.inference.model_specs import ModelSpecs
from tests.fixtures.loras import make_lora


class Store:
    """A local model store with the tiny model, a full copy and a fine-tune of another UNet."""

    def __init__(self, root: Path, tiny_model_dir: Path, tuned_dir: Path, lora_dir: Path) -> None:
        self.models = ModelStore(LocalObjectStore(root / "store"), root / "cache")
        self.models.import_folder(tiny_model_dir, "tiny-sd")
        self.models.import_folder(tiny_model_dir, "tiny-copy", labels={"copy": "yes"})  # same blobs
        self.models.import_folder(tuned_dir, "tuned", kind="fine_tuned", base_model="tiny-sd")
        self.models.import_folder(lora_dir, "tiny-lora", kind="lora", base_model="tiny-sd")
        self.specs = ModelSpecs(self.models, root / "cache")
        self.registry = CollectorRegistry()
        self.metrics = InferenceMetrics.create(self.registry).cache

    def cache(self, **limits: int) -> ModelCache:
        values = {"max_models": 8, "max_bytes": 2**34}
        values.update(limits)
        return ModelCache(self.models, metrics=self.metrics, **values)

    def count(self, name: str) -> float:
        return self.registry.get_sample_value(f"dreambooth_inference_{name}") or 0.0


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Store:
    root = tmp_path_factory.mktemp("model-cache")
    other = build_tiny_model(root / "other", seed=1)
    tuned = root / "tuned"
    shutil.copytree(tiny_model_dir, tuned)
    shutil.rmtree(tuned / "unet")
    shutil.copytree(other / "unet", tuned / "unet")  # a fine-tune that changed only the UNet
    return Store(root, tiny_model_dir, tuned, make_lora(tiny_model_dir, root / "lora", seed=0))


@pytest.fixture
def counts(store: Store) -> Iterator[dict[str, float]]:
    """Counter values at the start of the test (the registry is shared by the module)."""
    names = (
        "model_cache_hits_total",
        "model_cache_misses_total",
        "model_loads_total",
        "model_cache_evictions_total",
    )
    yield {name: store.count(name) for name in names}


def delta(store: Store, counts: dict[str, float], name: str) -> float:
    return store.count(name) - counts[name]


def test_concurrent_gets_of_an_unloaded_model_load_it_once(store: Store, counts: dict[str, float]) -> None:
    cache = store.cache()
    spec = store.specs.get("tiny-sd")
    start = threading.Barrier(4)

    def get() -> object:
        start.wait()
        return cache.get(spec)

    with ThreadPoolExecutor(4) as pool:
        loaded = list(pool.map(lambda _: get(), range(4)))
    assert all(model is loaded[0] for model in loaded)
    assert delta(store, counts, "model_loads_total") == 1
    assert delta(store, counts, "model_cache_misses_total") == 4
    assert cache.get(spec) is loaded[0]
    assert delta(store, counts, "model_cache_hits_total") == 1


def test_a_fine_tune_holds_its_bases_unchanged_components_once(store: Store) -> None:
    cache = store.cache()
    base = cache.get(store.specs.get("tiny-sd"))
    bytes_base = cache.bytes_loaded
    tuned = cache.get(store.specs.get("tuned"))
    assert (
        tuned.vae is base.vae
        and tuned.text_encoder is base.text_encoder
        and tuned.tokenizer is base.tokenizer
    )
    assert tuned.unet is not base.unet
    unet_bytes = sum(p.numel() * p.element_size() for p in tuned.unet.parameters())
    assert cache.bytes_loaded == bytes_base + unet_bytes
    assert len(cache.component_modules()) == 5  # 4 of the base + the tuned UNet

    copy = cache.get(store.specs.get("tiny-copy"))  # another model, the very same files
    assert copy is not base and copy.unet is base.unet
    assert cache.bytes_loaded == bytes_base + unet_bytes


def test_lru_eviction_by_count_keeps_shared_components_of_the_survivors(
    store: Store, counts: dict[str, float]
) -> None:
    cache = store.cache(max_models=2)
    base = cache.get(store.specs.get("tiny-sd"))
    cache.get(store.specs.get("tuned"))
    cache.get(store.specs.get("tiny-sd"))  # base is now the most recently used
    cache.get(store.specs.get("tiny-copy"))  # evicts "tuned", the least recently used
    assert cache.loaded_model_ids() == ["tiny-sd", "tiny-copy"]
    assert delta(store, counts, "model_cache_evictions_total") == 1
    assert len(cache.component_modules()) == 4  # the tuned UNet is gone, the shared ones stay
    assert base.unet in cache.component_modules().values()


def test_eviction_by_bytes(store: Store, counts: dict[str, float]) -> None:
    probe = store.cache()
    probe.get(store.specs.get("tiny-sd"))
    one_model = probe.bytes_loaded
    cache = store.cache(max_bytes=one_model + 1024)
    cache.get(store.specs.get("tiny-sd"))
    cache.get(store.specs.get("tuned"))  # its new UNet does not fit next to the base
    assert cache.loaded_model_ids() == ["tuned"]
    assert cache.bytes_loaded <= one_model + 1024
    assert delta(store, counts, "model_cache_evictions_total") == 1


def test_a_failed_load_reaches_every_waiter_and_is_retried(store: Store, tmp_path: Path) -> None:
    broken_store = ModelStore(store.models.store, tmp_path / "cache")
    cache = ModelCache(broken_store, max_models=2, max_bytes=2**34)
    spec = store.specs.get("tiny-sd")
    blob = Path(store.models.store.root) / "blobs" / "sha256" / spec.manifest.files["vae/config.json"].sha256
    original = blob.read_bytes()
    blob.write_bytes(b"{}")  # corrupt in the store: materialize refuses it
    try:
        with pytest.raises(Exception, match="corrupted"):
            cache.get(spec)
    finally:
        blob.write_bytes(original)
    assert cache.get(spec).model_id == "tiny-sd"


def test_a_lora_model_is_served_by_its_bases_pipeline_with_nothing_copied(
    store: Store, counts: dict[str, float]
) -> None:
    cache = store.cache()
    lora = cache.get(store.specs.get("tiny-lora"))  # loads the base, once
    base = cache.get(store.specs.get("tiny-sd"))
    assert lora is base and cache.loaded_model_ids() == ["tiny-sd"]
    assert len(cache.component_modules()) == 4  # no private UNet or text encoder
    assert delta(store, counts, "model_loads_total") == 1
