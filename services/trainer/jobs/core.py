"""The trainer's core behind TrainerService, free of gRPC: datasets, jobs, cancel, watch and
deletes (of jobs, datasets and models: the trainer knows which jobs still need them).

The servicer translates protobuf to the plain objects here and back; everything that touches
the store is blocking, so the servicer calls it from a worker thread.

Every call is made for a tenant (the implicit one of a server without keys by default): it sees,
creates and changes only that tenant's datasets and jobs, trains from its own models and the
shared bases, and is held to its quotas. Another tenant's job is NotFound exactly as a missing one.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass
from pathlib import Path

from services.common.model_store import ModelManifest, ModelStore, parse_model_name
from services.common.namespaced_store import scoped_store
from services.common.object_store import ObjectStore
from services.common.tenancy import IMPLICIT_TENANT, Quotas, Tenant, quota_exceeded
from services.common.usage import IMAGES_GENERATED, TRAINING_STEP_SECONDS, ledger_total, stored_bytes
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
from services.trainer.jobs.training_logs import LogsPart, log_parts
from services.trainer.jobs.upload_gate import UploadGate
from services.trainer.jobs.validation import GpuCounter, SpecRequest, StoreModelCatalog, validate_spec
from services.trainer.settings import SpecLimits, UploadLimits

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Usage:
    """What GetUsage reports: one tenant's consumption and limits."""

    tenant: str  # its label ("default" for the implicit tenant)
    training_step_seconds: float
    images_generated: int
    stored_bytes: int
    active_training_jobs: int
    quotas: Quotas


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
        tenants: Callable[[], Iterable[str]] = tuple,
    ) -> None:
        self.store = store
        self.models = models
        self.datasets = DatasetStore(store)  # the implicit tenant's
        self.tenants = tenants  # names from the keys file: whose job records to load at start
        # Quota checks and creation, one at a time; deletes hold it too, so a job never starts
        # using what a delete removes.
        self._create_lock = threading.Lock()
        self.spec_limits = spec_limits
        self.upload_limits = upload_limits
        self.uploads = UploadGate(upload_limits)
        self.metrics = metrics
        self.gpu_count = gpu_count
        self.events = EventLogs(store, persist_seconds=persist_seconds, clock=clock)
        self.repo = JobRepository(store, clock=clock, on_change=self._on_change)
        self.runner = JobRunner(
            repo=self.repo,
            events=self.events,
            priors=priors,
            train=train,
            models=models.for_tenant,
            settings=runner_settings,
            metrics=metrics,
            clock=clock,
        )
        if metrics is not None:
            metrics.watch_jobs(self.repo.count_by_state)
        self.deletions = Deletions(
            store=store,
            repo=self.repo,
            events=self.events,
            runner=self.runner,
            models=models,
            lock=self._create_lock,
            wait_seconds=delete_wait_seconds,
            tenants=tenants,
        )

    # Life cycle

    def start(self) -> list[Job]:
        """Load the records, start the job slots and resume unfinished jobs; returns those."""
        jobs = self.repo.load(tuple(sorted(set(self.tenants()))))
        self.runner.start()
        recovered = self.runner.recover(jobs)
        log.info("trainer ready", extra={"jobs": len(jobs), "recovered": len(recovered)})
        return recovered

    def shutdown(self, timeout: float | None = None) -> None:
        self.runner.shutdown(timeout)
        self.uploads.shutdown()

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

    def finish_upload(self, upload: ImageUpload, tenant: Tenant = IMPLICIT_TENANT) -> DatasetInfo:
        def within_quota(new_bytes: int) -> None:
            limit = tenant.quotas.max_stored_bytes
            if limit and self.stored_bytes(tenant) + new_bytes > limit:
                raise quota_exceeded(tenant, "max_stored_bytes", f"this upload needs {new_bytes} more bytes")

        return upload.finish(DatasetStore(self.store, tenant.name), before_write=within_quota)

    # Jobs

    def create_job(self, request: SpecRequest, request_id: str = "", tenant: Tenant = IMPLICIT_TENANT) -> Job:
        """Validates the whole spec, then queues a job. Idempotent by request_id (per tenant)."""
        validate_request_id(request_id)
        request_fingerprint = fingerprint(dataclasses.asdict(request))
        existing = self.repo.find_by_request(request_id, request_fingerprint, tenant.name)
        if existing is not None:
            return existing
        with self._create_lock:  # deletes hold it too: nothing validated here goes before creation
            spec = validate_spec(
                request,
                limits=self.spec_limits,
                models=StoreModelCatalog(self.models.for_tenant(tenant.name)),
                datasets=DatasetStore(self.store, tenant.name),
                gpu_count=self.gpu_count,
            )
            existing = self.repo.find_by_request(request_id, request_fingerprint, tenant.name)
            if existing is not None:
                return existing
            self._check_job_quotas(tenant)
            job, created = self.repo.create(
                spec, request_id=request_id, request_fingerprint=request_fingerprint, tenant=tenant.name
            )
        if created:
            self.runner.submit(job.job_id)
        return job

    def _check_job_quotas(self, tenant: Tenant) -> None:
        quotas = tenant.quotas
        if quotas.max_concurrent_jobs:
            active = self._active_jobs(tenant)
            if active >= quotas.max_concurrent_jobs:
                raise quota_exceeded(
                    tenant, "max_concurrent_jobs", f"{active} jobs are queued or running; wait for one to end"
                )
        if quotas.max_stored_bytes:
            used = self.stored_bytes(tenant)
            if used >= quotas.max_stored_bytes:
                raise quota_exceeded(tenant, "max_stored_bytes", f"{used} bytes stored; delete some first")

    def _active_jobs(self, tenant: Tenant) -> int:
        return sum(1 for job in self.repo.all(tenant.name) if not job.state.is_final)

    def get_job(self, name: str, tenant: Tenant = IMPLICIT_TENANT) -> Job:
        return self.repo.get(parse_job_name(name), tenant.name)

    def list_jobs(
        self,
        *,
        page_size: int = 0,
        page_token: str = "",
        state: JobState | None = None,
        tenant: Tenant = IMPLICIT_TENANT,
    ) -> Page:
        return self.repo.list(page_size=page_size, page_token=page_token, state=state, tenant=tenant.name)

    def cancel_job(self, name: str, tenant: Tenant = IMPLICIT_TENANT) -> Job:
        return self.runner.cancel(self.get_job(name, tenant).job_id)

    def event_log(self, name: str, tenant: Tenant = IMPLICIT_TENANT) -> JobEventLog:
        return self.events.get(self.get_job(name, tenant))

    def training_logs(self, name: str, tenant: Tenant = IMPLICIT_TENANT) -> Generator[LogsPart, None, None]:
        """The job's TensorBoard files as stream parts (see training_logs.py); NotFound at once."""
        job = self.get_job(name, tenant)
        return log_parts(scoped_store(self.store, job.tenant), job)

    # Deletes (see deletion.py)

    def delete_job(self, name: str, tenant: Tenant = IMPLICIT_TENANT) -> Job:
        """Cancel (and await) a running job, then delete it and what it stored but its model."""
        return self.deletions.delete_job(parse_job_name(name), tenant.name)

    def delete_dataset(self, name: str, tenant: Tenant = IMPLICIT_TENANT) -> DatasetInfo:
        return self.deletions.delete_dataset(parse_dataset_name(name, "name"), tenant.name)

    def delete_model(self, name: str, tenant: Tenant = IMPLICIT_TENANT) -> ModelManifest:
        return self.deletions.delete_model(parse_model_name(name, "name"), tenant.name)

    # Usage

    def stored_bytes(self, tenant: Tenant) -> int:
        size = stored_bytes(self.store, tenant.name, Path(self.models.cache_dir))
        if self.metrics is not None:
            self.metrics.tenant_stored(tenant.name, size)
        return size

    def usage(self, tenant: Tenant = IMPLICIT_TENANT) -> Usage:
        jobs = self.repo.all(tenant.name)
        return Usage(
            tenant=tenant.label,
            training_step_seconds=sum(job.training_step_seconds for job in jobs)
            + ledger_total(self.store, tenant.name, TRAINING_STEP_SECONDS),  # of deleted jobs
            images_generated=int(ledger_total(self.store, tenant.name, IMAGES_GENERATED)),
            stored_bytes=self.stored_bytes(tenant),
            active_training_jobs=sum(1 for job in jobs if not job.state.is_final),
            quotas=tenant.quotas,
        )
