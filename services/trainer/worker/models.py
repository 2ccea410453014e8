"""The models a worker trains: the base loaded from its folder, what is frozen and what is
trained (the full UNet and optionally the text encoder, or LoRA adapters on them), and the
trained state that checkpoints hold."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from services.common.errors import FailedPrecondition
from services.trainer.job_spec import JobSpec

LORA_UNET_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
LORA_TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    return module.module if isinstance(module, torch.nn.parallel.DistributedDataParallel) else module


@dataclass
class Models:
    folder: Path
    tokenizer: Any
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module
    noise_scheduler: Any


def load_base_model(folder: Path) -> Models:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0
    from transformers import CLIPTextModel, CLIPTokenizer

    # Weights may be stored in half precision (the committed toy-world base is), and transformers
    # loads a stored dtype as it is: every module starts as float32, configure_trainable decides.
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", use_safetensors=True).float()
    unet.set_attn_processor(AttnProcessor2_0())  # SDPA: flash / memory-efficient kernels on GPU
    text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", use_safetensors=True)
    return Models(
        folder=folder,
        tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"),
        text_encoder=text_encoder.float(),
        vae=AutoencoderKL.from_pretrained(folder, subfolder="vae", use_safetensors=True).float(),
        unet=unet,
        noise_scheduler=DDPMScheduler.from_pretrained(folder, subfolder="scheduler"),
    )


def configure_trainable(
    models: Models, spec: JobSpec, device: torch.device, weight_dtype: torch.dtype
) -> None:
    """Freeze what is not trained and add LoRA adapters in LoRA mode. Frozen weights go to
    `weight_dtype` (half precision on GPU); trained ones stay fp32 (the optimizer's master copy)."""
    models.vae.requires_grad_(False).eval().to(device)  # fp32: it encodes once per job anyway
    models.text_encoder.requires_grad_(spec.train_text_encoder and not spec.use_lora)
    models.unet.requires_grad_(not spec.use_lora)
    if spec.use_lora:
        models.unet.to(device, weight_dtype)
        if spec.train_text_encoder:
            models.text_encoder.to(device, weight_dtype)
        # peft draws the adapters' initial weights from the global generator: seed it from the
        # spec, so a run is the same run whatever the process did before (and resumes onto it).
        with torch.random.fork_rng():
            torch.manual_seed(spec.seed)
            models.unet.add_adapter(_lora_config(spec, LORA_UNET_TARGETS))
            if spec.train_text_encoder:
                models.text_encoder.add_adapter(_lora_config(spec, LORA_TEXT_TARGETS))
        for module in (models.unet, models.text_encoder):
            for param in module.parameters():
                if param.requires_grad:
                    param.data = param.data.float()
    if not spec.train_text_encoder:
        models.text_encoder.eval().to(device, weight_dtype)
    if spec.gradient_checkpointing:
        models.unet.enable_gradient_checkpointing()
        if spec.train_text_encoder:
            enable = getattr(
                models.text_encoder, "activation_checkpointing_enable", None
            )  # transformers>=5.x
            (enable or models.text_encoder.gradient_checkpointing_enable)()
    models.unet.train()
    if spec.train_text_encoder:
        models.text_encoder.train()


def _lora_config(spec: JobSpec, targets: list[str]) -> Any:
    """LoRA adapters of the spec's rank; with use_dora, DoRA's (a trained magnitude per output
    feature on top of the low-rank direction update)."""
    from peft import LoraConfig

    return LoraConfig(
        r=spec.lora_rank,
        lora_alpha=spec.lora_rank,
        init_lora_weights="gaussian",
        target_modules=targets,
        use_dora=spec.use_dora,
    )


def trained_modules(models: Models, spec: JobSpec) -> dict[str, torch.nn.Module]:
    modules: dict[str, torch.nn.Module] = {"unet": models.unet}
    if spec.train_text_encoder:
        modules["text_encoder"] = models.text_encoder
    return modules


def trainable_state(modules: dict[str, torch.nn.Module], use_lora: bool) -> dict[str, torch.Tensor]:
    """What a checkpoint must hold: the LoRA adapters, or the full weights of trained modules."""
    from peft.utils import get_peft_model_state_dict

    state = {}
    for name, module in modules.items():
        weights = get_peft_model_state_dict(unwrap(module)) if use_lora else unwrap(module).state_dict()
        state.update({f"{name}.{key}": value.detach().cpu() for key, value in weights.items()})
    return state


def load_trainable_state(
    modules: dict[str, torch.nn.Module], state: dict[str, torch.Tensor], use_lora: bool
) -> None:
    from peft.utils import set_peft_model_state_dict

    for name, module in modules.items():
        prefix = f"{name}."
        weights = {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}
        if not weights:
            raise FailedPrecondition(f"the checkpoint has no weights for {name}: was the job's spec changed?")
        if use_lora:
            result = set_peft_model_state_dict(unwrap(module), weights)
            if getattr(result, "unexpected_keys", None):
                raise FailedPrecondition(f"the checkpoint's {name} adapters do not match the job's LoRA rank")
        else:
            unwrap(module).load_state_dict(weights, strict=True)
