"""Prometheus metrics of a service, created in the service's own registry.

Every GrpcServerApp owns a CollectorRegistry, so several services (or several test servers) can
live in one process without "Duplicated timeseries" errors. Names follow Prometheus conventions:
`dreambooth_{service}_{what}_{unit}`, labels bounded (method and status-code names, never prompts).
"""

from __future__ import annotations

import dataclasses

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Requests range from sub-millisecond lookups to minutes-long generation streams.
REQUEST_DURATION_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
)


def metric_namespace(service_name: str) -> str:
    """`dreambooth_{service}`; the service name is normalised to a valid metric-name part."""
    safe = "".join(ch if ch.isalnum() else "_" for ch in service_name.lower()).strip("_")
    if not safe:
        raise ValueError(f"service_name {service_name!r} has no usable characters")
    return f"dreambooth_{safe}"


class MetricFactory:
    """Creates metrics named `{namespace}_{name}` in one registry.

    Services use it for their own metrics (queue depth, cache hits, ...), e.g.
    `MetricFactory(app.registry, app.metrics_namespace).gauge("queue_depth", "Requests waiting.")`.
    """

    def __init__(self, registry: CollectorRegistry, namespace: str) -> None:
        self.registry = registry
        self.namespace = namespace

    def counter(self, name: str, documentation: str, labelnames: tuple[str, ...] = ()) -> Counter:
        return Counter(name, documentation, labelnames, namespace=self.namespace, registry=self.registry)

    def gauge(self, name: str, documentation: str, labelnames: tuple[str, ...] = ()) -> Gauge:
        return Gauge(name, documentation, labelnames, namespace=self.namespace, registry=self.registry)

    def histogram(
        self,
        name: str,
        documentation: str,
        labelnames: tuple[str, ...] = (),
        buckets: tuple[float, ...] = REQUEST_DURATION_BUCKETS,
    ) -> Histogram:
        return Histogram(
            name,
            documentation,
            labelnames,
            namespace=self.namespace,
            registry=self.registry,
            buckets=buckets,
        )


@dataclasses.dataclass(frozen=True)
class RequestMetrics:
    """The per-RPC metrics the server interceptor records."""

    requests_total: Counter  # labels: method, code
    request_duration_seconds: Histogram  # labels: method; streams timed over the whole stream
    in_flight_requests: Gauge  # labels: method

    @classmethod
    def create(cls, registry: CollectorRegistry, namespace: str) -> RequestMetrics:
        factory = MetricFactory(registry, namespace)
        return cls(
            requests_total=factory.counter(
                "requests_total", "gRPC requests finished, by method and status code.", ("method", "code")
            ),
            request_duration_seconds=factory.histogram(
                "request_duration_seconds",
                "gRPC request duration in seconds; a streaming RPC is timed until its stream ends.",
                ("method",),
            ),
            in_flight_requests=factory.gauge(
                "in_flight_requests", "gRPC requests being handled now.", ("method",)
            ),
        )

    def record(self, method: str, code: str, seconds: float) -> None:
        self.requests_total.labels(method=method, code=code).inc()
        self.request_duration_seconds.labels(method=method).observe(seconds)
