"""The sampling schedulers the services run: one diffusers class per vocabulary name.

Names come from the proto's Scheduler enum (dreambooth_client.vocabulary); adding a scheduler is
one enum value in common.proto plus one entry here (tests/unit/test_vocabulary.py fails until
both exist). Every scheduler keeps the model's own noise schedule (its scheduler config).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from dreambooth_client.vocabulary import SCHEDULER_NAMES

from services.common.errors import InvalidArgument

if TYPE_CHECKING:
    from diffusers.schedulers.scheduling_utils import SchedulerMixin

# name -> (diffusers class name, config overrides); class names so that importing this needs no torch.
SCHEDULER_CLASSES: Mapping[str, tuple[str, Mapping[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m_karras": (
        "DPMSolverMultistepScheduler",
        {"use_karras_sigmas": True, "algorithm_type": "dpmsolver++", "solver_order": 2},
    ),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
}


def make_scheduler(name: str, base_config: Mapping[str, Any], field: str = "scheduler") -> SchedulerMixin:
    """A scheduler of kind `name` with the noise schedule of `base_config` (the model's own)."""
    import diffusers

    if name not in SCHEDULER_CLASSES:
        raise InvalidArgument(
            field, f"unknown scheduler {name!r}; expected one of {', '.join(SCHEDULER_NAMES)}"
        )
    class_name, overrides = SCHEDULER_CLASSES[name]
    return getattr(diffusers, class_name).from_config(dict(base_config), **overrides)
