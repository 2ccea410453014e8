"""The prior-generation core: content-addressed, resumable, batched, single-flight. No gRPC here.

    generator = PriorGenerator(store, models, settings)
    ticket = generator.start(PriorRequest(...), on_progress)   # validates; cheap
    result = ticket.future.result()                             # PriorSetResult

Sets belong to a tenant: each is made from the tenant's view of the models (its own plus the shared
bases) and kept in its prefix of the store, so one tenant's cached set is never another's cache
hit (which would tell it that someone made that set). Only a service identity may ask for
another tenant than itself (the trainer, for a job's tenant).

A set is complete iff `priors/{key}/manifest.json` exists (written last). Otherwise the images
already in the store are kept (every put is atomic, so a killed run leaves only whole images)
and only the missing indices are rendered, `batch_size` per denoising call of fixed shape
(render.py). Image i depends only on the key's inputs and i, never on its batch, slot or run,
so the finished set is byte-identical to an uninterrupted run. While a set is being made, its
prefix is pinned (services/common/store_pins.py) against the store's garbage collector.

Single flight: identical requests (same key) in one process share one generation. Choice: only
the request that started the generation reports `generated` > 0; a request that joined it gets
the same set with `cached = False` (the set was not complete when it asked; it waited for the
generation) and `generated = 0` (nothing was made on its behalf), so the `generated` of all
callers sums to the images actually made. Across processes two servers may render the same
image; both write identical bytes, so the race is harmless.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from services.common.errors import Unavailable
from services.common.model_store import ModelManifest, ModelStore
from services.common.namespaced_store import scoped_store
from services.common.object_store import ObjectStore
from services.common.store_pins import Pin, wait_for_collectors
from services.common.tenancy import IMPLICIT_TENANT, Tenant, namespace_of, owner_for
from services.priorgen.cache_key import image_key, images_prefix, manifest_key, parse_image_index, prior_key
from services.priorgen.cache_key import set_prefix as key_prefix
from services.priorgen.metrics import PriorGenMetrics
from services.priorgen.pipeline_cache import PipelineCache
from services.priorgen.render import SetRenderer
from services.priorgen.request import PriorRequest, PriorSpec, validate_request
from services.priorgen.settings import PriorGenSettings
from services.priorgen.single_flight import Flight, ProgressFn, SingleFlight

log = logging.getLogger(__name__)

MANIFEST_FORMAT = 1


@dataclass(frozen=True)
class PriorSetResult:
    key: str
    prefix: str  # "priors/{key}/"
    count: int
    cached: bool  # complete in the store before this request: nothing generated
    generated: int  # images rendered on behalf of this request


@dataclass(frozen=True)
class Ticket:
    """A started request: its result, and `release`, called when the caller stops waiting (done
    or cancelled). A generation that every caller has released stops at its next step; what it
    stored so far stays, and the next request for the set resumes from there."""

    future: Future[PriorSetResult]
    release: Callable[[], None]


@dataclass(frozen=True)
class _Target:
    spec: PriorSpec
    manifest: ModelManifest  # of the base model
    key: str
    owner: str  # the tenant the set is made for
    store: ObjectStore  # the owner's view

    @property
    def model_digest(self) -> str:
        return self.manifest.digest

    @property
    def store_key(self) -> str:
        """The set's place in the whole store: the same inputs for two tenants are two sets."""
        return namespace_of(self.owner) + self.key


class PriorGenerator:
    def __init__(
        self,
        store: ObjectStore,
        models: ModelStore,
        settings: PriorGenSettings,
        metrics: PriorGenMetrics | None = None,
    ) -> None:
        self._store = store
        self._models = models
        self._settings = settings
        self.metrics = metrics or PriorGenMetrics.create()
        self._pipelines = PipelineCache(models, settings.device, settings.max_loaded_models)
        self._flights: SingleFlight[PriorSetResult] = SingleFlight()
        self._stop = threading.Event()
        self._sets = ThreadPoolExecutor(settings.max_concurrent_sets, thread_name_prefix="priorgen-set")

    # ---- requests -----------------------------------------------------------------------------

    def start(
        self,
        request: PriorRequest,
        on_progress: ProgressFn | None = None,
        *,
        caller: Tenant = IMPLICIT_TENANT,
        for_tenant: str = "",
    ) -> Ticket:
        """Validate, resolve the key, and return at once: a finished future for a cached set,
        else the future of the (possibly shared) generation. Blocking I/O: call off the event loop.
        Raises InvalidArgument (bad field), NotFound (unknown base model) or PermissionDenied
        (`for_tenant` names another tenant and the caller is no service) before any model load.
        """
        if self._stop.is_set():
            raise Unavailable("prior generation is shutting down")
        target = self._resolve(request, owner_for(caller, for_tenant))
        if target.store.exists(manifest_key(target.key)):
            self.metrics.cache_hits_total.inc()
            total = target.spec.num_images
            if on_progress is not None:
                on_progress(total, total)
            done: Future[PriorSetResult] = Future()
            done.set_result(self._result(target, cached=True, generated=0))
            return Ticket(done, lambda: None)

        flight_key = target.store_key
        flight, leader = self._flights.join(flight_key)
        release = flight.attach(on_progress)
        if leader:
            work = lambda report: self._produce_pinned(target, report, flight.abandoned)  # noqa: E731
            try:
                self._sets.submit(self._flights.run, flight_key, flight, work)
            except RuntimeError:  # closed between the check above and here
                self._flights.run(flight_key, flight, _shutting_down)
            return Ticket(_derived(flight, follower=False), release)
        self.metrics.single_flight_joins_total.inc()
        return Ticket(_derived(flight, follower=True), release)

    def generate(
        self, request: PriorRequest, on_progress: ProgressFn | None = None, **tenancy: Any
    ) -> PriorSetResult:
        """Blocking convenience: start() and wait."""
        return self.start(request, on_progress, **tenancy).future.result()

    def close(self, wait: bool = True) -> None:
        """Stop: no new requests; running sets stop at the next denoising step and fail with
        Unavailable (they resume on the next request). Queued sets start and fail the same way,
        so no caller waits forever."""
        self._stop.set()
        self._sets.shutdown(wait=wait)

    def _resolve(self, request: PriorRequest, owner: str) -> _Target:
        spec = validate_request(request, self._settings)
        manifest = self._models.for_tenant(owner).get(spec.model_id)  # NotFound: unknown to the owner
        key = prior_key(manifest.digest, spec, self._settings.compute_width)
        return _Target(spec, manifest, key, owner, scoped_store(self._store, owner))

    @staticmethod
    def _result(target: _Target, cached: bool, generated: int) -> PriorSetResult:
        return PriorSetResult(target.key, key_prefix(target.key), target.spec.num_images, cached, generated)

    # ---- generation (leader only, on a set worker) --------------------------------------------

    def _produce_pinned(
        self, target: _Target, report: ProgressFn, abandoned: threading.Event
    ) -> PriorSetResult:
        """`_produce` under a pin on the set's prefix (in the tenant's prefix, where the collector
        reads it); images an interrupted run left are counted only once no collection that could
        have missed the pin is running."""
        with Pin(target.store, prefixes=[key_prefix(target.key)], owner=f"prior set {target.key}"):
            wait_for_collectors(target.store)
            return self._produce(target, report, abandoned)

    def _produce(self, target: _Target, report: ProgressFn, abandoned: threading.Event) -> PriorSetResult:
        spec, key = target.spec, target.key
        total = spec.num_images
        if self._stop.is_set():
            _shutting_down(report)
        store = target.store
        if store.exists(manifest_key(key)):  # finished by a flight that just ended
            self.metrics.cache_hits_total.inc()
            report(total, total)
            return self._result(target, cached=True, generated=0)

        present = _present_images(store, key, total)
        missing = [index for index in range(total) if index not in present]
        report(len(present), total)
        log.info(
            "prior set started",
            extra={"key": key, "count": total, "present": len(present), "missing": len(missing)},
        )
        hashes: dict[int, tuple[str, int]] = {}
        started = time.monotonic()
        self.metrics.sets_in_progress.inc()
        try:
            if missing:
                pipe = self._pipelines.get(target.manifest)
                stop = _EitherEvent(self._stop, abandoned)
                renderer = SetRenderer(pipe, spec, self._settings.compute_width, stop)  # type: ignore[arg-type]
                for batch in _chunks(missing, self._settings.batch_size):
                    batch_started = time.monotonic()
                    for index, data in zip(batch, self._render(renderer, batch, abandoned), strict=True):
                        store.put_bytes(image_key(key, index), data)
                        hashes[index] = (hashlib.sha256(data).hexdigest(), len(data))
                    self.metrics.batch_duration_seconds.observe(time.monotonic() - batch_started)
                    self.metrics.images_generated_total.inc(len(batch))
                    report(len(present) + len(hashes), total)
            for index in sorted(present):  # made by an earlier, interrupted run
                data = store.get_bytes(image_key(key, index))
                hashes[index] = (hashlib.sha256(data).hexdigest(), len(data))
            store.put_json(manifest_key(key), _manifest(target, self._settings.compute_width, hashes))
        finally:
            self.metrics.sets_in_progress.dec()
        if missing:
            self.metrics.set_generation_duration_seconds.observe(time.monotonic() - started)
        self.metrics.sets_generated_total.inc()
        log.info("prior set complete", extra={"key": key, "count": total, "generated": len(missing)})
        return self._result(target, cached=False, generated=len(missing))

    def _render(self, renderer: SetRenderer, batch: Sequence[int], abandoned: threading.Event) -> list[bytes]:
        """The batch's PNGs; Abandoned (not "shutting down") when the stop came from callers leaving."""
        try:
            return renderer.render(batch)
        except Unavailable:
            if abandoned.is_set() and not self._stop.is_set():
                raise Abandoned("every caller of this prior set cancelled; it stopped") from None
            raise


def _present_images(store: ObjectStore, key: str, total: int) -> set[int]:
    present = set()
    for info in store.list(images_prefix(key)):
        index = parse_image_index(key, info.key)
        if index is not None and index < total and info.size > 0:
            present.add(index)
    return present


class Abandoned(Exception):
    """A set stopped because no caller waits for it any more (nobody sees this error)."""


class _EitherEvent:
    """Set when either event is: shutdown, or every caller gone (what SetRenderer polls)."""

    def __init__(self, *events: threading.Event) -> None:
        self._events = events

    def is_set(self) -> bool:
        return any(event.is_set() for event in self._events)


def _shutting_down(report: ProgressFn) -> PriorSetResult:
    raise Unavailable("prior generation is shutting down; ask again to resume the set")


def _derived(flight: Flight[PriorSetResult], follower: bool) -> Future[PriorSetResult]:
    """Each caller gets its own future (so no caller can cancel the shared one); a follower's
    result says that nothing was generated for it."""
    mine: Future[PriorSetResult] = Future()

    def relay(done: Future[PriorSetResult]) -> None:
        error = done.exception()
        with contextlib.suppress(InvalidStateError):  # this caller cancelled its own future
            if error is not None:
                mine.set_exception(error)
            elif follower:
                mine.set_result(dataclasses.replace(done.result(), cached=False, generated=0))
            else:
                mine.set_result(done.result())

    flight.future.add_done_callback(relay)
    return mine


def _chunks(items: Sequence[int], size: int) -> Iterator[Sequence[int]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _manifest(target: _Target, compute_width: int, hashes: dict[int, tuple[str, int]]) -> dict:
    """Deterministic (no timestamps): an interrupted and an uninterrupted run write the same bytes."""
    key = target.key
    inputs = target.spec.to_json()
    inputs.pop("model_id")  # not part of the key: any id with this digest is the same model
    return {
        "format": MANIFEST_FORMAT,
        "key": key,
        "model_digest": target.model_digest,
        "compute_width": compute_width,
        "inputs": inputs,
        "count": target.spec.num_images,
        "images": [
            {"index": index, "key": image_key(key, index), "sha256": sha, "size": size}
            for index, (sha, size) in sorted(hashes.items())
        ],
    }
