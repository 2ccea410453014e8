"""The mark half of the store's garbage collector: what the store's records reference.

Read from the records themselves, never from a service's memory, so any process may collect:
- model manifests (`models/{id}/manifest.json`) name the blobs every model is made of;
- dataset manifests make a dataset's images live;
- job records (`jobs/{id}/job.json`) keep their events and previews, their checkpoints while the
  job is unfinished, and the prior set they name; an unfinished job that will generate class
  priors but names no set yet may be about to name any of them, so it keeps every prior set;
- live pins (services/common/store_pins.py) keep what unfinished writes are writing.
A record that cannot be read stops the collection: what it references is unknown.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from services.common.errors import DataCorruption, NotFound
from services.common.model_store import ModelManifest
from services.common.object_store import ObjectStore
from services.common.store_pins import PinInfo
from services.trainer.jobs.records import Job

RECORD_NAMES = {"models": "manifest.json", "datasets": "manifest.json", "jobs": "job.json"}


@dataclass(frozen=True)
class JobRef:
    final: bool
    prior_prefix: str


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
        jobs[job.job_id] = JobRef(job.state.is_final, job.prior_prefix)
        if not job.state.is_final and job.spec.with_prior_preservation and not job.prior_prefix:
            keep_all_priors = True
    return References(
        blobs=frozenset(blobs),
        models=frozenset(models),
        datasets=frozenset(datasets),
        jobs=jobs,
        prior_prefixes=frozenset(ref.prior_prefix for ref in jobs.values() if ref.prior_prefix),
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
