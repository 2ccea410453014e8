"""The trainer's core behind TrainerService, free of gRPC: datasets, jobs, cancel, watch and
deletes (of jobs, datasets and models: the trainer knows which jobs still need them).

The servicer translates protobuf to the plain objects here and back; everything that touches
the store is blocking, so the servicer calls it from a worker thread.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable

from services.common.model_store import ModelManifest, ModelStore, parse_model_name
from services.common.object_store import ObjectStore
from services.trainer.dataset_layout import DatasetInfo, parse_dataset_name
from services.trainer.jobs.datasets import DatasetStore, ImageUpload
from services.trainer.jobs.deletion import Deletions
from services.trainer.jobs.events import EventLogs, JobEventLog
from services.trainer.jobs.metrics import TrainerMetrics
from services.trainer.jobs.records import (
    Job,
    JobRepository,
    JobState,
    Page,
    fingerprint,
    parse_job_name,
    validate_request_id,
)
from services.trainer.jobs.runner import JobRunner, PriorsProvider, RunnerSettings, TrainFn
from services.trainer.jobs.validation import GpuCounter, SpecRequest, StoreModelCatalog, validate_spec
from services.trainer.settings import SpecLimits, UploadLimits

log = logging.getLogger(__name__)


class TrainerCore:
    def __init__(
        self,
        *,
        store: ObjectStore,
        models: ModelStore,
        priors: PriorsProvider,
        train: TrainFn,
        runner_settings: RunnerSettings,
        spec_limits: SpecLimits,
        upload_limits: UploadLimits,
        metrics: TrainerMetrics | None = None,
        gpu_count: GpuCounter | None = None,
        persist_seconds: float = 5.0,
        delete_wait_seconds: float = 60.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.datasets = DatasetStore(store)
        self.catalog = StoreModelCatalog(models)
        self.spec_limits = spec_limits
        self.upload_limits = upload_limits
        self.metrics = metrics
        self.gpu_count = gpu_count
        self.events = EventLogs(store, persist_seconds=persist_seconds, clock=clock)
        self.repo = JobRepository(store, clock=clock, on_change=self._on_change)
        self.runner = JobRunner(
            repo=self.repo,
            events=self.events,
            priors=priors,
            train=train,
            models=models,
            settings=runner_settings,
            metrics=metrics,
            clock=clock,
        )
        if metrics is not None:
            metrics.watch_jobs(self.repo.count_by_state)
        # Held by a job's creation and by deletes: a job never starts using what a delete removes.
        self._references_lock = threading.Lock()
        self.deletions = Deletions(
            repo=self.repo,
            events=self.events,
            runner=self.runner,
            datasets=self.datasets,
            models=models,
            lock=self._references_lock,
            wait_seconds=delete_wait_seconds,
        )

    # Life cycle

    def start(self) -> list[Job]:
        """Load the records, start the job slots and resume unfinished jobs; returns those."""
        jobs = self.repo.load()
        self.runner.start()
        recovered = self.runner.recover(jobs)
        log.info("trainer ready", extra={"jobs": len(jobs), "recovered": len(recovered)})
        return recovered

    def shutdown(self, timeout: float | None = None) -> None:
        self.runner.shutdown(timeout)

    def _on_change(self, old_state: JobState | None, job: Job) -> None:
        self.events.state_changed(job)
        if job.state.is_final and self.metrics is not None:
            started = job.start_time or job.create_time
            self.metrics.job_finished(job.job_id, job.state, (job.end_time or started) - started)
        log.info(
            "job state",
            extra={
                "job_id": job.job_id,
                "from": old_state.value if old_state else None,
                "to": job.state.value,
            },
        )

    # Datasets

    def new_upload(self) -> ImageUpload:
        return ImageUpload(self.upload_limits)

    def finish_upload(self, upload: ImageUpload) -> DatasetInfo:
        return upload.finish(self.datasets)

    # Jobs

    def create_job(self, request: SpecRequest, request_id: str = "") -> Job:
        """Validates the whole spec, then queues a job. Idempotent by request_id."""
        validate_request_id(request_id)
        request_fingerprint = fingerprint(dataclasses.asdict(request))
        existing = self.repo.find_by_request(request_id, request_fingerprint)
        if existing is not None:
            return existing
        with self._references_lock:
            spec = validate_spec(
                request,
                limits=self.spec_limits,
                models=self.catalog,
                datasets=self.datasets,
                gpu_count=self.gpu_count,
            )
            job, created = self.repo.create(
                spec, request_id=request_id, request_fingerprint=request_fingerprint
            )
        if created:
            self.runner.submit(job.job_id)
        return job

    def get_job(self, name: str) -> Job:
        return self.repo.get(parse_job_name(name))

    def list_jobs(self, *, page_size: int = 0, page_token: str = "", state: JobState | None = None) -> Page:
        return self.repo.list(page_size=page_size, page_token=page_token, state=state)

    def cancel_job(self, name: str) -> Job:
        return self.runner.cancel(parse_job_name(name))

    def event_log(self, name: str) -> JobEventLog:
        return self.events.get(self.get_job(name))

    # Deletes

    def delete_job(self, name: str) -> Job:
        """Cancel (and await) a running job, then delete it and what it stored but its model."""
        return self.deletions.delete_job(parse_job_name(name))

    def delete_dataset(self, name: str) -> DatasetInfo:
        return self.deletions.delete_dataset(parse_dataset_name(name, "name"))

    def delete_model(self, name: str) -> ModelManifest:
        return self.deletions.delete_model(parse_model_name(name, "name"))
