"""The mark half of the store's garbage collector: what the store's records reference.

Read from the records themselves, never from a service's memory, so any process may collect:
- model manifests (`models/{id}/manifest.json`) name the blobs every model is made of;
- dataset manifests make a dataset's images live;
- job records (`jobs/{id}/job.json`) keep their events and previews, their checkpoints while the
  job is unfinished, and the prior set they name; an unfinished job that will generate class
  priors but names no set yet may be about to name any of them, so it keeps every prior set;
- live pins (services/common/store_pins.py) keep what unfinished writes are writing.
A record that cannot be read stops the collection: what it references is unknown.

Tenants: the store holds one namespace per tenant (`tenants/{name}/`, services/common/tenancy.py)
beside the root's (the implicit tenant's objects and the shared base models). Each namespace's
records and pins reference keys of that namespace only, in its own terms (`jobs/{id}/` of tenant
acme is `tenants/acme/jobs/{id}/`); blobs are one pool, live when any namespace's manifest or
pin names them. `StoreReferences` holds every namespace's references and their union of blobs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from services.common.errors import DataCorruption, NotFound
from services.common.model_store import ModelManifest
from services.common.namespaced_store import scoped_store
from services.common.object_store import ObjectStore
from services.common.store_pins import PinInfo
from services.common.tenancy import TENANT_NAME, TENANTS_ROOT, namespace_of
from services.trainer.jobs.records import Job

RECORD_NAMES = {"models": "manifest.json", "datasets": "manifest.json", "jobs": "job.json"}


@dataclass(frozen=True)
class JobRef:
    final: bool
    prior_prefixes: tuple[str, ...]  # every subject's prior set (one, or one per concept)


@dataclass(frozen=True)
class References:
    blobs: frozenset[str]  # digests named by a manifest or a live pin
    models: frozenset[str]  # ids with a manifest
    datasets: frozenset[str]  # ids with a manifest
    jobs: Mapping[str, JobRef]  # id -> what its record says
    prior_prefixes: frozenset[str]  # "priors/{key}/" named by a job
    keep_all_priors: bool  # an unfinished job may be about to name a prior set
    pinned_prefixes: tuple[str, ...]

    def pinned(self, key: str) -> bool:
        return key.startswith(self.pinned_prefixes)


@dataclass(frozen=True)
class StoreReferences:
    """What every namespace of the store references, read after every namespace's pins."""

    namespaces: Mapping[str, References]  # "" (the root) or "tenants/{name}/" -> its references
    blobs: frozenset[str]  # digests named by any namespace's manifest or live pin
    everything_pinned: bool  # an unreadable pin: nothing may be swept, blobs included

    def locate(self, key: str) -> tuple[References, str] | None:
        """The references of the namespace `key` is in, and the key as that namespace sees it;
        None for a key in no namespace this collection read."""
        namespace, relative = split_namespace(key)
        refs = self.namespaces.get(namespace)
        return None if refs is None else (refs, relative)


def tenant_of(key: str) -> str | None:
    """The tenant whose prefix `key` is under ("" for the root), or None for a key under
    `tenants/` that is not in a well-named tenant's prefix."""
    if not key.startswith(TENANTS_ROOT):
        return ""
    parts = key.split("/", 2)
    return parts[1] if len(parts) == 3 and TENANT_NAME.match(parts[1]) else None


def split_namespace(key: str) -> tuple[str, str]:
    """(namespace, key within it); a key under `tenants/` outside any tenant's prefix stays the
    root's (a layout the collector does not know, so it never touches it)."""
    tenant = tenant_of(key)
    if not tenant:
        return "", key
    namespace = namespace_of(tenant)
    return namespace, key.removeprefix(namespace)


def tenants_in(keys: Iterable[str]) -> list[str]:
    """The tenants with objects among `keys` (a listing of the whole store), root excluded."""
    return sorted({tenant for key in keys if (tenant := tenant_of(key))})


def read_store_references(root: ObjectStore, pins: Mapping[str, list[PinInfo]]) -> StoreReferences:
    """Every namespace's references, read now (after every namespace's pins: see store_pins.py).
    `pins` maps each tenant name ("" for the root) to its namespace's live pins."""
    namespaces = {
        namespace_of(tenant): read_references(scoped_store(root, tenant), tenant_pins)
        for tenant, tenant_pins in pins.items()
    }
    everything_pinned = any("" in pin.prefixes for tenant_pins in pins.values() for pin in tenant_pins)
    return StoreReferences(
        namespaces=namespaces,
        blobs=frozenset().union(*(refs.blobs for refs in namespaces.values())),
        everything_pinned=everything_pinned,
    )


def is_record(key: str) -> bool:
    """Records are deleted only by the Delete RPCs, never collected."""
    parts = key.split("/")
    return len(parts) == 3 and RECORD_NAMES.get(parts[0]) == parts[2]


def read_references(store: ObjectStore, pins: list[PinInfo]) -> References:
    """Everything live, read now (call it after reading the pins: see store_pins.py)."""
    blobs: set[str] = set().union(*(pin.blobs for pin in pins))
    models: set[str] = set()
    for record in _records(store, "models"):
        manifest = _read_manifest(store, record)
        if manifest is not None:
            models.add(manifest.model_id)
            blobs.update(entry.sha256 for entry in manifest.files.values())
    datasets = {key.split("/")[1] for key in _records(store, "datasets")}
    jobs: dict[str, JobRef] = {}
    keep_all_priors = False
    for record in _records(store, "jobs"):
        job = _read_job(store, record)
        if job is None:
            continue
        prefixes = tuple(p for p in (job.prior_prefix, *job.additional_prior_prefixes) if p)
        jobs[job.job_id] = JobRef(job.state.is_final, prefixes)
        if not job.state.is_final and job.spec.with_prior_preservation and not job.prior_prefix:
            keep_all_priors = True
    return References(
        blobs=frozenset(blobs),
        models=frozenset(models),
        datasets=frozenset(datasets),
        jobs=jobs,
        prior_prefixes=frozenset(prefix for ref in jobs.values() for prefix in ref.prior_prefixes),
        keep_all_priors=keep_all_priors,
        pinned_prefixes=tuple(prefix for pin in pins for prefix in pin.prefixes),
    )


def _records(store: ObjectStore, top: str) -> list[str]:
    return [info.key for info in store.list(f"{top}/") if is_record(info.key)]


def _read_manifest(store: ObjectStore, key: str) -> ModelManifest | None:
    model_id = key.split("/")[1]
    try:
        return ModelManifest.from_json(store.get_json(key), model_id)
    except NotFound:  # deleted while we read: its blobs are garbage now
        return None
    except (ValueError, DataCorruption) as err:
        raise DataCorruption(f"cannot collect: the manifest of model {model_id!r} is unreadable") from err


def _read_job(store: ObjectStore, key: str) -> Job | None:
    try:
        return Job.from_json(store.get_json(key))
    except NotFound:
        return None
    except (ValueError, KeyError, TypeError) as err:
        raise DataCorruption(f"cannot collect: the job record {key!r} is unreadable") from err
