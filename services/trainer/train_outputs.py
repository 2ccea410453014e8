"""What rank 0 makes of a training run besides checkpoints: validation previews sampled with
the live weights, and the published model (a full fine-tune folder or LoRA adapters only).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from services.common.errors import AlreadyExists
from services.common.model_store import ModelStore
from services.trainer.job_spec import JobSpec

if TYPE_CHECKING:
    from services.trainer.train_loop import Models, Runtime, WorkerJob

PREVIEW_STEPS = 20  # denoising steps of a validation preview
PREVIEW_GUIDANCE = 7.5
PREVIEW_JPEG_QUALITY = 85
LORA_WEIGHTS_FILE = "pytorch_lora_weights.safetensors"  # what pipe.load_lora_weights(dir) reads
LORA_INFO_FILE = "dreambooth_lora.json"


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    return module.module if isinstance(module, torch.nn.parallel.DistributedDataParallel) else module


def make_pipeline(models: Models) -> Any:
    """A sampling pipeline over the live (unwrapped) modules: no copies, no DDP hooks."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=models.vae,
        text_encoder=models.text_encoder,
        tokenizer=models.tokenizer,
        unet=models.unet,
        scheduler=DDIMScheduler.from_config(models.noise_scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def send_previews(
    job: WorkerJob, models: Models, step: int, runtime: Runtime, amp_dtype: torch.dtype | None
) -> None:
    """Sample the validation prompts with the live weights (seeded: comparable across steps).
    Under autocast when training is: frozen half-precision and trained fp32 modules then mix."""
    spec = job.spec
    modes = models.unet.training, models.text_encoder.training
    models.unet.eval()
    models.text_encoder.eval()
    try:
        pipe = make_pipeline(models)
        for index, prompt in enumerate(spec.validation_prompts):
            generator = torch.Generator().manual_seed(spec.seed + index)
            autocast = torch.autocast(runtime.device.type, dtype=amp_dtype, enabled=amp_dtype is not None)
            with torch.no_grad(), autocast:
                image = pipe(
                    prompt,
                    num_inference_steps=PREVIEW_STEPS,
                    guidance_scale=PREVIEW_GUIDANCE,
                    height=spec.resolution,
                    width=spec.resolution,
                    generator=generator,
                ).images[0]
            out = io.BytesIO()
            image.convert("RGB").save(out, format="JPEG", quality=PREVIEW_JPEG_QUALITY)
            runtime.send("preview", {"step": step, "prompt": prompt, "jpeg": out.getvalue()})
    finally:
        models.unet.train(modes[0])
        models.text_encoder.train(modes[1])


def publish(
    job: WorkerJob, model_store: ModelStore, models: Models, modules: dict[str, torch.nn.Module]
) -> None:
    """Write the result as a folder and import it (ModelStore: blobs first, manifest last)."""
    spec = job.spec
    if model_store.exists(spec.model_id):
        if model_store.get(spec.model_id).training_job == job.job_id:
            return  # an earlier attempt of this job published it
        raise AlreadyExists(f"model_id: model {spec.model_id!r} already exists; choose another model_id")
    method = "dreambooth-lora" if spec.use_lora else "dreambooth"
    labels = {"method": method, "steps": str(spec.max_train_steps)}
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
