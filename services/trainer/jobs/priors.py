"""What a job needs from class-prior generation, free of gRPC: the api room's PriorsClient
implements it; unit tests use a stand-in."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from services.trainer.job_spec import JobSpec


class PriorsCancelled(Exception):
    """The job was cancelled while its priors were being generated."""


@dataclass(frozen=True)
class PriorSetInfo:
    prefix: str
    count: int
    cached: bool


class PriorsProvider(Protocol):
    def generate(
        self,
        spec: JobSpec,
        *,
        tenant: str,
        on_progress: Callable[[int, int], None],
        cancel: threading.Event,
    ) -> PriorSetInfo:
        """The job's class images, made for (and stored in the prefix of) the job's `tenant`."""
