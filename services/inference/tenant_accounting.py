"""Per-tenant accounting of Generate: concurrent streams (a quota) and images made (usage).

A stream counts from the moment its request passed validation to its end, however it ends; past
the tenant's `max_generate_streams` a new one is RESOURCE_EXHAUSTED at once, naming the quota.
Every final image sent adds to the tenant's Prometheus counter and to the usage ledger that
GetUsage reads (services/common/usage.py).
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

from services.common.tenancy import Tenant, quota_exceeded
from services.common.usage import IMAGES_GENERATED, TenantLabels, UsageLedger
from services.inference.metrics import InferenceMetrics


class TenantAccounting:
    def __init__(self, metrics: InferenceMetrics, ledger: UsageLedger | None = None) -> None:
        self._metrics = metrics
        self._ledger = ledger
        self._labels = TenantLabels()
        self._lock = threading.Lock()
        self._streams: dict[str, int] = defaultdict(int)

    @contextmanager
    def stream(self, tenant: Tenant) -> Iterator[None]:
        limit = tenant.quotas.max_generate_streams
        label = self._labels(tenant.label)
        with self._lock:
            running = self._streams[tenant.name]
            if limit and running >= limit:
                raise quota_exceeded(
                    tenant,
                    "max_generate_streams",
                    f"{running} Generate calls are running; wait for one to end",
                )
            self._streams[tenant.name] = running + 1
        self._metrics.tenant_generate_streams.labels(tenant=label).inc()
        try:
            yield
        finally:
            with self._lock:
                self._streams[tenant.name] -= 1
            self._metrics.tenant_generate_streams.labels(tenant=label).dec()

    def image_sent(self, tenant: Tenant) -> None:
        self._metrics.tenant_images_generated.labels(tenant=self._labels(tenant.label)).inc()
        if self._ledger is not None:
            self._ledger.add(tenant.name, IMAGES_GENERATED, 1)
