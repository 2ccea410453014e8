"""The inference service's own Prometheus metrics (`dreambooth_inference_*`).

Requests by method and code, stream duration and in-flight requests come from the server's
interceptor; these cover what happens inside a Generate. Labels are bounded: only the per-tenant
usage carries one, `tenant`, with at most services.common.usage.MAX_TENANT_LABELS values.
"""

from __future__ import annotations

import dataclasses

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services.common.metrics import REQUEST_DURATION_BUCKETS, MetricFactory

STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)
LOAD_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


@dataclasses.dataclass(frozen=True)
class CacheMetrics:
    hits: Counter
    misses: Counter
    loads: Counter
    evictions: Counter
    load_duration: Histogram
    models_loaded: Gauge
    bytes_loaded: Gauge


@dataclasses.dataclass(frozen=True)
class AdapterMetrics:
    hits: Counter
    misses: Counter
    loads: Counter
    evictions: Counter
    load_duration: Histogram
    adapters_loaded: Gauge
    bytes_loaded: Gauge


@dataclasses.dataclass(frozen=True)
class InferenceMetrics:
    queue_depth: Gauge
    batch_size: Histogram
    step_duration: Histogram
    images_generated: Counter
    time_to_first_image: Histogram
    cancelled: Counter
    cache: CacheMetrics
    tenant_images_generated: Counter
    tenant_generate_streams: Gauge
    adapters: AdapterMetrics

    @classmethod
    def create(cls, registry: CollectorRegistry, namespace: str = "dreambooth_inference") -> InferenceMetrics:
        factory = MetricFactory(registry, namespace)
        return cls(
            queue_depth=factory.gauge(
                "queue_depth", "Generate requests admitted and not yet sampling (waiting for a batch)."
            ),
            batch_size=factory.histogram(
                "batch_size_images", "Images denoised together in one batch run.", buckets=BATCH_BUCKETS
            ),
            step_duration=factory.histogram(
                "denoising_step_duration_seconds",
                "Duration of one denoising step of a whole batch (UNet call and scheduler steps).",
                buckets=STEP_BUCKETS,
            ),
            images_generated=factory.counter("images_generated", "Final images generated and sent."),
            time_to_first_image=factory.histogram(
                "time_to_first_image_seconds",
                "Seconds from the arrival of a Generate request to its first final image.",
                buckets=REQUEST_DURATION_BUCKETS,
            ),
            cancelled=factory.counter(
                "generate_cancelled", "Generate requests whose client went away before the end."
            ),
            cache=CacheMetrics(
                hits=factory.counter("model_cache_hits", "Requests whose model was already loaded."),
                misses=factory.counter("model_cache_misses", "Requests whose model was not loaded."),
                loads=factory.counter("model_loads", "Models loaded from the store (single-flight)."),
                evictions=factory.counter("model_cache_evictions", "Models evicted from the cache (LRU)."),
                load_duration=factory.histogram(
                    "model_load_duration_seconds",
                    "Seconds to materialise and load a model.",
                    buckets=LOAD_BUCKETS,
                ),
                models_loaded=factory.gauge("models_loaded", "Models held in the cache."),
                bytes_loaded=factory.gauge(
                    "model_cache_bytes", "Bytes of weights held by cached models (shared components once)."
                ),
            ),
            tenant_images_generated=factory.counter(
                "tenant_images_generated", "Final images generated and sent, by tenant (usage).", ("tenant",)
            ),
            tenant_generate_streams=factory.gauge(
                "tenant_generate_streams",
                "Generate calls in flight, by tenant (the streams quota).",
                ("tenant",),
            ),
            adapters=AdapterMetrics(
                hits=factory.counter("adapter_cache_hits", "LoRA requests whose adapter was already loaded."),
                misses=factory.counter("adapter_cache_misses", "LoRA requests whose adapter was not loaded."),
                loads=factory.counter(
                    "adapter_loads", "LoRA adapters loaded from the store (single-flight)."
                ),
                evictions=factory.counter(
                    "adapter_cache_evictions", "LoRA adapters evicted from the adapter cache (LRU)."
                ),
                load_duration=factory.histogram(
                    "adapter_load_duration_seconds",
                    "Seconds to fetch (sha256 verified) and read a LoRA adapter (its base already loaded).",
                    buckets=STEP_BUCKETS,
                ),
                adapters_loaded=factory.gauge("adapters_loaded", "LoRA adapters held in the adapter cache."),
                bytes_loaded=factory.gauge("adapter_cache_bytes", "Bytes of LoRA adapter weights held."),
            ),
        )
