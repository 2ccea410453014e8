"""The store's garbage collector: mark and sweep over the object store.

    report = collect(store)                 # or collect(store, dry_run=True): what would go
    report.garbage                          # (key, size, kind) of every object removed

The order is what makes it safe beside writers that run at the same time (store_pins.py):
1. post a collector notice (not in a dry run): writers that reuse stored bytes wait for it;
2. list every candidate object, of the root and of every tenant's prefix (`tenants/{name}/`);
3. read the pins of every namespace, then the records of every namespace (references.py):
   anything referenced at that moment, by any tenant, is live;
4. sweep the candidates nothing references, records of a set (manifest.json, checkpoint.json)
   before their parts so a half-swept set reads as incomplete, never as whole; stop at the
   notice's deadline, leaving the rest for the next collection;
5. remove expired pins and notices, then the notice.

What it removes: blobs no manifest names; the leftovers of deleted models, datasets and jobs
(events, previews, checkpoints), and of uploads that died; the checkpoints of finished jobs;
prior sets no job names; expired pins and notices. Records themselves (model and dataset
manifests, job records) are only ever removed by the Delete RPCs, and keys outside the layout
it knows are never touched.

Tenants: each tenant's prefix is collected as its own store (its records reference only its own
keys), found from the listing itself, so a tenant no longer in the keys file is still covered.
A tenant whose unfinished write pinned a blob is in the listing (the pin was written before the
blob, so before the listing), and every tenant's manifests and pins keep blobs for all: the
blob pool is shared. `collect` takes the store's root, never a tenant's view.
"""

from __future__ import annotations

import logging
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from services.common.namespaced_store import NamespacedStore, scoped_store
from services.common.object_store import ObjectInfo, ObjectStore
from services.common.store_pins import (
    DEFAULT_MAX_COLLECTION_S,
    NOTICES_PREFIX,
    PINS_PREFIX,
    CollectorNotice,
    live_notices,
    read_pins,
)
from services.common.tenancy import namespace_of
from services.gc.references import (
    References,
    StoreReferences,
    is_record,
    read_store_references,
    split_namespace,
    tenants_in,
)

log = logging.getLogger(__name__)

COMMIT_NAMES = ("manifest.json", "checkpoint.json")  # deleted first: the set stops looking whole
# The owners this collector knows under each top-level prefix (model ids as model_store.py
# validates them, dataset and prior-set ids are sha256 hex, job ids 12 hex digits as records.py
# makes them). Keys under any other name are not its to remove.
OWNERS = {
    "models": re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$"),
    "datasets": re.compile(r"^[0-9a-f]{64}$"),
    "jobs": re.compile(r"^[0-9a-f]{12}$"),
    "priors": re.compile(r"^[0-9a-f]{64}$"),
}


@dataclass(frozen=True)
class Garbage:
    key: str
    size: int
    kind: str  # what it was: "blob", "checkpoint", "prior set", "job leftovers", ...


@dataclass(frozen=True)
class CollectionReport:
    garbage: tuple[Garbage, ...]  # removed, or (dry run) to be removed
    deleted: int  # objects actually removed
    dry_run: bool
    complete: bool  # False when the deadline stopped the sweep

    @property
    def bytes(self) -> int:
        return sum(item.size for item in self.garbage)

    def by_kind(self) -> dict[str, tuple[int, int]]:
        """kind -> (objects, bytes)."""
        counts: Counter[str] = Counter()
        sizes: Counter[str] = Counter()
        for item in self.garbage:
            counts[item.kind] += 1
            sizes[item.kind] += item.size
        return {kind: (counts[kind], sizes[kind]) for kind in sorted(counts)}


def collect(
    store: ObjectStore,
    *,
    dry_run: bool = False,
    max_seconds: float = DEFAULT_MAX_COLLECTION_S,
    clock: Callable[[], float] = time.time,
) -> CollectionReport:
    """One collection of `store`, the root (see the module docstring for the order and what goes)."""
    if isinstance(store, NamespacedStore):
        raise ValueError("collect() takes the store's root: it collects every tenant's prefix")
    if dry_run:
        return _collect(store, None, dry_run=True, clock=clock)
    with CollectorNotice(store, max_seconds=max_seconds, clock=clock) as notice:
        return _collect(store, notice, dry_run=False, clock=clock)


def _collect(
    store: ObjectStore, notice: CollectorNotice | None, *, dry_run: bool, clock: Callable[[], float]
) -> CollectionReport:
    listing = list(store.list())
    candidates = [info for info in listing if not _is_handshake(info.key)]
    now = clock()
    pins, expired_pins = {}, []
    for tenant in ["", *tenants_in(info.key for info in listing)]:  # the root first, then each tenant
        pins[tenant], expired = read_pins(scoped_store(store, tenant), now)
        expired_pins += [namespace_of(tenant) + key for key in expired]  # as the root sees them
    references = read_store_references(store, pins)
    _, expired_notices = live_notices(store, now)
    garbage = [
        Garbage(info.key, info.size, kind)
        for info in candidates
        if (kind := store_garbage_kind(info, references)) is not None
    ]
    garbage.sort(key=lambda item: (not item.key.endswith(COMMIT_NAMES), item.key))
    garbage += [Garbage(key, 0, "expired pin") for key in expired_pins]
    garbage += [
        Garbage(key, 0, "expired notice") for key in expired_notices if notice is None or key != notice.key
    ]
    if dry_run or notice is None:
        return CollectionReport(tuple(garbage), deleted=0, dry_run=True, complete=True)
    deleted = 0
    for item in garbage:
        if not notice.may_delete():
            log.warning(
                "collection deadline reached", extra={"deleted": deleted, "left": len(garbage) - deleted}
            )
            return CollectionReport(tuple(garbage[:deleted]), deleted=deleted, dry_run=False, complete=False)
        store.delete(item.key)
        deleted += 1
    log.info("store collected", extra={"objects": deleted, "bytes": sum(g.size for g in garbage)})
    return CollectionReport(tuple(garbage), deleted=deleted, dry_run=False, complete=True)


def _is_handshake(key: str) -> bool:
    """A pin (of the root or of a tenant) or a collector notice: never a candidate."""
    namespace, relative = split_namespace(key)
    return relative.startswith(PINS_PREFIX) or (not namespace and relative.startswith(NOTICES_PREFIX))


def store_garbage_kind(info: ObjectInfo, refs: StoreReferences) -> str | None:
    """What kind of garbage an object of the whole store is, or None when anything in any
    namespace references it (or it is in no namespace or layout this collector knows)."""
    if refs.everything_pinned:
        return None
    located = refs.locate(info.key)
    if located is None:
        return None
    namespace_refs, key = located
    parts = key.split("/")
    if len(parts) == 3 and parts[0] == "blobs" and parts[1] == "sha256":
        if info.key != key:  # blobs live at the root only; a tenant's "blobs/" is not a layout we know
            return None
        return None if parts[2] in refs.blobs else "blob"
    return garbage_kind(ObjectInfo(key=key, size=info.size), namespace_refs)


def garbage_kind(info: ObjectInfo, refs: References) -> str | None:
    """What kind of garbage the object is, within one namespace (its key as that namespace sees
    it), or None when something references it (or it is not in a layout this collector knows).
    Blobs are judged by `refs.blobs`: pass the union of every namespace's (store_garbage_kind)."""
    key = info.key
    if is_record(key) or refs.pinned(key):
        return None
    parts = key.split("/")
    top = parts[0]
    if top == "blobs" and len(parts) == 3 and parts[1] == "sha256":
        return None if parts[2] in refs.blobs else "blob"
    owner = parts[1] if len(parts) >= 3 else ""
    if top not in OWNERS or not OWNERS[top].match(owner):
        return None
    if top == "models":
        return None if owner in refs.models else "model leftovers"
    if top == "datasets":
        return None if owner in refs.datasets else "dataset leftovers"
    if top == "jobs":
        job = refs.jobs.get(owner)
        if job is None:
            return "job leftovers"  # events, previews and checkpoints of a deleted job
        return "checkpoint" if parts[2] == "checkpoints" and job.final else None
    if top == "priors":
        live = refs.keep_all_priors or f"priors/{owner}/" in refs.prior_prefixes
        return None if live else "prior set"
    return None
