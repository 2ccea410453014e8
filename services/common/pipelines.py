"""Build and load Stable Diffusion pipelines the one way every service does.

`assemble_pipeline` puts loaded components together; `load_pipeline` loads a local diffusers
folder and assembles it the same way. Always: no safety checker (nor its feature extractor), no
progress bars. Loading: fp32 on CPU by default, safetensors only (never pickle), no network (the
folder is local, materialised by the model store). Schedulers: services/common/schedulers.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from dreambooth_client.vocabulary import DEFAULT_SCHEDULER

from services.common.errors import FailedPrecondition, NotFound
from services.common.schedulers import make_scheduler

if TYPE_CHECKING:
    import torch
    from diffusers import StableDiffusionPipeline
    from diffusers.schedulers.scheduling_utils import SchedulerMixin

# The services return raw samples; without requires_safety_checker=False diffusers warns on every build.
_NO_SAFETY_CHECKER: Mapping[str, Any] = MappingProxyType(
    {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
)


def disable_progress_bars() -> None:
    """Silence diffusers' and transformers' tqdm bars (they spam service logs)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def assemble_pipeline(
    *, vae: Any, text_encoder: Any, tokenizer: Any, unet: Any, scheduler: SchedulerMixin
) -> StableDiffusionPipeline:
    """A StableDiffusionPipeline over these modules (shared, not copied), quiet, unfiltered."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        **_NO_SAFETY_CHECKER,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_pipeline(
    folder: Path,
    scheduler: str = DEFAULT_SCHEDULER,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> StableDiffusionPipeline:
    """StableDiffusionPipeline from a local diffusers folder (safetensors only, offline)."""
    import torch
    from diffusers import StableDiffusionPipeline

    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        raise NotFound(str(folder), f"{folder} is not a diffusers model folder (no model_index.json)")
    disable_progress_bars()
    try:
        loaded = StableDiffusionPipeline.from_pretrained(
            str(folder),
            dtype=dtype or torch.float32,
            use_safetensors=True,  # refuse pickle weights even if a folder carries them
            local_files_only=True,
            **_NO_SAFETY_CHECKER,  # a safety checker the folder lists is not even loaded
        )
    except (OSError, ValueError) as err:  # missing safetensors, broken configs
        raise FailedPrecondition(f"cannot load the model in {folder}: {err}") from err
    pipe = assemble_pipeline(
        vae=loaded.vae,
        text_encoder=loaded.text_encoder,
        tokenizer=loaded.tokenizer,
        unet=loaded.unet,
        scheduler=make_scheduler(scheduler, loaded.scheduler.config),
    )
    return pipe.to(device)
