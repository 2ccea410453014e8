"""ToyBench scores for a sweep's models: each published model is exported (ExportModel) into a
temporary folder and scored there by toybench (toybench.exported).

toybench ships with the server distribution (it needs torch and diffusers), not with this
client: it is imported only when `--toybench-subject` is given, and its absence is a clear refusal
before any job is created.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Any

from dreambooth.v1 import common_pb2, trainer_pb2

from dreambooth_client import messages
from dreambooth_client.client import DreamBoothClient

MISSING = (
    "--toybench-subject needs the toybench package, which ships with the server distribution "
    "(dreambooth-service, with torch and diffusers): install it beside the client, or leave "
    "--toybench-subject out"
)


class ToyBenchUnavailable(ValueError):
    """toybench (or what it needs) is not installed here."""


def load_scorer(subject: str, images_per_prompt: int) -> Any:
    """toybench's ExportedModelScorer for a held-out subject (ValueError naming the subjects)."""
    try:
        from toybench.exported import ExportedModelScorer
    except ImportError as err:
        raise ToyBenchUnavailable(MISSING) from err
    return ExportedModelScorer(
        subject, images_per_prompt=images_per_prompt, class_images=4 * images_per_prompt
    )


def columns() -> tuple[str, ...]:
    from toybench.exported import COLUMNS

    return COLUMNS


class ExportingScorer:
    """Called with a finished job: exports its model (and a LoRA's base, once) and scores it."""

    def __init__(self, client: DreamBoothClient, scorer: Any) -> None:
        self.client = client
        self.scorer = scorer
        self._work = Path(tempfile.mkdtemp(prefix="dreambooth-toybench-"))
        self._bases: dict[str, Path] = {}

    def __call__(self, job: trainer_pb2.TrainingJob) -> dict[str, float]:
        folder = self._work / messages.resource_id(job.model)
        model = self.client.export_model(job.model, folder)
        try:
            base = self._base(model.base_model) if model.kind == common_pb2.MODEL_KIND_LORA else None
            return dict(self.scorer.score(folder, base=base))
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def _base(self, name: str) -> Path:
        if name not in self._bases:
            folder = self._work / "bases" / messages.resource_id(messages.model_name(name))
            self.client.export_model(name, folder)
            self._bases[name] = folder
        return self._bases[name]

    def close(self) -> None:
        shutil.rmtree(self._work, ignore_errors=True)

    def __enter__(self) -> ExportingScorer:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()
