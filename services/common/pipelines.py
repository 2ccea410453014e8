"""Load a diffusers Stable Diffusion folder the one way every service does, and pick schedulers.

fp32 on CPU by default, safetensors only (never pickle), no safety checker, no progress bars,
no network: the folder is local (materialised by the model store).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from services.common.errors import FailedPrecondition, InvalidArgument, NotFound

if TYPE_CHECKING:
    import torch
    from diffusers import StableDiffusionPipeline
    from diffusers.schedulers.scheduling_utils import SchedulerMixin

SCHEDULER_NAMES = ("ddim", "euler", "euler_ancestral", "dpmpp_2m_karras", "pndm", "ddpm")


def make_scheduler(name: str, base_config: Mapping[str, Any], field: str = "scheduler") -> SchedulerMixin:
    """A scheduler of kind `name` with the noise schedule of `base_config` (the model's own)."""
    import diffusers

    classes: dict[str, tuple[type, dict[str, Any]]] = {
        "ddim": (diffusers.DDIMScheduler, {}),
        "euler": (diffusers.EulerDiscreteScheduler, {}),
        "euler_ancestral": (diffusers.EulerAncestralDiscreteScheduler, {}),
        "dpmpp_2m_karras": (
            diffusers.DPMSolverMultistepScheduler,
            {"use_karras_sigmas": True, "algorithm_type": "dpmsolver++", "solver_order": 2},
        ),
        "pndm": (diffusers.PNDMScheduler, {"skip_prk_steps": True}),
        "ddpm": (diffusers.DDPMScheduler, {}),
    }
    if name not in classes:
        raise InvalidArgument(
            field, f"unknown scheduler {name!r}; expected one of {', '.join(SCHEDULER_NAMES)}"
        )
    cls, overrides = classes[name]
    return cls.from_config(dict(base_config), **overrides)


def disable_progress_bars() -> None:
    """Silence diffusers' and transformers' tqdm bars (they spam service logs)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def load_pipeline(
    folder: Path,
    scheduler: str = "ddim",
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
