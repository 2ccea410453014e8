"""Deleting jobs, datasets and models: refused while an unfinished job needs what would go.

What each delete removes now, and what it leaves to the store's garbage collector (services/gc):
- a job: a running one is cancelled and awaited first; its training seconds go to the tenant's
  usage ledger (GetUsage keeps counting them); then its record (the job stops existing) and
  everything under `jobs/{id}/` (events, previews, checkpoints, training logs). The model it
  published stays; so does its prior set until a collection finds no other job naming it.
- a dataset: its manifest (it stops existing), then its images.
- a model: its manifest (it stops existing). Its weight blobs stay until a collection finds no
  other model (of any tenant) sharing them.

Every delete is made for a tenant and goes through that tenant's view of the store, exactly as
its reads and writes do: another tenant's job, dataset or model is NotFound, as a missing one.
A shared base model is visible to every tenant but deleted only by the installation's implicit
tenant (the operator's store root), and not while any tenant's job or LoRA model still needs it.
The checks and their delete hold the lock a job's creation holds, so a job cannot begin to use
a dataset or model while a delete removes it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable

from services.common.errors import FailedPrecondition, PermissionDenied
from services.common.model_store import ModelManifest, ModelStore
from services.common.namespaced_store import scoped_store
from services.common.object_store import ObjectStore
from services.common.usage import keep_deleted_job_usage
from services.trainer.dataset_layout import DatasetInfo, dataset_name
from services.trainer.job_spec import concepts
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
        store: ObjectStore,
        repo: JobRepository,
        events: EventLogs,
        runner: JobRunner,
        models: ModelStore,
        lock: threading.Lock,
        wait_seconds: float,
        tenants: Callable[[], Iterable[str]] = tuple,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.store = store  # the root: each delete scopes it to its tenant
        self.repo = repo
        self.events = events
        self.runner = runner
        self.models = models  # the root model store: for_tenant() gives a tenant's view
        self.lock = lock
        self.wait_seconds = wait_seconds
        self.tenants = tenants  # names from the keys file (whose LoRAs may stand on a shared base)
        self._clock = clock
        self._sleep = sleep

    def delete_job(self, job_id: str, tenant: str) -> Job:
        job = self.repo.get(job_id, tenant)  # NotFound first, for another tenant's job too
        if not job.state.is_final:
            self.runner.cancel(job_id)
            job = self._wait_until_final(job_id, tenant)
        keep_deleted_job_usage(self.store, tenant, job_id, job.training_step_seconds)
        with self.lock:
            job = self.repo.delete(job_id, tenant)
        self.events.forget(job_id)
        removed = scoped_store(self.store, tenant).delete_prefix(f"{PREFIX}{job_id}/")
        log.info("job deleted", extra={"job_id": job_id, "tenant": tenant, "objects": removed + 1})
        return job

    def _wait_until_final(self, job_id: str, tenant: str) -> Job:
        deadline = self._clock() + self.wait_seconds
        while True:
            job = self.repo.get(job_id, tenant)
            if job.state.is_final:
                return job
            if self._clock() >= deadline:
                raise FailedPrecondition(
                    f"{job.name} is still stopping ({job.state.value}) after its cancel; "
                    "delete it again once it is CANCELLED"
                )
            self._sleep(POLL_S)

    def delete_dataset(self, dataset_id: str, tenant: str) -> DatasetInfo:
        datasets = DatasetStore(self.store, tenant)
        info = datasets.get(dataset_id)  # NotFound first: ids are per tenant
        with self.lock:
            users = [
                job.name
                for job in self._unfinished(tenant)
                if any(concept.dataset == dataset_id for concept in concepts(job.spec))
            ]
            if users:
                raise FailedPrecondition(
                    f"{dataset_name(dataset_id)} is used by unfinished training jobs {', '.join(users)}; "
                    "cancel them or wait for them to end"
                )
            datasets.delete(dataset_id)
        log.info("dataset deleted", extra={"dataset_id": dataset_id, "tenant": tenant})
        return info

    def delete_model(self, model_id: str, tenant: str) -> ModelManifest:
        models = self.models.for_tenant(tenant)
        manifest = models.get(model_id)  # NotFound first: its own models and the shared bases
        if not models.owns(model_id):
            raise PermissionDenied(f"models/{model_id} is a shared base model; only the operator deletes it")
        shared_base = not tenant and manifest.kind == "base"  # other tenants may stand on it
        with self.lock:
            self._check_no_job_uses(model_id, tenant, shared_base)
            self._check_no_lora_uses(model_id, models, shared_base)
            models.delete(model_id)
        log.info("model deleted", extra={"model_id": model_id, "tenant": tenant})
        return manifest

    def _check_no_job_uses(self, model_id: str, tenant: str, shared_base: bool) -> None:
        own = [
            job.name
            for job in self._unfinished(tenant)
            if model_id in (job.spec.base_model, job.spec.model_id)
        ]
        others = 0
        if shared_base:
            others = sum(
                1
                for job in self._unfinished(None)
                if job.tenant != tenant and job.spec.base_model == model_id
            )
        if own or others:
            users = ", ".join(own + ([f"{others} of other tenants"] if others else []))
            raise FailedPrecondition(
                f"models/{model_id} is used by unfinished training jobs {users} "
                "(as their base model or the model they publish); cancel them or wait for them to end"
            )

    def _check_no_lora_uses(self, model_id: str, models: ModelStore, shared_base: bool) -> None:
        dependents = [m.name for m in models.own_models() if m.kind == "lora" and m.base_model == model_id]
        others = 0
        if shared_base:
            for name in self._tenant_names():
                others += sum(
                    1
                    for m in self.models.for_tenant(name).own_models()
                    if m.kind == "lora" and m.base_model == model_id
                )
        if dependents or others:
            names = ", ".join(sorted(dependents) + ([f"{others} of other tenants"] if others else []))
            raise FailedPrecondition(
                f"models/{model_id} is the base of LoRA models {names}; delete them first"
            )

    def _tenant_names(self) -> list[str]:
        named = {*self.tenants(), *(job.tenant for job in self.repo.all())}
        return sorted(name for name in named if name)

    def _unfinished(self, tenant: str | None) -> list[Job]:
        return [job for job in self.repo.all(tenant) if not job.state.is_final]
