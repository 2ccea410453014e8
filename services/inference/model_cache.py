"""Loaded pipelines, least recently used evicted, bounded by a count and a byte budget.

- Pipelines only: a LoRA model runs on its base's pipeline (its spec's `pipeline_manifest`), with
  its adapters applied at run time (adapter_cache.py, row_adapters.py), so every LoRA of a base
  shares the one loaded base and a LoRA request never loads a second UNet.
- Single flight: concurrent requests for one unloaded model wait on one load.
- Shared components: a module (UNet, VAE, text encoder, tokenizer) is keyed by the sha256 digests
  of its files, so a fine-tune that kept its base's VAE, text encoder and tokenizer holds the
  base's module objects, and the byte budget counts them once.
- Only safetensors are loaded, offline, from the folder the model store materialised (every
  sha256 verified there).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dreambooth_client.vocabulary import DEFAULT_SCHEDULER

from services.common.batch_invariance import share_time_embedding_rows
from services.common.model_store import ModelManifest, ModelStore
from services.common.pipelines import assemble_pipeline, disable_progress_bars
from services.common.schedulers import make_scheduler
from services.inference.metrics import CacheMetrics
from services.inference.model_specs import ModelSpec

if TYPE_CHECKING:
    import torch
    from diffusers import StableDiffusionPipeline

log = logging.getLogger(__name__)

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer")


@dataclasses.dataclass
class _Component:
    module: Any
    size_bytes: int
    refs: int = 0


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A model ready to sample: its pipeline and what the sampler needs next to it."""

    model_id: str
    digest: str
    pipeline: StableDiffusionPipeline
    scheduler_config: dict[str, Any]
    component_keys: tuple[str, ...]
    size_bytes: int
    # The Rust tokenizer mutates its truncation settings per call: one caller at a time.
    tokenizer_lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, compare=False)

    @property
    def unet(self) -> Any:
        return self.pipeline.unet

    @property
    def vae(self) -> Any:
        return self.pipeline.vae

    @property
    def text_encoder(self) -> Any:
        return self.pipeline.text_encoder

    @property
    def tokenizer(self) -> Any:
        return self.pipeline.tokenizer


class ModelCache:
    def __init__(
        self,
        models: ModelStore,
        *,
        max_models: int,
        max_bytes: int,
        device: str = "cpu",
        dtype: str = "float32",
        metrics: CacheMetrics | None = None,
    ) -> None:
        self._models = models
        self._max_models = max_models
        self._max_bytes = max_bytes
        self._device = device
        self._dtype_name = dtype
        self._metrics = metrics
        self._lock = threading.Lock()
        self._loaded: OrderedDict[str, LoadedModel] = OrderedDict()  # by manifest digest, LRU first
        self._loading: dict[str, Future[LoadedModel]] = {}
        self._components: dict[str, _Component] = {}

    # ---- queries ------------------------------------------------------------------------------

    def loaded_model_ids(self) -> list[str]:
        with self._lock:
            return [model.model_id for model in self._loaded.values()]

    @property
    def bytes_loaded(self) -> int:
        with self._lock:
            return self._bytes_locked()

    def component_modules(self) -> dict[str, Any]:
        """Component key -> module (tests check that shared components are held once)."""
        with self._lock:
            return {key: component.module for key, component in self._components.items()}

    # ---- get / load ---------------------------------------------------------------------------

    def get(self, spec: ModelSpec) -> LoadedModel:
        """The loaded pipeline of `spec` (of its base, for a LoRA model); loads it (once, whoever
        else asks meanwhile) when missing."""
        digest = spec.pipeline_manifest.digest
        with self._lock:
            model = self._loaded.get(digest)
            if model is not None:
                self._loaded.move_to_end(digest)
                self._count("hits")
                return model
            self._count("misses")
            flight = self._loading.get(digest)
            leader = flight is None
            if flight is None:
                flight = self._loading[digest] = Future()
        if not leader:
            return flight.result()
        try:
            model = self._load(spec)
        except BaseException as err:
            with self._lock:
                self._loading.pop(digest, None)
            flight.set_exception(err)
            raise
        with self._lock:
            self._loading.pop(digest, None)
            self._loaded[digest] = model
            self._evict_locked(keep=digest)
            self._update_gauges_locked()
        flight.set_result(model)
        return model

    def _load(self, spec: ModelSpec) -> LoadedModel:
        started = time.perf_counter()
        if self._metrics is not None:
            self._metrics.loads.inc()
        manifest = spec.pipeline_manifest  # the model itself, or the base of a LoRA
        keys = {name: self._component_key(name, manifest) for name in COMPONENTS}
        self._make_room(manifest, keys)
        folder = self._models.materialize_manifest(manifest)  # by digest: any tenant's base will do
        modules: dict[str, Any] = {}
        held: list[str] = []  # references taken so far, given back if the load fails
        try:
            for name in COMPONENTS:
                modules[name] = self._acquire(
                    keys[name], lambda name=name: self._load_component(name, folder)
                )
                held.append(keys[name])
        except BaseException:
            for key in held:
                self._release(key)
            raise
        scheduler_config = _load_scheduler_config(folder)
        pipeline = _assemble(modules, scheduler_config)
        seconds = time.perf_counter() - started
        if self._metrics is not None:
            self._metrics.load_duration.observe(seconds)
        with self._lock:
            size = sum(self._components[keys[name]].size_bytes for name in COMPONENTS)
        log.info(
            "model loaded",
            extra={
                "model_id": manifest.model_id,
                "digest": manifest.digest[:12],
                "seconds": round(seconds, 3),
            },
        )
        return LoadedModel(
            model_id=manifest.model_id,
            digest=manifest.digest,
            pipeline=pipeline,
            scheduler_config=scheduler_config,
            component_keys=tuple(keys[name] for name in COMPONENTS),
            size_bytes=size,
        )

    def _load_component(self, name: str, folder: Path) -> tuple[Any, int]:
        """(module, bytes it holds) of one pipeline component: safetensors only, offline."""
        path = str(folder / name)
        if name == "tokenizer":
            from transformers import CLIPTokenizer

            size = sum(f.stat().st_size for f in (folder / name).iterdir() if f.is_file())
            return CLIPTokenizer.from_pretrained(path, local_files_only=True), size
        disable_progress_bars()
        options = {"use_safetensors": True, "local_files_only": True}
        if name == "unet":
            from diffusers import UNet2DConditionModel

            module = UNet2DConditionModel.from_pretrained(path, torch_dtype=self.torch_dtype, **options)
            share_time_embedding_rows(module)
        elif name == "vae":
            from diffusers import AutoencoderKL

            module = AutoencoderKL.from_pretrained(path, torch_dtype=self.torch_dtype, **options)
        else:
            from transformers import CLIPTextModel

            module = CLIPTextModel.from_pretrained(path, dtype=self.torch_dtype, **options)
        module = module.to(self._device).eval().requires_grad_(False)
        return module, _module_bytes(module)

    def _acquire(self, key: str, load: Any) -> Any:
        """The shared module of `key` with one more reference; loaded when nobody holds it."""
        with self._lock:
            component = self._components.get(key)
            if component is not None:
                component.refs += 1
                return component.module
        module, size = load()
        with self._lock:
            component = self._components.get(key)
            if component is None:  # else a concurrent load of a sibling model won: use its module
                component = self._components[key] = _Component(module, size)
            component.refs += 1
            return component.module

    def _release(self, key: str) -> None:
        with self._lock:
            self._release_locked(key)

    def _release_locked(self, key: str) -> None:
        component = self._components[key]
        component.refs -= 1
        if component.refs <= 0:
            del self._components[key]  # freed once no running batch still holds a model using it

    def _component_key(self, name: str, manifest: ModelManifest) -> str:
        prefix = f"{name}/"
        files = sorted((p, e.sha256) for p, e in manifest.files.items() if p.startswith(prefix))
        digest = hashlib.sha256("".join(f"{p}:{sha}\n" for p, sha in files).encode()).hexdigest()
        return f"{name}:{self._dtype_name}:{self._device}:{digest}"

    @property
    def torch_dtype(self) -> torch.dtype:
        import torch

        return getattr(torch, self._dtype_name)

    # ---- eviction -----------------------------------------------------------------------------

    def _make_room(self, manifest: ModelManifest, keys: dict[str, str]) -> None:
        """Evict before loading, so old and new weights are not all in memory at once."""
        with self._lock:
            new_bytes = sum(
                e.size
                for p, e in manifest.files.items()
                if p.split("/", 1)[0] in keys and keys[p.split("/", 1)[0]] not in self._components
            )
            while self._loaded and (
                len(self._loaded) + 1 > self._max_models or self._bytes_locked() + new_bytes > self._max_bytes
            ):
                self._evict_one_locked()
            self._update_gauges_locked()

    def _evict_locked(self, keep: str) -> None:
        while len(self._loaded) > 1 and (
            len(self._loaded) > self._max_models or self._bytes_locked() > self._max_bytes
        ):
            oldest = next(iter(self._loaded))
            if oldest == keep:
                break
            self._evict_one_locked()

    def _evict_one_locked(self) -> None:
        _, model = self._loaded.popitem(last=False)
        for key in model.component_keys:
            self._release_locked(key)
        self._count("evictions")
        log.info("model evicted", extra={"model_id": model.model_id, "digest": model.digest[:12]})

    def _bytes_locked(self) -> int:
        return sum(component.size_bytes for component in self._components.values())

    def _update_gauges_locked(self) -> None:
        if self._metrics is not None:
            self._metrics.models_loaded.set(len(self._loaded))
            self._metrics.bytes_loaded.set(self._bytes_locked())

    def _count(self, name: str) -> None:
        if self._metrics is not None:
            getattr(self._metrics, name).inc()


def _module_bytes(module: Any) -> int:
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def _load_scheduler_config(folder: Path) -> dict[str, Any]:
    from diffusers import DDIMScheduler

    return dict(DDIMScheduler.load_config(str(folder / "scheduler")))


def _assemble(modules: dict[str, Any], scheduler_config: dict[str, Any]) -> StableDiffusionPipeline:
    # The scheduler is a placeholder: the sampler makes one per request, of the request's kind.
    return assemble_pipeline(
        vae=modules["vae"],
        text_encoder=modules["text_encoder"],
        tokenizer=modules["tokenizer"],
        unet=modules["unet"],
        scheduler=make_scheduler(DEFAULT_SCHEDULER, scheduler_config),
    )
