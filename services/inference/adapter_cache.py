"""Loaded LoRA adapters, beside the model cache: least recently used evicted, bounded by bytes.

An adapter is a LoRA model's few MB of low-rank weights (lora.py), read against its base's
loaded modules and applied at run time (row_adapters.py): loading one never loads or copies the
base. Keyed by (LoRA manifest digest, base manifest digest), so a re-published LoRA or base is
read again. Single flight: concurrent requests for one unloaded adapter wait on one read.
Eviction only forgets an adapter: a batch still running on it holds its tensors until it ends.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future

import torch

from services.common.errors import FailedPrecondition
from services.common.model_store import ModelStore
from services.inference.lora import LORA_WEIGHTS_FILE, LoraAdapter, read_adapter
from services.inference.metrics import AdapterMetrics
from services.inference.model_cache import LoadedModel
from services.inference.model_specs import ModelSpec
from services.inference.row_adapters import patch_layers

log = logging.getLogger(__name__)

_Key = tuple[str, str]  # (LoRA manifest digest, base manifest digest)


class AdapterCache:
    def __init__(
        self,
        models: ModelStore,
        *,
        max_bytes: int,
        metrics: AdapterMetrics | None = None,
    ) -> None:
        self._models = models
        self._max_bytes = max_bytes
        self._metrics = metrics
        self._lock = threading.Lock()
        self._loaded: OrderedDict[_Key, LoraAdapter] = OrderedDict()  # LRU first
        self._loading: dict[_Key, Future[LoraAdapter]] = {}

    def loaded_model_ids(self) -> list[str]:
        with self._lock:
            return [adapter.model_id for adapter in self._loaded.values()]

    @property
    def bytes_loaded(self) -> int:
        with self._lock:
            return self._bytes_locked()

    def get(self, spec: ModelSpec, base: LoadedModel) -> LoraAdapter:
        """The adapter of LoRA model `spec`, ready on `base` (its loaded base pipeline)."""
        if spec.manifest.kind != "lora":
            raise FailedPrecondition(f"model {spec.manifest.model_id!r} is not a LoRA model")
        key = (spec.digest, base.digest)
        with self._lock:
            adapter = self._loaded.get(key)
            if adapter is not None:
                self._loaded.move_to_end(key)
                self._count("hits")
            else:
                self._count("misses")
                flight = self._loading.get(key)
                leader = flight is None
                if flight is None:
                    flight = self._loading[key] = Future()
        if adapter is None:
            adapter = self._lead(spec, base, key, flight) if leader else flight.result()
        _patch(base, adapter)  # a base reloaded since the adapter was read is patched again
        return adapter

    def _lead(
        self, spec: ModelSpec, base: LoadedModel, key: _Key, flight: Future[LoraAdapter]
    ) -> LoraAdapter:
        try:
            adapter = self._load(spec, base)
        except BaseException as err:
            with self._lock:
                self._loading.pop(key, None)
            flight.set_exception(err)
            raise
        with self._lock:
            self._loading.pop(key, None)
            self._loaded[key] = adapter
            while len(self._loaded) > 1 and self._bytes_locked() > self._max_bytes:
                self._loaded.popitem(last=False)
                self._count("evictions")
            self._update_gauges_locked()
        flight.set_result(adapter)
        return adapter

    def _load(self, spec: ModelSpec, base: LoadedModel) -> LoraAdapter:
        started = time.perf_counter()
        if self._metrics is not None:
            self._metrics.loads.inc()
        if LORA_WEIGHTS_FILE not in spec.manifest.files:
            raise FailedPrecondition(f"LoRA model {spec.manifest.model_id!r} has no {LORA_WEIGHTS_FILE}")
        weights = self._models.local_file(spec.manifest, LORA_WEIGHTS_FILE)  # sha256 verified
        unet = base.unet
        adapter = read_adapter(
            weights,
            {"unet": unet, "text_encoder": base.text_encoder},
            model_id=spec.manifest.model_id,
            digest=spec.digest,
            device=unet.device,
            dtype=unet.dtype if isinstance(unet.dtype, torch.dtype) else torch.float32,
        )
        seconds = time.perf_counter() - started
        if self._metrics is not None:
            self._metrics.load_duration.observe(seconds)
        log.info(
            "adapter loaded",
            extra={
                "model_id": adapter.model_id,
                "base_model_id": base.model_id,
                "bytes": adapter.size_bytes,
                "seconds": round(seconds, 4),
            },
        )
        return adapter

    def _bytes_locked(self) -> int:
        return sum(adapter.size_bytes for adapter in self._loaded.values())

    def _update_gauges_locked(self) -> None:
        if self._metrics is not None:
            self._metrics.adapters_loaded.set(len(self._loaded))
            self._metrics.bytes_loaded.set(self._bytes_locked())

    def _count(self, name: str) -> None:
        if self._metrics is not None:
            getattr(self._metrics, name).inc()


def _patch(base: LoadedModel, adapter: LoraAdapter) -> None:
    patch_layers(base.unet, "unet", adapter)
    patch_layers(base.text_encoder, "text_encoder", adapter)
