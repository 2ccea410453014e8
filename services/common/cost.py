"""What a request costs, in one unit for every service, so one request cannot hold a worker for
hours and a queue is bounded by the work in it, not by how many requests it holds.

The unit is the megapixel-step: one UNet pass over one megapixel of image for one denoising (or
training) step. Classifier-free guidance doubles it (two rows per image); a training step counts
three (forward and backward) per example, and prior preservation doubles the examples. The
ceilings are settings of each service: what a megapixel-step takes depends on the machine (on 2
CPU cores a 1024x1024 step took 75 s; on a GPU it is well under a second).
"""

from __future__ import annotations

from services.common.errors import InvalidArgument

TRAINING_PASSES = 3.0  # forward + backward of a training step, in forward passes


def sampling_cost(width: int, height: int, steps: int, images: int, guidance_scale: float) -> float:
    rows = 2 if guidance_scale > 1.0 else 1
    return width * height / 1e6 * steps * images * rows


def training_cost(
    resolution: int, steps: int, examples_per_step: int, *, text_encoder: bool = False
) -> float:
    passes = TRAINING_PASSES * (1.1 if text_encoder else 1.0)  # the text encoder is small beside the UNet
    return resolution * resolution / 1e6 * steps * examples_per_step * passes


def check_cost(cost: float, ceiling: float, field: str, advice: str) -> float:
    """`cost`, or InvalidArgument naming the limit and the request's cost."""
    if cost > ceiling:
        raise InvalidArgument(
            field,
            f"this request costs {cost:,.1f} megapixel-steps; the limit per request is {ceiling:,g} "
            f"({advice})",
        )
    return cost
