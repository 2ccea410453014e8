"""Run one DreamBooth training job on Ray Train and translate what happens into plain events.

`run_training` blocks (the service calls it in a thread of its own):

    1. Pre-flight: already published by this job? base model, dataset, priors, cluster capacity
    2. A JobChannel actor: progress from rank 0 to this process, cancel from this process to rank 0
    3. TorchTrainer(train_loop_per_worker).fit() with FailureConfig retries; a pump thread drains
       the channel into `on_event` and forwards a cancel
    4. Result: TrainingResult, TrainingCancelled, or TrainingFailed with a message a user can act on

Checkpoints live in the object store (services.trainer.checkpoints); workers resume from the
newest one by themselves, so a Ray retry and a restarted trainer process continue the same run.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from services.common.errors import AlreadyExists, DomainError, FailedPrecondition, NotFound
from services.common.model_store import ModelStore
from services.common.settings import StoreSettings
from services.common.store_factory import open_store
from services.trainer import checkpoints, data, ray_cluster
from services.trainer.job_spec import JobSpec
from services.trainer.training_events import (
    CheckpointEvent,
    PreviewEvent,
    ProgressEvent,
    PublishingEvent,
    TrainingCancelled,
    TrainingEvent,
    TrainingFailed,
    TrainingResult,
)

log = logging.getLogger(__name__)

POLL_SECONDS = 0.25  # how often the driver drains progress and forwards a cancel
DEFAULT_STORAGE = "dreambooth-ray-train"  # under the temp dir when no storage_path is given


class JobChannel:
    """Ray actor between the driver and rank 0. A plain (ordered, single-threaded) actor: rank 0's
    fire-and-forget pushes arrive in the order they were sent."""

    def __init__(self) -> None:
        self._messages: list[tuple[str, dict[str, Any]]] = []
        self._cancelled = False
        self._fault_taken = False

    def push(self, kind: str, payload: dict[str, Any]) -> None:
        self._messages.append((kind, payload))

    def push_many(self, messages: list[tuple[str, dict[str, Any]]]) -> None:
        self._messages.extend(messages)

    def take(self) -> list[tuple[str, dict[str, Any]]]:
        messages, self._messages = self._messages, []
        return messages

    def cancel(self) -> None:
        self._cancelled = True

    def cancelled(self) -> bool:
        return self._cancelled

    def take_fault(self) -> bool:
        """True exactly once per job run (test hook `fail_once_at_step`)."""
        taken, self._fault_taken = self._fault_taken, True
        return not taken


class _Pump:
    """Driver thread: channel messages -> on_event (in order), cancel.set() -> channel.cancel()."""

    def __init__(
        self, channel: Any, on_event: Callable[[TrainingEvent], None], cancel: threading.Event
    ) -> None:
        self.channel = channel
        self.on_event = on_event
        self.cancel = cancel
        self.starts: list[int] = []  # the step each worker-group start resumed from
        self.published_step: int | None = None  # set when rank 0 reports the model published
        self._last_step = 0
        self._stop = threading.Event()
        self._cancel_sent = False
        self._thread = threading.Thread(target=self._run, name="training-events", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def finish(self) -> None:
        """Stop the thread, then deliver whatever is still in the channel."""
        import ray

        self._stop.set()
        self._thread.join()
        try:
            self._deliver(ray.get(self.channel.take.remote()))
        except Exception:  # never hide how the run itself ended
            log.exception("cannot read the last training events")

    def _run(self) -> None:
        import ray

        while not self._stop.is_set():
            if self.cancel.is_set() and not self._cancel_sent:
                ray.get(self.channel.cancel.remote())
                self._cancel_sent = True
            try:
                self._deliver(ray.get(self.channel.take.remote()))
            except Exception:  # the channel is gone only when the run is over
                log.exception("cannot read training events")
                return
            self._stop.wait(POLL_SECONDS)

    def _deliver(self, messages: list[tuple[str, dict[str, Any]]]) -> None:
        for kind, payload in messages:
            event = self._to_event(kind, payload)
            if event is None:
                continue
            try:
                self.on_event(event)
            except Exception:  # a listener's bug must not stop the run
                log.exception("training event handler failed")

    def _to_event(self, kind: str, payload: dict[str, Any]) -> TrainingEvent | None:
        if kind == "started":
            self.starts.append(int(payload["step"]))
            return None
        if kind == "progress":
            # After a retry the steps since the last checkpoint run again: report only new ones.
            if payload["step"] <= self._last_step:
                return None
            self._last_step = payload["step"]
            return ProgressEvent(**payload)
        if kind == "preview":
            return PreviewEvent(**payload)
        if kind == "checkpoint":
            return CheckpointEvent(**payload)
        if kind == "publishing":
            return PublishingEvent(**payload)
        if kind == "published":
            self.published_step = int(payload["step"])
            return None
        log.warning("unknown training message %r", kind)
        return None


def run_training(
    job_id: str,
    spec: JobSpec,
    *,
    store_settings: StoreSettings,
    prior_prefix: str | None,
    on_event: Callable[[TrainingEvent], None],
    cancel: threading.Event,
    storage_path: str | None = None,
    max_failures: int = 1,
    fail_once_at_step: int | None = None,
    cpus_per_worker: int = 1,
) -> TrainingResult:
    """Train `spec` as job `job_id` on the connected Ray (connect_ray first) and publish
    `spec.model_id`. Resumes from the job's newest checkpoint in the store."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from services.trainer.train_loop import train_loop_per_worker

    if not ray.is_initialized():
        raise RuntimeError("connect_ray() must be called before run_training()")

    # 1. Pre-flight: fail fast, before any worker starts, with the field to fix.
    store = open_store(store_settings)
    models = ModelStore(store, Path(store_settings.cache_dir))
    done = _already_published(models, job_id, spec)
    if done is not None:
        return done
    _preflight(store, models, spec, prior_prefix, cpus_per_worker)
    resumed_from = checkpoints.newest_step(store, job_id) or 0
    if cancel.is_set():
        raise TrainingCancelled(f"job {job_id} was cancelled before training started")

    # 2-3. Channel, trainer, pump.
    channel = ray.remote(num_cpus=0)(JobChannel).remote()
    resources = {"CPU": cpus_per_worker, **({"GPU": 1} if spec.use_gpu else {})}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "job_id": job_id,
            "spec": spec.to_json(),
            "store_settings": store_settings,
            "prior_prefix": prior_prefix,
            "channel": channel,
            "fail_once_at_step": fail_once_at_step,
            "cpus_per_worker": cpus_per_worker,
        },
        scaling_config=ScalingConfig(
            num_workers=spec.num_workers, use_gpu=spec.use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            # Unique per attempt: the store, not Ray's run folder, decides where training resumes.
            name=f"{job_id}-{uuid.uuid4().hex[:8]}",
            storage_path=storage_path or _default_storage(),
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=checkpoints.KEEP_NEWEST),
        ),
    )
    pump = _Pump(channel, on_event, cancel)
    pump.start()
    log.info("training job %s on %d worker(s), resuming from step %d", job_id, spec.num_workers, resumed_from)
    try:
        trainer.fit()
    except Exception as err:
        if cancel.is_set():
            raise TrainingCancelled(f"job {job_id} was cancelled") from err
        raise TrainingFailed(describe_failure(err)) from err
    finally:
        try:
            pump.finish()
        finally:
            ray.kill(channel)

    # 4. Result.
    # Ray's Result holds the last checkpoint's metrics; the channel says how the run ended.
    if pump.published_step is None:
        if cancel.is_set():
            raise TrainingCancelled(f"job {job_id} was cancelled")
        raise TrainingFailed(f"training of job {job_id} ended without publishing a model")
    # The model is published: its checkpoints (the largest objects of a job) are dead weight now.
    checkpoints.delete_all(store, job_id)
    return TrainingResult(
        model_id=spec.model_id,
        final_step=pump.published_step,
        resumed_from_step=resumed_from,
        restarts=max(0, len(pump.starts) - 1),
    )


def _already_published(models: ModelStore, job_id: str, spec: JobSpec) -> TrainingResult | None:
    """A trainer killed after publishing: the model is there, nothing to redo."""
    if not spec.model_id:
        raise FailedPrecondition("model_id: the job's model id was not resolved")
    if not models.exists(spec.model_id):
        return None
    if models.get(spec.model_id).training_job != job_id:
        raise AlreadyExists(f"model_id: model {spec.model_id!r} already exists; choose another model_id")
    return TrainingResult(
        model_id=spec.model_id, final_step=spec.max_train_steps, resumed_from_step=spec.max_train_steps
    )


def _preflight(store: Any, models: ModelStore, spec: JobSpec, prior_prefix: str | None, cpus: int) -> None:
    import ray

    if not models.exists(spec.base_model):
        raise NotFound("base_model", f"base_model: model {spec.base_model!r} not found")
    data.dataset_image_keys(store, spec.dataset)  # NotFound naming the dataset
    if spec.with_prior_preservation:
        if not prior_prefix:
            raise FailedPrecondition("with_prior_preservation is on but no class-prior images were generated")
        data.prior_image_keys(store, prior_prefix)
    if ray_cluster.is_local():
        # A local Ray cannot grow: asking for more than it has would wait forever.
        available = ray.cluster_resources()
        needs = {"CPU": cpus * spec.num_workers, "GPU": spec.num_workers if spec.use_gpu else 0}
        for resource, needed in needs.items():
            if needed > available.get(resource, 0):
                raise FailedPrecondition(
                    f"num_workers: {spec.num_workers} worker(s) need {needed:g} {resource}(s) but this "
                    f"trainer's local Ray has {available.get(resource, 0):g}; lower num_workers"
                    + (" or turn off use_gpu" if resource == "GPU" else "")
                )


def _default_storage() -> str:
    import tempfile

    return str(Path(tempfile.gettempdir()) / DEFAULT_STORAGE)


def describe_failure(err: BaseException) -> str:
    """A one-paragraph reason from Ray's error: the workers' own exceptions, not Ray's wrapping."""
    failures = getattr(err, "worker_failures", None)
    if failures:
        rank, cause = sorted(failures.items())[0]
        cause = _root_cause(cause)
        return (
            _advice(cause) or f"training failed on worker {rank}: {type(cause).__name__}: {_last_line(cause)}"
        )
    controller = getattr(err, "controller_failure", None)
    if controller is not None:
        return f"training failed in Ray Train's controller: {_last_line(_root_cause(controller))}"
    return f"training failed: {type(err).__name__}: {_last_line(err)}"


def _root_cause(err: BaseException) -> BaseException:
    seen = set()
    while id(err) not in seen:
        seen.add(id(err))
        inner = getattr(err, "cause", None) or err.__cause__
        if inner is None:
            break
        err = inner
    return err


def _advice(err: BaseException) -> str | None:
    text = str(err)
    if isinstance(err, DomainError):
        return text
    if "out of memory" in text.lower():
        return (
            "the GPU ran out of memory: lower train_batch_size or resolution, or turn on "
            "gradient_checkpointing, mixed_precision or use_lora"
        )
    return None


def _last_line(err: BaseException) -> str:
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__
