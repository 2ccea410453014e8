"""What validation needs to know about a model, read without loading its weights.

A request is checked before any model is loaded (so a bad request never costs a load): this
reads the manifest, two small config files (default image size) and the tokenizer (prompt token
counts) straight from the store's content-addressed blobs. Tokenizers are cached by the digest
of their files, so a fine-tune that kept its base's tokenizer shares it. Specs are cached per
model for `ttl_seconds`: a burst of requests costs one manifest read, and a re-published or
deleted model is noticed within the TTL.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.common.errors import DataCorruption, FailedPrecondition
from services.common.model_store import ModelManifest, ModelStore, blob_key

log = logging.getLogger(__name__)

TOKENIZER_DIR = "tokenizer/"


@dataclass(frozen=True)
class ModelSpec:
    manifest: ModelManifest  # the model asked for
    pipeline_manifest: ModelManifest  # the one holding the pipeline files (the base of a LoRA)
    default_width: int
    default_height: int
    max_tokens: int
    count_tokens: Callable[[str], int]  # tokens the text encoder sees, start and end included

    @property
    def digest(self) -> str:
        return self.manifest.digest

    @property
    def is_lora(self) -> bool:
        return self.manifest.kind == "lora"


class ModelSpecs:
    def __init__(
        self,
        models: ModelStore,
        cache_dir: Path,
        ttl_seconds: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._models = models
        self._tokenizer_dir = Path(cache_dir) / "tokenizers"
        self._ttl = ttl_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._by_id: dict[str, tuple[ModelSpec, float]] = {}
        self._tokenizers: dict[str, _TokenCounter] = {}

    def get(self, model_id: str) -> ModelSpec:
        """The spec of `model_id`; NotFound when it has no manifest."""
        with self._lock:
            cached = self._by_id.get(model_id)
            now = self._clock()
            if cached is not None and now - cached[1] < self._ttl:
                return cached[0]
            manifest = self._models.get(model_id)
            if cached is not None and cached[0].digest == manifest.digest:
                spec = cached[0]
            else:
                spec = self._build(manifest)
            self._by_id[model_id] = (spec, now)
            return spec

    def forget(self, model_id: str) -> None:
        with self._lock:
            self._by_id.pop(model_id, None)

    def _build(self, manifest: ModelManifest) -> ModelSpec:
        pipeline_manifest = pipeline_manifest_of(self._models, manifest)
        unet = self._read_json(pipeline_manifest, "unet/config.json")
        vae = self._read_json(pipeline_manifest, "vae/config.json")
        scale = 2 ** (len(vae.get("block_out_channels", [0, 0, 0, 0])) - 1)
        sample_size = unet.get("sample_size", 64)
        height, width = (sample_size, sample_size) if isinstance(sample_size, int) else sample_size
        count_tokens, max_tokens = self._tokenizer(pipeline_manifest)
        return ModelSpec(
            manifest=manifest,
            pipeline_manifest=pipeline_manifest,
            default_width=int(width) * scale,
            default_height=int(height) * scale,
            max_tokens=max_tokens,
            count_tokens=count_tokens,
        )

    def _read_json(self, manifest: ModelManifest, path: str) -> dict[str, Any]:
        data = read_model_file(self._models, manifest, path)
        try:
            value = json.loads(data)
        except ValueError as err:
            raise DataCorruption(f"model {manifest.model_id!r}: {path} is not valid JSON") from err
        if not isinstance(value, dict):
            raise DataCorruption(f"model {manifest.model_id!r}: {path} is not a JSON object")
        return value

    def _tokenizer(self, manifest: ModelManifest) -> tuple[_TokenCounter, int]:
        files = {p: e for p, e in manifest.files.items() if p.startswith(TOKENIZER_DIR)}
        if not files:
            raise FailedPrecondition(f"model {manifest.model_id!r} has no tokenizer")
        digest = hashlib.sha256(
            "".join(f"{p}:{e.sha256}\n" for p, e in sorted(files.items())).encode()
        ).hexdigest()
        counter = self._tokenizers.get(digest)
        if counter is None:
            folder = self._tokenizer_dir / digest
            if not folder.is_dir():
                self._write_tokenizer(manifest, files, folder)
            counter = _token_counter(folder)
            self._tokenizers[digest] = counter
        return counter, counter.max_tokens

    def _write_tokenizer(self, manifest: ModelManifest, files: dict[str, Any], folder: Path) -> None:
        folder.parent.mkdir(parents=True, exist_ok=True)
        building = Path(tempfile.mkdtemp(prefix=f".{folder.name[:16]}.", dir=folder.parent))
        try:
            for path in files:
                target = building / path.removeprefix(TOKENIZER_DIR)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(read_model_file(self._models, manifest, path))
            try:
                os.rename(building, folder)
            except OSError:
                if not folder.is_dir():
                    raise
                shutil.rmtree(building, ignore_errors=True)  # another process wrote it first
        except BaseException:
            shutil.rmtree(building, ignore_errors=True)
            raise


def pipeline_manifest_of(models: ModelStore, manifest: ModelManifest) -> ModelManifest:
    """The manifest holding the pipeline: the model itself, or the base model of a LoRA."""
    if manifest.kind != "lora":
        return manifest
    if not manifest.base_model:
        raise FailedPrecondition(f"LoRA model {manifest.model_id!r} names no base model")
    return models.get(manifest.base_model)


def read_model_file(models: ModelStore, manifest: ModelManifest, path: str) -> bytes:
    """One file of a model from its blob, sha256 verified."""
    entry = manifest.files.get(path)
    if entry is None:
        raise FailedPrecondition(
            f"model {manifest.model_id!r} is not a Stable Diffusion pipeline: it has no {path}"
        )
    data = models.store.get_bytes(blob_key(entry.sha256))
    if hashlib.sha256(data).hexdigest() != entry.sha256:
        raise DataCorruption(f"model {manifest.model_id!r}: file {path!r} is corrupted in the store")
    return data


class _TokenCounter:
    """Counts tokens with a CLIP tokenizer; the Rust tokenizer is not safe to share between threads."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._lock = threading.Lock()
        self.max_tokens = int(tokenizer.model_max_length)

    def __call__(self, text: str) -> int:
        with self._lock:
            ids = self._tokenizer(text, truncation=False, add_special_tokens=True, verbose=False).input_ids
        return len(ids)


def _token_counter(folder: Path) -> _TokenCounter:
    from transformers import CLIPTokenizer

    return _TokenCounter(CLIPTokenizer.from_pretrained(str(folder), local_files_only=True))
