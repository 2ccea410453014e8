"""Run one DreamBooth training job on Ray Train and translate what happens into plain events.

`run_training` blocks (the service calls it in a thread of its own):

    1. Pre-flight: already published by this job? base model, dataset, priors, cluster capacity
    2. A JobChannel actor: progress from rank 0 to this process, cancel from this process to rank 0
    3. TorchTrainer(train_loop_per_worker).fit() with FailureConfig retries; a pump thread drains
       the channel into `on_event` and forwards a cancel
    4. Result: TrainingResult, TrainingCancelled, or TrainingFailed with a message a user can act on

Checkpoints live in the object store (services.trainer.worker.checkpoints); workers resume from the
newest one by themselves, so a Ray retry and a restarted trainer process continue the same run.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from services.common.errors import FailedPrecondition, NotFound
from services.common.model_store import ModelStore
from services.common.settings import StoreSettings
from services.common.store_factory import open_store
from services.trainer.driver import cluster as ray_cluster
from services.trainer.driver.channel import JobChannel, Pump
from services.trainer.driver.failures import describe_failure
from services.trainer.job_spec import JobSpec, concepts
from services.trainer.settings import TrackingSettings
from services.trainer.training_events import (
    TrainingCancelled,
    TrainingEvent,
    TrainingFailed,
    TrainingResult,
)
from services.trainer.worker import checkpoints, data
from services.trainer.worker.runtime import StepCallback

log = logging.getLogger(__name__)

DEFAULT_STORAGE = "dreambooth-ray-train"  # under the temp dir when no storage_path is given


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
    cpus_per_worker: int = 1,
    step_callbacks: Sequence[StepCallback] = (),
    tracking: TrackingSettings | None = None,
    additional_prior_prefixes: tuple[str, ...] = (),
) -> TrainingResult:
    """Train `spec` as job `job_id` on the connected Ray (connect_ray first) and publish
    `spec.model_id`. Resumes from the job's newest checkpoint in the store. `step_callbacks` run
    in every worker after each step (tests inject faults with them; see worker.runtime). Rank 0
    writes the job's TensorBoard logs to the store, and to MLflow when `tracking` names a server.
    `additional_prior_prefixes`: the prior set of each of the spec's additional concepts."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from services.trainer.worker.loop import train_loop_per_worker

    if not ray.is_initialized():
        raise RuntimeError("connect_ray() must be called before run_training()")

    # 1. Pre-flight: fail fast, before any worker starts, with the field to fix.
    store = open_store(store_settings)
    models = ModelStore(store, Path(store_settings.cache_dir))
    done = _already_published(models, job_id, spec)
    if done is not None:
        return done
    prior_prefixes = (prior_prefix, *additional_prior_prefixes) if prior_prefix else ()
    _preflight(store, models, spec, prior_prefixes, cpus_per_worker)
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
            "additional_prior_prefixes": list(additional_prior_prefixes),
            "channel": channel,
            "step_callbacks": list(step_callbacks),
            "cpus_per_worker": cpus_per_worker,
            "tracking": tracking or TrackingSettings(),
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
    pump = Pump(channel, on_event, cancel)
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
    if not models.published_by(spec.model_id, job_id):
        return None
    return TrainingResult(
        model_id=spec.model_id, final_step=spec.max_train_steps, resumed_from_step=spec.max_train_steps
    )


def _preflight(
    store: Any, models: ModelStore, spec: JobSpec, prior_prefixes: tuple[str, ...], cpus: int
) -> None:
    import ray

    if not models.exists(spec.base_model):
        raise NotFound("base_model", f"base_model: model {spec.base_model!r} not found")
    subjects = concepts(spec)
    for concept in subjects:
        data.dataset_image_keys(store, concept.dataset)  # NotFound naming the dataset
    if spec.with_prior_preservation:
        if len(prior_prefixes) != len(subjects):
            raise FailedPrecondition(
                "with_prior_preservation is on but not every subject's class-prior images were generated"
            )
        for prefix in set(prior_prefixes):
            data.prior_image_keys(store, prefix)
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
