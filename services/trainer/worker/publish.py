"""Publishing: rank 0 writes the trained model as a folder (a full fine-tune, or LoRA adapters
only) and imports it into the model store (blobs first, manifest last)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from services.common.model_store import ModelStore
from services.trainer.job_spec import JobSpec
from services.trainer.worker.models import Models, unwrap
from services.trainer.worker.runtime import WorkerJob

LORA_WEIGHTS_FILE = "pytorch_lora_weights.safetensors"  # what pipe.load_lora_weights(dir) reads
LORA_INFO_FILE = "dreambooth_lora.json"


def publish(
    job: WorkerJob, model_store: ModelStore, models: Models, modules: dict[str, torch.nn.Module]
) -> None:
    """Write the result as a folder and import it (ModelStore: blobs first, manifest last)."""
    spec = job.spec
    if model_store.published_by(spec.model_id, job.job_id):
        return  # an earlier attempt of this job published it
    method = ("dreambooth-dora" if spec.use_dora else "dreambooth-lora") if spec.use_lora else "dreambooth"
    labels = {"method": method, "steps": str(spec.max_train_steps)}
    if spec.ema_decay:
        labels["ema_decay"] = f"{spec.ema_decay:g}"  # the published weights are the average
    scratch = Path(model_store.cache_dir)
    scratch.mkdir(parents=True, exist_ok=True)
    out = Path(tempfile.mkdtemp(prefix=".publish-", dir=scratch))  # same filesystem: hard links work
    try:
        if spec.use_lora:
            write_lora_folder(out, modules, spec)
        else:
            write_full_folder(out, models.folder, modules)
        model_store.import_folder(
            out,
            spec.model_id,
            kind="lora" if spec.use_lora else "fine_tuned",
            base_model=spec.base_model,
            training_job=job.job_id,
            labels=labels,
        )
    finally:
        shutil.rmtree(out, ignore_errors=True)


def write_full_folder(out: Path, base: Path, modules: dict[str, torch.nn.Module]) -> None:
    """The base folder with the trained components replaced. Untouched files are hard links to
    the (read-only) materialised base: free to make, and their blobs stay shared in the store.
    Trained components are written as new files, never through a link."""
    for source in sorted(base.rglob("*")):
        rel = source.relative_to(base)
        if rel.parts[0] in modules or rel.parts[0].startswith(".") or not source.is_file():
            continue
        dest = out / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(source, dest)
        except OSError:
            shutil.copyfile(source, dest)
    for name, module in modules.items():
        unwrap(module).save_pretrained(out / name, safe_serialization=True)


def write_lora_folder(out: Path, modules: dict[str, torch.nn.Module], spec: JobSpec) -> None:
    """Adapter weights only, in diffusers' LoRA format, plus a small JSON naming the base.
    Load: the base pipeline, then `pipe.load_lora_weights(folder)` (see load_lora_pipeline)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    layers = {
        f"{name}_lora_layers": convert_state_dict_to_diffusers(get_peft_model_state_dict(unwrap(module)))
        for name, module in modules.items()
    }
    StableDiffusionPipeline.save_lora_weights(
        out, weight_name=LORA_WEIGHTS_FILE, safe_serialization=True, **layers
    )
    info = {
        "base_model": spec.base_model,
        "lora_rank": spec.lora_rank,
        "use_dora": spec.use_dora,
        "weight_name": LORA_WEIGHTS_FILE,
        "components": sorted(modules),
    }
    (out / LORA_INFO_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")


def load_lora_pipeline(base_folder: Path, lora_folder: Path) -> Any:
    """The base model's pipeline with a published LoRA model's adapters loaded."""
    from services.common.pipelines import load_pipeline

    pipe = load_pipeline(base_folder)
    pipe.load_lora_weights(str(lora_folder), weight_name=LORA_WEIGHTS_FILE)
    return pipe
