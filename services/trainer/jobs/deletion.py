"""Deleting jobs, datasets and models: refused while an unfinished job needs what would go.

What each delete removes now, and what it leaves to the store's garbage collector (services/gc):
- a job: a running one is cancelled and awaited first; then its record (the job stops
  existing) and everything under `jobs/{id}/` (events, previews, checkpoints). The model it
  published stays; so does its prior set until a collection finds no other job naming it.
- a dataset: its manifest (it stops existing), then its images.
- a model: its manifest (it stops existing). Its weight blobs stay until a collection finds no
  other model sharing them.
The checks and their delete hold the lock a job's creation holds, so a job cannot begin to use
a dataset or model while a delete removes it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from services.common.errors import FailedPrecondition
from services.common.model_store import ModelManifest, ModelStore
from services.trainer.dataset_layout import DatasetInfo, dataset_name
from services.trainer.jobs.datasets import DatasetStore
from services.trainer.jobs.events import EventLogs
from services.trainer.jobs.records import PREFIX, Job, JobRepository
from services.trainer.jobs.runner import JobRunner

log = logging.getLogger(__name__)

POLL_S = 0.05


class Deletions:
    def __init__(
        self,
        *,
        repo: JobRepository,
        events: EventLogs,
        runner: JobRunner,
        datasets: DatasetStore,
        models: ModelStore,
        lock: threading.Lock,
        wait_seconds: float,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.repo = repo
        self.events = events
        self.runner = runner
        self.datasets = datasets
        self.models = models
        self.lock = lock
        self.wait_seconds = wait_seconds
        self._clock = clock
        self._sleep = sleep

    def delete_job(self, job_id: str) -> Job:
        job = self.repo.get(job_id)
        if not job.state.is_final:
            self.runner.cancel(job_id)
            job = self._wait_until_final(job_id)
        with self.lock:
            job = self.repo.delete(job_id)
        self.events.forget(job_id)
        removed = self.repo.store.delete_prefix(f"{PREFIX}{job_id}/")
        log.info("job deleted", extra={"job_id": job_id, "objects": removed + 1})
        return job

    def _wait_until_final(self, job_id: str) -> Job:
        deadline = self._clock() + self.wait_seconds
        while True:
            job = self.repo.get(job_id)
            if job.state.is_final:
                return job
            if self._clock() >= deadline:
                raise FailedPrecondition(
                    f"{job.name} is still stopping ({job.state.value}) after its cancel; "
                    "delete it again once it is CANCELLED"
                )
            self._sleep(POLL_S)

    def delete_dataset(self, dataset_id: str) -> DatasetInfo:
        info = self.datasets.get(dataset_id)  # NotFound first
        with self.lock:
            users = [job.name for job in self._unfinished() if job.spec.dataset == dataset_id]
            if users:
                raise FailedPrecondition(
                    f"{dataset_name(dataset_id)} is used by unfinished training jobs {', '.join(users)}; "
                    "cancel them or wait for them to end"
                )
            self.datasets.delete(dataset_id)
        log.info("dataset deleted", extra={"dataset_id": dataset_id})
        return info

    def delete_model(self, model_id: str) -> ModelManifest:
        manifest = self.models.get(model_id)  # NotFound first
        with self.lock:
            users = [
                job.name for job in self._unfinished() if model_id in (job.spec.base_model, job.spec.model_id)
            ]
            if users:
                raise FailedPrecondition(
                    f"models/{model_id} is used by unfinished training jobs {', '.join(users)} "
                    "(as their base model or the model they publish); cancel them or wait for them to end"
                )
            dependents = [m.name for m in self.models.list() if m.kind == "lora" and m.base_model == model_id]
            if dependents:
                raise FailedPrecondition(
                    f"models/{model_id} is the base of LoRA models {', '.join(dependents)}; delete them first"
                )
            self.models.delete(model_id)
        log.info("model deleted", extra={"model_id": model_id})
        return manifest

    def _unfinished(self) -> list[Job]:
        return [job for job in self.repo.all() if not job.state.is_final]
