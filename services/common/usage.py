"""Per-tenant usage: bounded metric labels, a durable counter ledger, and bytes stored.

Prometheus gets counters labelled by tenant (at most MAX_TENANT_LABELS names, then "other", so a
keys file with many tenants cannot blow up the series count). GetUsage needs numbers that survive
restarts and add up over replicas, so counters the trainer does not hold in its job records
(images generated, counted by every inference replica) go to a ledger in the store:

    {tenant prefix}usage/{service}/{replica}.json     {"counters": {"images_generated": 12}, ...}

Each process writes only its own object (a fresh replica id per process start), so replicas never
overwrite each other; readers add them up. Objects accumulate one per process lifetime per tenant
(a few hundred bytes each).

Deleting a training job must not erase what it consumed: before its record goes, the trainer
writes the job's training seconds to a ledger object of its own (`usage/deleted-jobs/{id}.json`,
`keep_deleted_job_usage`), which GetUsage adds to the seconds of the jobs that still exist. The
store's garbage collector never touches `usage/`.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import re
import socket
import threading
import uuid
from collections import defaultdict
from pathlib import Path

from services.common.errors import DataCorruption, NotFound
from services.common.model_store import ModelStore
from services.common.namespaced_store import scoped_store
from services.common.object_store import ObjectStore

log = logging.getLogger(__name__)

MAX_TENANT_LABELS = 100
OTHER_TENANTS = "other"
USAGE_PREFIX = "usage/"
IMAGES_GENERATED = "images_generated"  # the inference replicas' ledger counter
TRAINING_STEP_SECONDS = "training_step_seconds"  # of deleted jobs (existing ones hold their own)
OWN_PREFIXES = ("datasets/", "jobs/", "priors/")  # with models/: what a tenant stores


class TenantLabels:
    """Tenant names as metric label values: the first `limit` as they are, then "other"."""

    def __init__(self, limit: int = MAX_TENANT_LABELS) -> None:
        self._limit = limit
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, label: str) -> str:
        with self._lock:
            if label in self._seen:
                return label
            if len(self._seen) < self._limit:
                self._seen.add(label)
                return label
        return OTHER_TENANTS


def stored_bytes(root: ObjectStore, tenant_name: str, cache_dir: Path) -> int:
    """Bytes a tenant stores: its datasets, class priors, job records, checkpoints and previews,
    plus the files of its own models (a fine-tune counts whole, shared bytes with its base too)."""
    store = scoped_store(root, tenant_name)
    total = sum(info.size for prefix in OWN_PREFIXES for info in store.list(prefix))
    for manifest in ModelStore(store, cache_dir).own_models():
        total += manifest.size_bytes
    return total


def replica_id() -> str:
    host = re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname())[:40] or "host"
    return f"{host}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


class UsageLedger:
    """This process's counters per tenant, flushed to the store every `flush_seconds`."""

    def __init__(self, root: ObjectStore, service: str, *, flush_seconds: float = 10.0) -> None:
        self._root = root
        self._service = service
        self._replica = replica_id()
        self._flush_seconds = flush_seconds
        self._lock = threading.Lock()
        self._counts: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self._dirty: set[str] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, tenant_name: str, counter: str, amount: float) -> None:
        with self._lock:
            self._counts[tenant_name][counter] += amount
            self._dirty.add(tenant_name)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"{self._service}-usage", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.flush()

    def _run(self) -> None:
        while not self._stop.wait(self._flush_seconds):
            self.flush()

    def flush(self) -> None:
        with self._lock:
            dirty, self._dirty = self._dirty, set()
            snapshot = {tenant: dict(self._counts[tenant]) for tenant in dirty}
        for tenant, counters in snapshot.items():
            record = {
                "service": self._service,
                "replica": self._replica,
                "counters": counters,
                "update_time": dt.datetime.now(dt.timezone.utc).isoformat(),
            }
            try:
                scoped_store(self._root, tenant).put_json(self._key(), record)
            except Exception as err:  # the store is down: keep counting, write next time
                with self._lock:
                    self._dirty.add(tenant)
                log.warning("cannot write usage", extra={"service": self._service, "error": str(err)})

    def _key(self) -> str:
        return f"{USAGE_PREFIX}{self._service}/{self._replica}.json"


def keep_deleted_job_usage(
    root: ObjectStore, tenant_name: str, job_id: str, training_step_seconds: float
) -> None:
    """Keep a deleted job's training seconds in the tenant's ledger (idempotent: one object per job)."""
    record = {
        "service": "trainer",
        "job_id": job_id,
        "counters": {TRAINING_STEP_SECONDS: training_step_seconds},
        "update_time": dt.datetime.now(dt.timezone.utc).isoformat(),
    }
    scoped_store(root, tenant_name).put_json(f"{USAGE_PREFIX}deleted-jobs/{job_id}.json", record)


def ledger_total(root: ObjectStore, tenant_name: str, counter: str) -> float:
    """A counter summed over every replica's ledger object in the tenant's prefix."""
    store = scoped_store(root, tenant_name)
    total = 0.0
    for info in store.list(USAGE_PREFIX):
        try:
            total += float(store.get_json(info.key).get("counters", {}).get(counter, 0.0))
        except (NotFound, DataCorruption, ValueError, AttributeError, TypeError):
            continue  # deleted meanwhile, or not a ledger object
    return total
