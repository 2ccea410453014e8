"""What a training run tells its caller: events while it runs, then a result or an exception.

Kept free of torch and Ray so the trainer's serving process can dispatch on these types
without importing the training stack (services.trainer.ray_runner produces them).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ProgressEvent:
    step: int
    total_steps: int
    loss: float  # mean over workers
    learning_rate: float  # the UNet's, as used by this step
    samples_per_second: float  # examples (instance + class) per second over all workers
    time: float = 0.0  # when rank 0 finished the step (Unix seconds, the worker's clock)


@dataclass(frozen=True)
class PreviewEvent:
    step: int
    prompt: str
    jpeg: bytes


@dataclass(frozen=True)
class PublishingEvent:
    step: int  # rank 0 began publishing


@dataclass(frozen=True)
class CheckpointEvent:
    step: int  # a complete checkpoint of this step is in the store
    duration_seconds: float


TrainingEvent = ProgressEvent | PreviewEvent | PublishingEvent | CheckpointEvent


@dataclass(frozen=True)
class TrainingResult:
    model_id: str
    final_step: int
    resumed_from_step: int  # newest checkpoint when this call began (0: from scratch)
    restarts: int = 0  # worker-group restarts Ray made after failures (FailureConfig)


class TrainingCancelled(Exception):
    """The run stopped because `cancel` was set."""


class TrainingFailed(Exception):
    """The run failed; `str()` says why in words a user can act on."""
