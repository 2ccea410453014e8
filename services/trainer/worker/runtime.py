"""What a worker is told (WorkerJob) and how the loop talks to its surroundings (Runtime).

`Runtime` is the loop's only view of the rest of the run: the driver (events out, cancel in),
the other workers (collectives) and Ray Train (model preparation, reports). The base class is
the single-process runtime (unit tests); `RayRuntime` is the one used inside Ray Train.
"""

from __future__ import annotations

import json
import logging
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from services.common.settings import StoreSettings
from services.trainer.job_spec import JobSpec
from services.trainer.settings import TrackingSettings
from services.trainer.training_events import ProgressEvent, TrainingEvent

log = logging.getLogger(__name__)

# Rank 0 talks to the driver at most this often (the driver drains every 0.25 s anyway): a remote
# call per step would cost a few % of a small model's step time on a busy CPU.
TALK_INTERVAL_S = 0.25

# Called by every rank after each optimizer step with (step done, runtime). Production passes
# none; tests install one to inject faults, measure, or stop a run at a chosen point.
StepCallback = Callable[[int, "Runtime"], None]


@dataclass(frozen=True)
class WorkerJob:
    """Everything a worker needs, passed in (never read from globals)."""

    job_id: str
    spec: JobSpec
    store_settings: StoreSettings
    prior_prefix: str | None = None
    step_callbacks: tuple[StepCallback, ...] = ()
    tracking: TrackingSettings = field(default_factory=TrackingSettings)
    additional_prior_prefixes: tuple[str, ...] = ()  # the prior set of each additional concept

    @property
    def prior_prefixes(self) -> tuple[str, ...]:
        """Every subject's prior set, in the order of `job_spec.concepts` (empty without priors)."""
        return (self.prior_prefix, *self.additional_prior_prefixes) if self.prior_prefix else ()


class Runtime:
    """The single-process runtime: events are kept in `events`, reports in `reports`."""

    def __init__(self, device: torch.device | None = None, rank: int = 0, world_size: int = 1) -> None:
        self.device = device or torch.device("cpu")
        self.rank = rank
        self.world_size = world_size
        self.events: list[TrainingEvent] = []
        self.reports: list[dict[str, Any]] = []
        self.cancelled = threading.Event()  # set from any thread to stop the run
        self._closers: list[Callable[[BaseException | None], None]] = []

    @property
    def is_chief(self) -> bool:
        return self.rank == 0

    def send(self, event: TrainingEvent) -> None:
        """Rank 0's events for the driver; other ranks' are dropped (they would repeat them)."""
        if self.is_chief:
            self.events.append(event)

    def flush(self) -> None:
        """Deliver events held back so far (called when the run ends, however it ends)."""

    def on_close(self, closer: Callable[[BaseException | None], None]) -> None:
        """Have `closer` called when the run ends, with the error that ended it (None: it returned)."""
        self._closers.append(closer)

    def close(self, error: BaseException | None = None) -> None:
        """The run ended (however it ended): the closers, newest first, then the held-back events.
        A closer that fails is logged; the others still run."""
        while self._closers:
            closer = self._closers.pop()
            try:
                closer(error)
            except Exception:
                log.exception("a closer of the training run failed")
        self.flush()

    def poll_cancel(self) -> bool:
        """Rank 0's look at the cancel flag; must never block a step."""
        return self.cancelled.is_set()

    def cancel_requested(self) -> bool:
        """Rank 0's blocking look at the cancel flag (between setup phases)."""
        return self.poll_cancel()

    def prepare_model(self, module: torch.nn.Module) -> torch.nn.Module:
        return module.to(self.device)

    def report(self, metrics: dict[str, Any], pointer: dict[str, Any] | None) -> None:
        self.reports.append({**metrics, "pointer": pointer})

    # Collectives: every rank calls them at the same points.

    def agree(self, flag: bool) -> bool:
        """Rank 0's flag, on every rank: ranks must leave together or a collective hangs."""
        if self.world_size == 1:
            return flag
        import torch.distributed as dist

        value = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.broadcast(value, src=0)
        return bool(value.item() > 0)

    def reduce_step(self, loss: torch.Tensor, cancel: bool) -> tuple[float, bool]:
        """Mean loss over workers and rank 0's cancel decision, in one collective."""
        if self.world_size == 1:
            return float(loss.item()), cancel
        import torch.distributed as dist

        stats = torch.stack([loss.float(), torch.tensor(1.0 if cancel else 0.0, device=loss.device)])
        dist.all_reduce(stats)
        return float(stats[0].item()) / self.world_size, bool(stats[1].item() > 0)


class RayRuntime(Runtime):
    """Inside a Ray Train worker: the driver's JobChannel actor and ray.train's API."""

    def __init__(self, channel: Any) -> None:
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        super().__init__(ray.train.torch.get_device(), context.get_world_rank(), context.get_world_size())
        self.channel = channel
        self._outbox: list[TrainingEvent] = []
        self._last_flush = 0.0
        self._pending_cancel: Any = None
        self._last_cancel_poll = 0.0

    def send(self, event: TrainingEvent) -> None:
        """Progress is batched (at most one call per TALK_INTERVAL_S); anything else goes at once,
        after the progress before it."""
        if not self.is_chief:
            return
        self._outbox.append(event)
        if not isinstance(event, ProgressEvent) or time.monotonic() - self._last_flush >= TALK_INTERVAL_S:
            self.flush()

    def flush(self) -> None:
        if self._outbox:  # fire and forget; a plain actor runs one caller's calls in order
            self.channel.push_many.remote(self._outbox)
            self._outbox = []
        self._last_flush = time.monotonic()

    def poll_cancel(self) -> bool:
        import ray

        if not self.is_chief:
            return False
        if self._pending_cancel is None:  # one request in flight; its answer is read later
            if time.monotonic() - self._last_cancel_poll >= TALK_INTERVAL_S:
                self._pending_cancel = self.channel.cancelled.remote()
                self._last_cancel_poll = time.monotonic()
            return False
        ready, _ = ray.wait([self._pending_cancel], timeout=0)
        if not ready:
            return False
        pending, self._pending_cancel = self._pending_cancel, None
        return self._read_cancel(pending)

    def cancel_requested(self) -> bool:
        return self._read_cancel(self.channel.cancelled.remote()) if self.is_chief else False

    @staticmethod
    def _read_cancel(ref: Any) -> bool:
        """The driver's cancel flag. A channel that is gone means the driver died (its actors
        die with it): stop as for a cancel, so no worker trains or writes for nobody."""
        import ray

        try:
            return bool(ray.get(ref))
        except Exception:  # RayActorError, OwnerDiedError, ...: the driver is gone
            return True

    def prepare_model(self, module: torch.nn.Module) -> torch.nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(module)  # to the device; DDP when world_size > 1

    def report(self, metrics: dict[str, Any], pointer: dict[str, Any] | None) -> None:
        """Every rank reports at the same points (Ray synchronises on it). Rank 0's checkpoint is
        a pointer to the store folder, so Ray's record and the store agree."""
        import ray.train

        if pointer is None:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory(prefix="dreambooth-pointer-") as tmp:
            (Path(tmp) / "pointer.json").write_text(json.dumps(pointer))
            ray.train.report(
                metrics,
                checkpoint=ray.train.Checkpoint.from_directory(tmp),
                checkpoint_dir_name=f"step-{pointer['step']:08d}",
                delete_local_checkpoint_after_upload=False,
            )
