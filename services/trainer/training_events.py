"""What a training run tells its caller: events while it runs, then a result or an exception.

Rank 0 of the Ray workers sends these dataclasses themselves (through the driver's channel
actor); the driver and the job runner dispatch on their types. Kept free of torch and Ray so the
trainer's serving process can import them without the training stack.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StartedEvent:
    step: int  # the worker group (re)started from this step: 0, or a checkpoint's
    world_size: int


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
class PublishedEvent:
    step: int  # rank 0 wrote the model's manifest: the model exists
    model_id: str


@dataclass(frozen=True)
class CheckpointEvent:
    step: int  # a complete checkpoint of this step is in the store
    duration_seconds: float


TrainingEvent = (
    StartedEvent | ProgressEvent | PreviewEvent | PublishingEvent | PublishedEvent | CheckpointEvent
)


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
