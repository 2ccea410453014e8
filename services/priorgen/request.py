"""A prior-set request as plain Python, and its validation.

`PriorRequest` is what the servicer builds from the proto (nothing checked, 0 = default);
`validate_request` turns it into a `PriorSpec` with every default resolved, so "0" and the
explicit default give the same spec and therefore the same cache key. Errors name the proto field.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from dreambooth_client import vocabulary

from services.common.cost import check_cost, sampling_cost
from services.common.errors import InvalidArgument
from services.common.model_store import parse_model_name
from services.common.request_checks import check_guidance, check_scheduler, check_seed
from services.priorgen.settings import PriorGenSettings

MIN_RESOLUTION = 8  # one latent pixel; the VAE downsamples by 8


@dataclass(frozen=True)
class PriorRequest:
    base_model: str  # resource name, "models/{id}"
    class_prompt: str
    negative_prompt: str = ""
    num_images: int = 0
    resolution: int = 0  # 0 = default
    steps: int = 0  # 0 = default
    guidance_scale: float = 0.0  # 0 = default
    scheduler: str = vocabulary.DEFAULT_SCHEDULER  # a vocabulary name
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
    seed: int  # in the vocabulary's range, 0..2**32-1

    def image_seed(self, index: int) -> int:
        """Image i of the set is sampled from this seed, whatever batch or run makes it."""
        return vocabulary.image_seed(self.seed, index)

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

    guidance = check_guidance(float(request.guidance_scale) or settings.default_guidance_scale)
    cost = sampling_cost(resolution, resolution, steps, request.num_images, guidance)
    check_cost(cost, settings.max_request_cost, "request", "ask for fewer images, steps or pixels")
    return PriorSpec(
        model_id=model_id,
        class_prompt=class_prompt,
        negative_prompt=negative_prompt,
        num_images=request.num_images,
        resolution=resolution,
        steps=steps,
        guidance_scale=guidance,
        scheduler=check_scheduler(request.scheduler),
        seed=check_seed(request.seed),
    )


def _check_length(field: str, value: str, limit: int) -> None:
    if len(value) > limit:
        raise InvalidArgument(field, f"must be at most {limit} characters, got {len(value)}")
