"""Settings of the prior-generation service, from `DREAMBOOTH_PRIORGEN_*` (store: `DREAMBOOTH_S3_*`)."""

from __future__ import annotations

import dataclasses

from dreambooth_client import vocabulary

from services.common.settings import AuthSettings, ServerSettings, StoreSettings, from_env

ENV_PREFIX = "DREAMBOOTH_PRIORGEN_"


@dataclasses.dataclass(frozen=True)
class PriorGenSettings:
    server: ServerSettings = dataclasses.field(
        default_factory=lambda: ServerSettings(port=50052, metrics_port=9182)
    )
    store: StoreSettings = dataclasses.field(default_factory=StoreSettings)
    auth: AuthSettings = dataclasses.field(default_factory=AuthSettings)
    # Every pipeline call carries exactly `compute_width` image slots (fixed tensor shapes, so
    # float results never depend on how images are grouped); `batch_size` of them hold images,
    # the rest are padding. The width is part of a set's key; the batch size is not.
    batch_size: int = 4
    compute_width: int = 4
    device: str = "cpu"  # torch device of the pipeline ("cuda" on a GPU node)
    max_loaded_models: int = 2  # pipelines kept in memory, least recently used evicted
    max_concurrent_sets: int = 4  # distinct sets generated at once; more wait their turn
    default_resolution: int = 512  # used when a request says 0
    default_steps: int = 30
    # Guidance bounds are the vocabulary's; SCHEDULER_UNSPECIFIED is its default (DDIM), no setting.
    default_guidance_scale: float = vocabulary.DEFAULT_GUIDANCE
    max_images: int = 1000
    # One set's cost in megapixel-steps (services.common.cost): 1000 images of 512x512 at 30 steps
    # with guidance. A 1000-image set at 1024x1024 and 150 steps (20x that) is refused.
    max_request_cost: float = 16_000.0
    max_resolution: int = 1024
    max_steps: int = 150
    max_prompt_chars: int = 1000

    def __post_init__(self) -> None:
        for name in ("batch_size", "compute_width", "max_loaded_models", "max_concurrent_sets"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size > self.compute_width:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be <= compute_width ({self.compute_width}): "
                "raise both to batch more images per pipeline call"
            )
        if not vocabulary.is_valid_guidance(self.default_guidance_scale):
            bounds = f"{vocabulary.MIN_GUIDANCE:g}..{vocabulary.MAX_GUIDANCE:g}"
            raise ValueError(f"default_guidance_scale must be in {bounds}, got {self.default_guidance_scale}")


def load_settings() -> PriorGenSettings:
    return from_env(PriorGenSettings, ENV_PREFIX)
