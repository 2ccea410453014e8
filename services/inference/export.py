"""Export: a model's files, as they are in its manifest, for use outside the service.

    for part in export_parts(models, "my-model"):
        ...  # ExportPlan once, then per file: FileStart, then Chunk ... Chunk

What a model is on disk is what it is in the store: a base or full fine-tune is a diffusers
folder (`StableDiffusionPipeline.from_pretrained(dir)` loads it); a LoRA model is diffusers'
`pytorch_lora_weights.safetensors` (`pipe.load_lora_weights(dir)` on a stock pipeline of its
base). Files are read from the folder the model store materialised (every blob's sha256 checked
when it was fetched) and hashed again while they stream: a file whose bytes no longer match the
manifest ends the export with DataCorruption, so nothing unverified is ever presented as whole.
The receiver checks the same digests (the SDK does).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterator

from services.common.errors import DataCorruption
from services.common.model_store import ModelManifest, ModelStore

CHUNK_BYTES = 1024 * 1024  # the proto's limit per chunk message


@dataclasses.dataclass(frozen=True)
class ExportedFile:
    path: str  # relative, '/'-separated
    sha256: str
    size: int


@dataclasses.dataclass(frozen=True)
class ExportPlan:
    """The first part: the model and every file that follows, in order."""

    manifest: ModelManifest
    files: tuple[ExportedFile, ...]


@dataclasses.dataclass(frozen=True)
class FileStart:
    file: ExportedFile


@dataclasses.dataclass(frozen=True)
class Chunk:
    data: bytes


ExportPart = ExportPlan | FileStart | Chunk


def export_parts(models: ModelStore, model_id: str, chunk_bytes: int = CHUNK_BYTES) -> Iterator[ExportPart]:
    """The parts of one export, lazily (blocking I/O: iterate it off the event loop)."""
    manifest = models.get(model_id)  # NotFound before anything is sent
    folder = models.materialize_manifest(manifest)  # the manifest read above, even if re-published since
    files = tuple(ExportedFile(p, e.sha256, e.size) for p, e in sorted(manifest.files.items()))
    yield ExportPlan(manifest, files)
    for exported in files:
        yield FileStart(exported)
        digest = hashlib.sha256()
        size = 0
        with open(folder.joinpath(*exported.path.split("/")), "rb") as source:
            while data := source.read(chunk_bytes):
                digest.update(data)
                size += len(data)
                yield Chunk(data)
        if (digest.hexdigest(), size) != (exported.sha256, exported.size):
            raise DataCorruption(
                f"model {model_id!r}: file {exported.path!r} does not match its manifest digest; "
                "the export is incomplete"
            )
