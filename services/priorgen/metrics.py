"""The service's own Prometheus metrics, `dreambooth_priorgen_*` (request metrics come from the
server's interceptor). Labels are bounded: no prompts, no keys."""

from __future__ import annotations

import dataclasses

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services.common.metrics import MetricFactory

NAMESPACE = "dreambooth_priorgen"
# A batch takes ~0.1 s (tiny model, CPU) to minutes (SD on a slow GPU); a set up to hours.
BATCH_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
SET_BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0)


@dataclasses.dataclass(frozen=True)
class PriorGenMetrics:
    images_generated_total: Counter
    cache_hits_total: Counter  # requests answered by a complete set in the store
    single_flight_joins_total: Counter  # requests that joined a set another request was making
    sets_generated_total: Counter  # sets completed by this process (fresh or resumed)
    set_generation_duration_seconds: Histogram  # from the first missing image to the manifest
    batch_duration_seconds: Histogram
    sets_in_progress: Gauge

    @classmethod
    def create(cls, registry: CollectorRegistry | None = None, namespace: str = NAMESPACE) -> PriorGenMetrics:
        factory = MetricFactory(registry or CollectorRegistry(), namespace)
        return cls(
            images_generated_total=factory.counter("images_generated_total", "Prior images generated."),
            cache_hits_total=factory.counter(
                "cache_hits_total", "Requests answered from a complete prior set in the store."
            ),
            single_flight_joins_total=factory.counter(
                "single_flight_joins_total", "Requests that joined an identical set already being made."
            ),
            sets_generated_total=factory.counter("sets_generated_total", "Prior sets completed."),
            set_generation_duration_seconds=factory.histogram(
                "set_generation_duration_seconds",
                "Time to generate the missing images of a set and publish its manifest.",
                buckets=SET_BUCKETS,
            ),
            batch_duration_seconds=factory.histogram(
                "batch_duration_seconds",
                "Time to render and store one batch of images.",
                buckets=BATCH_BUCKETS,
            ),
            sets_in_progress=factory.gauge("sets_in_progress", "Prior sets being generated now."),
        )
