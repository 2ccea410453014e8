"""A prior-set request as plain Python, and its validation.

`PriorRequest` is what the servicer builds from the proto (nothing checked, 0 = default);
`validate_request` turns it into a `PriorSpec` with every default resolved, so "0" and the
explicit default give the same spec and therefore the same cache key. Errors name the proto field.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from services.common.errors import InvalidArgument
from services.common.model_store import parse_model_name
from services.priorgen.settings import PriorGenSettings

# The schedulers a prior set may use (the proto's Scheduler enum, by name).
PRIOR_SCHEDULERS = ("ddim", "euler", "euler_ancestral", "dpmpp_2m_karras", "pndm")
MIN_RESOLUTION = 8  # one latent pixel; the VAE downsamples by 8
MIN_GUIDANCE, MAX_GUIDANCE = 1.0, 30.0
SEED_MODULUS = 2**64  # torch seeds are uint64: seed + i wraps around


@dataclass(frozen=True)
class PriorRequest:
    base_model: str  # resource name, "models/{id}"
    class_prompt: str
    negative_prompt: str = ""
    num_images: int = 0
    resolution: int = 0  # 0 = default
    steps: int = 0  # 0 = default
    guidance_scale: float = 0.0  # 0 = default
    scheduler: str = ""  # "" = default; a name from PRIOR_SCHEDULERS
    seed: int = 0


@dataclass(frozen=True)
class PriorSpec:
    """A validated request, defaults resolved: everything that decides the images."""

    model_id: str
    class_prompt: str
    negative_prompt: str
    num_images: int
    resolution: int
    steps: int
    guidance_scale: float
    scheduler: str
    seed: int  # in [0, 2**64)

    def image_seed(self, index: int) -> int:
        """Image i of the set is sampled from seed + i, whatever batch or run makes it."""
        return (self.seed + index) % SEED_MODULUS

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def validate_request(request: PriorRequest, settings: PriorGenSettings) -> PriorSpec:
    """Check every field (cheap, no I/O) and resolve defaults. Raises InvalidArgument."""
    model_id = parse_model_name(request.base_model, "base_model")
    class_prompt = request.class_prompt.strip()
    if not class_prompt:
        raise InvalidArgument("class_prompt", "must not be empty")
    _check_length("class_prompt", class_prompt, settings.max_prompt_chars)
    negative_prompt = request.negative_prompt.strip()
    _check_length("negative_prompt", negative_prompt, settings.max_prompt_chars)

    if not 1 <= request.num_images <= settings.max_images:
        raise InvalidArgument("num_images", f"must be in 1..{settings.max_images}, got {request.num_images}")

    resolution = request.resolution or settings.default_resolution
    if not MIN_RESOLUTION <= resolution <= settings.max_resolution or resolution % 8:
        raise InvalidArgument(
            "resolution",
            f"must be a multiple of 8 in {MIN_RESOLUTION}..{settings.max_resolution}, got {resolution}",
        )

    steps = request.steps or settings.default_steps
    if not 1 <= steps <= settings.max_steps:
        raise InvalidArgument("steps", f"must be in 1..{settings.max_steps}, got {steps}")

    guidance = float(request.guidance_scale) or settings.default_guidance_scale
    if not math.isfinite(guidance) or not MIN_GUIDANCE <= guidance <= MAX_GUIDANCE:
        raise InvalidArgument(
            "guidance_scale", f"must be in {MIN_GUIDANCE:g}..{MAX_GUIDANCE:g} (0 = default), got {guidance}"
        )

    scheduler = request.scheduler or settings.default_scheduler
    if scheduler not in PRIOR_SCHEDULERS:
        raise InvalidArgument(
            "scheduler", f"unsupported scheduler {scheduler!r}; expected one of {', '.join(PRIOR_SCHEDULERS)}"
        )

    return PriorSpec(
        model_id=model_id,
        class_prompt=class_prompt,
        negative_prompt=negative_prompt,
        num_images=request.num_images,
        resolution=resolution,
        steps=steps,
        guidance_scale=guidance,
        scheduler=scheduler,
        seed=request.seed % SEED_MODULUS,
    )


def _check_length(field: str, value: str, limit: int) -> None:
    if len(value) > limit:
        raise InvalidArgument(field, f"must be at most {limit} characters, got {len(value)}")
