"""Python SDK and CLI for the DreamBooth service.

`DreamBoothClient` (sync) and `AsyncDreamBoothClient` (asyncio) talk to the trainer and the
inference service; results are the `dreambooth.v1` messages (TrainingJob, Dataset, Model), images
come back as `GeneratedImage(data, seed)`. Failures raise `DreamBoothError` subclasses.
"""

from dreambooth_client.aio import AsyncDreamBoothClient
from dreambooth_client.client import DreamBoothClient
from dreambooth_client.errors import (
    AlreadyExistsError,
    CancelledError,
    DataLossError,
    DeadlineExceededError,
    DreamBoothError,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    JobFailedError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
)
from dreambooth_client.messages import GeneratedImage, is_terminal, state_label
from dreambooth_client.retry import RetryPolicy
from dreambooth_client.training_spec import Concept

__all__ = [
    "AlreadyExistsError",
    "AsyncDreamBoothClient",
    "CancelledError",
    "Concept",
    "DataLossError",
    "DeadlineExceededError",
    "DreamBoothClient",
    "DreamBoothError",
    "FailedPreconditionError",
    "GeneratedImage",
    "InternalError",
    "InvalidArgumentError",
    "JobFailedError",
    "NotFoundError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "RetryPolicy",
    "UnauthenticatedError",
    "UnavailableError",
    "is_terminal",
    "state_label",
]
