"""Loaded pipelines, one per base-model digest, least recently used evicted.

Loading (materialise from the store, verify every sha256, from_pretrained) costs seconds on a
real model; every set of the same base model reuses the loaded modules.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from typing import TYPE_CHECKING

from services.common.batch_invariance import share_time_embedding_rows
from services.common.model_store import ModelManifest, ModelStore
from services.common.pipelines import load_pipeline

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

log = logging.getLogger(__name__)


class PipelineCache:
    def __init__(self, models: ModelStore, device: str = "cpu", capacity: int = 2) -> None:
        self._models = models
        self._device = device
        self._capacity = capacity
        self._lock = threading.Lock()  # held while loading: two sets never load the same model twice
        self._pipelines: OrderedDict[str, StableDiffusionPipeline] = OrderedDict()

    def get(self, manifest: ModelManifest) -> StableDiffusionPipeline:
        """The loaded pipeline of a base model's manifest (any tenant's view of it: keyed by digest)."""
        model_id, digest = manifest.model_id, manifest.digest
        with self._lock:
            pipe = self._pipelines.get(digest)
            if pipe is not None:
                self._pipelines.move_to_end(digest)
                return pipe
            started = time.monotonic()
            folder = self._models.materialize_manifest(manifest)
            pipe = load_pipeline(folder, device=self._device)
            share_time_embedding_rows(pipe.unet)  # an image must not depend on its slot in a batch
            self._pipelines[digest] = pipe
            while len(self._pipelines) > self._capacity:
                self._pipelines.popitem(last=False)
            log.info(
                "pipeline loaded",
                extra={"model_id": model_id, "digest": digest[:12], "seconds": time.monotonic() - started},
            )
            return pipe

    def loaded(self) -> int:
        with self._lock:
            return len(self._pipelines)
