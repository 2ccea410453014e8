"""Plain-Python shapes of a generation request and of the events its stream carries.

The servicer turns protobuf into these and back; the core and the sampler know nothing else.
"""

from __future__ import annotations

import dataclasses

from dreambooth_client import vocabulary


@dataclasses.dataclass(frozen=True)
class GenerateParams:
    """One Generate request. Zero means "the default" for the numeric fields, as on the wire."""

    model_id: str
    prompt: str
    negative_prompt: str = ""
    num_images: int = 0  # 0 = 1
    width: int = 0  # 0 = the model's default
    height: int = 0  # 0 = the model's default
    steps: int = 0  # 0 = 30
    guidance_scale: float = 0.0  # 0 = 7.5; 1 = no classifier-free guidance
    scheduler: str = vocabulary.DEFAULT_SCHEDULER
    seed: int | None = None  # None = random (returned with each image); image i: vocabulary.image_seed
    preview_interval: int = 0  # 0 = no previews
    output_format: str = vocabulary.DEFAULT_IMAGE_FORMAT
    truncate_prompt: bool = False
    adapter_scale: float | None = None  # LoRA models only, 0..2; None = 1 (on a LoRA model)

    @property
    def uses_guidance(self) -> bool:
        """Classifier-free guidance needs the unconditional pass only when the scale is not 1."""
        return self.guidance_scale != 1.0


@dataclasses.dataclass(frozen=True)
class EncodedImage:
    data: bytes
    format: str  # a vocabulary image format name
    width: int
    height: int


@dataclasses.dataclass(frozen=True)
class Progress:
    """Denoising step `step` (1-based) of `total_steps` finished."""

    step: int
    total_steps: int


@dataclasses.dataclass(frozen=True)
class Preview:
    """A low-cost JPEG decoded from the latents' current estimate of the final image."""

    step: int
    index: int
    image: EncodedImage


@dataclasses.dataclass(frozen=True)
class FinalImage:
    index: int
    image: EncodedImage
    seed: int  # reproduces exactly this image (as image 0 of a request): image_seed(seed, index)


GenerateEvent = Progress | Preview | FinalImage
