"""Load a diffusers Stable Diffusion folder the one way every service does.

fp32 on CPU by default, safetensors only (never pickle), no safety checker, no progress bars,
no network: the folder is local (materialised by the model store). Schedulers:
services/common/schedulers.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from dreambooth_client.vocabulary import DEFAULT_SCHEDULER

from services.common.errors import FailedPrecondition, NotFound
from services.common.schedulers import make_scheduler

if TYPE_CHECKING:
    import torch
    from diffusers import StableDiffusionPipeline


def disable_progress_bars() -> None:
    """Silence diffusers' and transformers' tqdm bars (they spam service logs)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


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
        pipe = StableDiffusionPipeline.from_pretrained(
            str(folder),
            dtype=dtype or torch.float32,
            use_safetensors=True,  # refuse pickle weights even if a folder carries them
            local_files_only=True,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    except (OSError, ValueError) as err:  # missing safetensors, broken configs
        raise FailedPrecondition(f"cannot load the model in {folder}: {err}") from err
    pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
