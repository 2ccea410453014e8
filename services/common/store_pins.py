"""The handshake between writers and the store's garbage collector: pins and collector notices.

Every resource in the store is written parts first and its record last (a model's blobs, then
its manifest; a dataset's images, then its manifest; a prior set's images, then its manifest),
so while a write runs its parts are referenced by nothing. The collector (services/gc) must not
sweep them. Two small objects make that safe without locks (the store has none):

- A **pin** (`pins/{id}.json`, this module's `Pin`) says "these blob digests and key prefixes
  are live": a writer writes it *before* its first part and deletes it *after* its record, and
  rewrites it with a later expiry while a long upload runs. A pin whose writer died expires.
- A **collector notice** (`gc/running/{id}.json`, `CollectorNotice`) says "a collection is running
  and deletes nothing after `deadline`": the collector writes it before it lists anything.

The collector lists its candidates first, then reads the pins, then the records (manifests, job
records). A blob uploaded by an unfinished publish is never swept: it can be a candidate only if
it was uploaded before the listing, so its pin was written before the listing too and is read
after it; if the pin is already gone the publish has finished, and its manifest, written before
the pin was removed, is read after the pins. The one case a pin cannot cover is a publish that
*reuses* a blob already in the store (content addressing: an unchanged VAE) while a collection
that listed that blob as unreferenced and read the pins before the pin existed is still
deleting. So a writer that reused blobs calls `wait_for_collectors` after writing its pin:
once no notice is live, every collection that could have missed the pin is over (a collector
deletes nothing past its deadline), and the writer uploads again whatever such a collection
deleted, before it writes its record. Times are wall-clock seconds; notices and pins carry a
margin for clock skew between machines.

Tenants (services/common/tenancy.py): a writer pins in its own view of the store, so a tenant's
pins are `tenants/{name}/pins/{id}.json` and name prefixes as that tenant sees them (blob digests
are global: one pool). The collector reads the pins of every tenant's prefix and of the root.
Collector notices are installation-wide: they live at the root whatever view a writer holds, and
`wait_for_collectors` reads them there.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from services.common.errors import NotFound
from services.common.namespaced_store import NamespacedStore
from services.common.object_store import ObjectStore

log = logging.getLogger(__name__)

PINS_PREFIX = "pins/"
NOTICES_PREFIX = "gc/running/"
PIN_TTL_S = 6 * 3600.0  # a writer refreshes its pin long before this
CLOCK_SKEW_S = 60.0  # tolerated difference between the clocks of two machines
DEFAULT_MAX_COLLECTION_S = 600.0  # a collection deletes nothing after this long


@dataclass(frozen=True)
class PinInfo:
    key: str
    blobs: frozenset[str]
    prefixes: tuple[str, ...]
    expires: float
    owner: str

    def covers(self, key: str) -> bool:
        return key.startswith(self.prefixes)


class Pin:
    """A writer's pin on the blobs and prefixes it is writing (a context manager)."""

    def __init__(
        self,
        store: ObjectStore,
        *,
        blobs: Iterable[str] = (),
        prefixes: Iterable[str] = (),
        owner: str = "",
        ttl_s: float = PIN_TTL_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.key = f"{PINS_PREFIX}{uuid.uuid4().hex}.json"
        self._blobs = sorted(set(blobs))
        self._prefixes = sorted(set(prefixes))
        self._owner = owner
        self._ttl_s = ttl_s
        self._clock = clock
        self._written_at = 0.0

    def __enter__(self) -> Pin:
        self._write()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.store.delete(self.key)

    def refresh(self) -> None:
        """Push the expiry out again once a third of it has passed (call it during long writes)."""
        if self._clock() - self._written_at >= self._ttl_s / 3:
            self._write()

    def _write(self) -> None:
        self._written_at = self._clock()
        self.store.put_json(
            self.key,
            {
                "owner": self._owner,
                "blobs": self._blobs,
                "prefixes": self._prefixes,
                "written": self._written_at,
                "expires": self._written_at + self._ttl_s,
            },
        )


def read_pins(store: ObjectStore, now: float) -> tuple[list[PinInfo], list[str]]:
    """(live pins, keys of expired ones). A pin that cannot be parsed counts as live and
    covering everything: better to keep garbage than to sweep a write in progress."""
    live, expired = [], []
    for info in store.list(PINS_PREFIX):
        try:
            value = store.get_json(info.key)
        except NotFound:  # its writer finished while we listed
            continue
        pin = _parse_pin(info.key, value)
        if pin.expires + CLOCK_SKEW_S < now:
            expired.append(info.key)
        else:
            live.append(pin)
    return live, expired


def _parse_pin(key: str, value: Any) -> PinInfo:
    try:
        return PinInfo(
            key=key,
            blobs=frozenset(str(b) for b in value["blobs"]),
            prefixes=tuple(str(p) for p in value["prefixes"]),
            expires=float(value["expires"]),
            owner=str(value.get("owner", "")),
        )
    except (KeyError, TypeError, ValueError, AttributeError):
        log.warning("unreadable pin: treating it as covering everything", extra={"key": key})
        return PinInfo(key=key, blobs=frozenset(), prefixes=("",), expires=float("inf"), owner="?")


@dataclass
class CollectorNotice:
    """A collection's notice that it is running; it deletes nothing after `deadline`."""

    store: ObjectStore
    max_seconds: float = DEFAULT_MAX_COLLECTION_S
    clock: Callable[[], float] = time.time
    key: str = field(default_factory=lambda: f"{NOTICES_PREFIX}{uuid.uuid4().hex}.json")
    deadline: float = 0.0

    def __enter__(self) -> CollectorNotice:
        started = self.clock()
        self.deadline = started + self.max_seconds
        expires = self.deadline + CLOCK_SKEW_S
        self.store.put_json(self.key, {"started": started, "deadline": self.deadline, "expires": expires})
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.store.delete(self.key)

    def may_delete(self) -> bool:
        return self.clock() < self.deadline


def live_notices(store: ObjectStore, now: float) -> tuple[list[str], list[str]]:
    """(keys of running collections' notices, keys of expired ones)."""
    live, expired = [], []
    for info in store.list(NOTICES_PREFIX):
        try:
            expires = float(store.get_json(info.key)["expires"])
        except NotFound:
            continue
        except (KeyError, TypeError, ValueError):
            expires = float("inf")  # unreadable: wait for someone to remove it
        (expired if expires < now else live).append(info.key)
    return live, expired


def wait_for_collectors(
    store: ObjectStore,
    *,
    clock: Callable[[], float] = time.time,
    sleep: Callable[[float], None] = time.sleep,
    poll_s: float = 0.2,
) -> None:
    """Return once no collection that may have missed a pin written before this call can still
    delete anything (see the module docstring). Immediate when no collection is running.
    `store` may be a tenant's view: notices are read at the root."""
    root = store.root if isinstance(store, NamespacedStore) else store
    waited = False
    while True:
        live, _ = live_notices(root, clock())
        if not live:
            if waited:
                log.info("a store collection ended; publishing goes on")
            return
        if not waited:
            log.info("waiting for a store collection to end before reusing blobs", extra={"notices": live})
            waited = True
        sleep(poll_s)
