"""Prometheus metrics of the trainer, `dreambooth_trainer_*`, in the server app's registry.

Labels stay bounded: states are an enum; per-job gauges (loss, samples/s) carry the job id only
while the job runs (at most `max_concurrent_jobs` series) and are removed when it ends; per-tenant
usage carries at most MAX_TENANT_LABELS tenant names (then "other").
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from services.common.metrics import MetricFactory
from services.common.tenancy import IMPLICIT_LABEL
from services.common.usage import TenantLabels
from services.trainer.jobs.records import JobState

STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
LONG_BUCKETS = (0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 4 * 3600.0, 12 * 3600.0)


class _JobsByState(Collector):
    """Counts read from the job records at scrape time: always equal to what List would show."""

    def __init__(self, name: str, counts: Callable[[], dict[JobState, int]]) -> None:
        self._name = name
        self._counts = counts

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(self._name, "Training jobs by state.", labels=["state"])
        for state, count in sorted(self._counts().items(), key=lambda item: item[0].value):
            family.add_metric([state.value.lower()], count)
        yield family


class TrainerMetrics:
    def __init__(self, registry: CollectorRegistry, namespace: str = "dreambooth_trainer") -> None:
        factory = MetricFactory(registry, namespace)
        self._registry = registry
        self._jobs_name = f"{namespace}_jobs"
        self.step_duration_seconds = factory.histogram(
            "step_duration_seconds", "Wall time of one optimizer step (all workers).", buckets=STEP_BUCKETS
        )
        self.samples_per_second = factory.gauge(
            "samples_per_second",
            "Training throughput of a running job, examples/s over all workers.",
            ("job_id",),
        )
        self.loss = factory.gauge("loss", "Training loss of a running job at its latest step.", ("job_id",))
        self.checkpoint_duration_seconds = factory.histogram(
            "checkpoint_duration_seconds", "Time to save one checkpoint to the store.", buckets=LONG_BUCKETS
        )
        self.job_duration_seconds = factory.histogram(
            "job_duration_seconds",
            "Time from start to a final state, by final state.",
            ("state",),
            LONG_BUCKETS,
        )
        self.jobs_finished_total = factory.counter(
            "jobs_finished_total", "Jobs that reached a final state, by state.", ("state",)
        )
        self.prior_wait_seconds = factory.histogram(
            "prior_wait_seconds", "Time a job waited for its class-prior images.", buckets=LONG_BUCKETS
        )
        self.tenant_training_step_seconds = factory.counter(
            "tenant_training_step_seconds",
            "Worker-seconds spent in training steps, by tenant (usage).",
            ("tenant",),
        )
        self.tenant_stored_bytes = factory.gauge(
            "tenant_stored_bytes",
            "Bytes a tenant stores (datasets, priors, jobs, its models), as last measured.",
            ("tenant",),
        )
        self._tenant_labels = TenantLabels()
        self._collector: _JobsByState | None = None

    def watch_jobs(self, counts: Callable[[], dict[JobState, int]]) -> None:
        """Expose `{namespace}_jobs{state}` computed from `counts` at each scrape."""
        if self._collector is None:
            self._collector = _JobsByState(self._jobs_name, counts)
            self._registry.register(self._collector)

    def observe_progress(self, job_id: str, loss: float, samples_per_second: float) -> None:
        self.loss.labels(job_id=job_id).set(loss)
        self.samples_per_second.labels(job_id=job_id).set(samples_per_second)

    def tenant_usage(self, tenant_name: str, step_seconds: float) -> None:
        label = self._tenant_labels(tenant_name or IMPLICIT_LABEL)
        self.tenant_training_step_seconds.labels(tenant=label).inc(step_seconds)

    def tenant_stored(self, tenant_name: str, size: int) -> None:
        self.tenant_stored_bytes.labels(tenant=self._tenant_labels(tenant_name or IMPLICIT_LABEL)).set(size)

    def job_finished(self, job_id: str, state: JobState, seconds: float | None) -> None:
        label = state.value.lower()
        self.jobs_finished_total.labels(state=label).inc()
        if seconds is not None:
            self.job_duration_seconds.labels(state=label).observe(seconds)
        for gauge in (self.loss, self.samples_per_second):
            with contextlib.suppress(KeyError):
                gauge.remove(job_id)
