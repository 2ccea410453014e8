"""A LoRA model of the tiny Stable Diffusion, built deterministically from a seed.

What the trainer publishes for a LoRA job (diffusers' `save_lora_weights`, see
services/trainer/worker/publish.py), without training: adapters on the UNet's attention
projections and, by default, the text encoder's, A as peft initialises it and B drawn from
`seed` (peft starts B at zero, and such an adapter would change nothing). Tests and CPU
benchmarks use it to have many distinct LoRA models of one base in seconds.
"""

from __future__ import annotations

from pathlib import Path

LORA_WEIGHTS_FILE = "pytorch_lora_weights.safetensors"
# The layers the trainer adapts (services/trainer/worker/models.py).
UNET_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def build_tiny_lora(
    base_dir: Path, out: Path, seed: int, *, text_encoder: bool = True, rank: int = 4
) -> Path:
    """Write a LoRA folder for the diffusers model at `base_dir` into `out`; returns `out`."""
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from transformers import CLIPTextModel

    from services.common.pipelines import disable_progress_bars

    disable_progress_bars()
    torch.manual_seed(seed)  # peft draws A from the global generator
    modules = {"unet": UNet2DConditionModel.from_pretrained(str(base_dir / "unet"))}
    modules["unet"].add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=UNET_TARGETS))
    if text_encoder:
        modules["text_encoder"] = CLIPTextModel.from_pretrained(str(base_dir / "text_encoder"))
        modules["text_encoder"].add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=TEXT_TARGETS))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in modules.values():
            for name, parameter in module.named_parameters():
                if "lora_B" in name:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    layers = {
        f"{name}_lora_layers": convert_state_dict_to_diffusers(get_peft_model_state_dict(module))
        for name, module in modules.items()
    }
    StableDiffusionPipeline.save_lora_weights(
        out, weight_name=LORA_WEIGHTS_FILE, safe_serialization=True, **layers
    )
    return out
