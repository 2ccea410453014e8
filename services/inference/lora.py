"""LoRA models: the base pipeline with the adapters fused into private copies of what they touch.

The trainer publishes a LoRA model as diffusers' LoRA folder (`pytorch_lora_weights.safetensors`,
see services/trainer/worker/publish.py). Fusing makes sampling cost what the base costs; the copies
keep the base's shared modules untouched (the VAE and tokenizer stay shared).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from services.common.batch_invariance import share_time_embedding_rows
from services.common.errors import FailedPrecondition
from services.common.pipelines import assemble_pipeline

LORA_WEIGHTS_FILE = "pytorch_lora_weights.safetensors"
LORA_COMPONENTS = ("unet", "text_encoder")


def lora_targets(lora_folder: Path) -> tuple[str, ...]:
    """Which components the adapters touch, read from the tensor names (no weights loaded)."""
    from safetensors import safe_open

    path = lora_folder / LORA_WEIGHTS_FILE
    if not path.is_file():
        raise FailedPrecondition(f"LoRA model has no {LORA_WEIGHTS_FILE}")
    with safe_open(str(path), framework="pt") as weights:
        prefixes = {key.split(".", 1)[0] for key in weights.keys()}  # noqa: SIM118 - not a dict
    targets = tuple(name for name in LORA_COMPONENTS if name in prefixes)
    if not targets:
        raise FailedPrecondition(
            f"LoRA weights touch neither the UNet nor the text encoder: {sorted(prefixes)}"
        )
    return targets


def fuse_lora_copies(modules: dict[str, Any], lora_folder: Path, targets: tuple[str, ...]) -> dict[str, Any]:
    """Copies of the `targets` modules with the adapters fused in; the originals stay untouched."""
    from diffusers import DDIMScheduler

    copies = {name: copy.deepcopy(modules[name]) for name in targets}
    staging = assemble_pipeline(
        vae=modules["vae"],
        text_encoder=copies.get("text_encoder", modules["text_encoder"]),
        tokenizer=modules["tokenizer"],
        unet=copies.get("unet", modules["unet"]),
        scheduler=DDIMScheduler(clip_sample=False, steps_offset=1),  # unused: only loads adapters
    )
    staging.load_lora_weights(str(lora_folder), weight_name=LORA_WEIGHTS_FILE, adapter_name="model")
    staging.fuse_lora(components=list(targets), lora_scale=1.0)
    staging.unload_lora_weights()  # drops the adapter layers; the fused weights stay
    if "unet" in copies:
        share_time_embedding_rows(copies["unet"])
    return {name: module.eval().requires_grad_(False) for name, module in copies.items()}
