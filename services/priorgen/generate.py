"""The prior-generation core: content-addressed, resumable, batched, single-flight. No gRPC here.

    generator = PriorGenerator(store, models, settings)
    ticket = generator.start(PriorRequest(...), on_progress)   # validates; cheap
    result = ticket.future.result()                             # PriorSetResult

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

from services.common.errors import Unavailable
from services.common.model_store import ModelStore
from services.common.object_store import ObjectStore
from services.common.store_pins import Pin, wait_for_collectors
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
    """A started request: its result, and how to stop listening (the generation goes on)."""

    future: Future[PriorSetResult]
    unsubscribe: Callable[[], None]


@dataclass(frozen=True)
class _Target:
    spec: PriorSpec
    model_digest: str
    key: str


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

    def start(self, request: PriorRequest, on_progress: ProgressFn | None = None) -> Ticket:
        """Validate, resolve the key, and return at once: a finished future for a cached set,
        else the future of the (possibly shared) generation. Blocking I/O: call off the event loop.
        Raises InvalidArgument (bad field) or NotFound (unknown base model) before any model load.
        """
        if self._stop.is_set():
            raise Unavailable("prior generation is shutting down")
        target = self._resolve(request)
        if self._store.exists(manifest_key(target.key)):
            self.metrics.cache_hits_total.inc()
            total = target.spec.num_images
            if on_progress is not None:
                on_progress(total, total)
            done: Future[PriorSetResult] = Future()
            done.set_result(self._result(target, cached=True, generated=0))
            return Ticket(done, lambda: None)

        flight, leader = self._flights.join(target.key)
        unsubscribe = flight.subscribe(on_progress) if on_progress is not None else (lambda: None)
        if leader:
            try:
                self._sets.submit(
                    self._flights.run, target.key, flight, lambda report: self._produce_pinned(target, report)
                )
            except RuntimeError:  # closed between the check above and here
                self._flights.run(target.key, flight, _shutting_down)
            return Ticket(_derived(flight, follower=False), unsubscribe)
        self.metrics.single_flight_joins_total.inc()
        return Ticket(_derived(flight, follower=True), unsubscribe)

    def generate(self, request: PriorRequest, on_progress: ProgressFn | None = None) -> PriorSetResult:
        """Blocking convenience: start() and wait."""
        return self.start(request, on_progress).future.result()

    def close(self, wait: bool = True) -> None:
        """Stop: no new requests; running sets stop at the next denoising step and fail with
        Unavailable (they resume on the next request). Queued sets start and fail the same way,
        so no caller waits forever."""
        self._stop.set()
        self._sets.shutdown(wait=wait)

    def _resolve(self, request: PriorRequest) -> _Target:
        spec = validate_request(request, self._settings)
        digest = self._models.get(spec.model_id).digest  # NotFound for an unknown base model
        return _Target(spec, digest, prior_key(digest, spec, self._settings.compute_width))

    @staticmethod
    def _result(target: _Target, cached: bool, generated: int) -> PriorSetResult:
        return PriorSetResult(target.key, key_prefix(target.key), target.spec.num_images, cached, generated)

    # ---- generation (leader only, on a set worker) --------------------------------------------

    def _produce_pinned(self, target: _Target, report: ProgressFn) -> PriorSetResult:
        """`_produce` under a pin on the set's prefix; images an interrupted run left are counted
        only once no collection that could have missed the pin is running."""
        with Pin(self._store, prefixes=[key_prefix(target.key)], owner=f"prior set {target.key}"):
            wait_for_collectors(self._store)
            return self._produce(target, report)

    def _produce(self, target: _Target, report: ProgressFn) -> PriorSetResult:
        spec, key = target.spec, target.key
        total = spec.num_images
        if self._stop.is_set():
            _shutting_down(report)
        if self._store.exists(manifest_key(key)):  # finished by a flight that just ended
            self.metrics.cache_hits_total.inc()
            report(total, total)
            return self._result(target, cached=True, generated=0)

        present = self._present_images(key, total)
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
                pipe = self._pipelines.get(spec.model_id, target.model_digest)
                renderer = SetRenderer(pipe, spec, self._settings.compute_width, self._stop)
                for batch in _chunks(missing, self._settings.batch_size):
                    batch_started = time.monotonic()
                    for index, data in zip(batch, renderer.render(batch), strict=True):
                        self._store.put_bytes(image_key(key, index), data)
                        hashes[index] = (hashlib.sha256(data).hexdigest(), len(data))
                    self.metrics.batch_duration_seconds.observe(time.monotonic() - batch_started)
                    self.metrics.images_generated_total.inc(len(batch))
                    report(len(present) + len(hashes), total)
            for index in sorted(present):  # made by an earlier, interrupted run
                data = self._store.get_bytes(image_key(key, index))
                hashes[index] = (hashlib.sha256(data).hexdigest(), len(data))
            self._store.put_json(manifest_key(key), _manifest(target, self._settings.compute_width, hashes))
        finally:
            self.metrics.sets_in_progress.dec()
        if missing:
            self.metrics.set_generation_duration_seconds.observe(time.monotonic() - started)
        self.metrics.sets_generated_total.inc()
        log.info("prior set complete", extra={"key": key, "count": total, "generated": len(missing)})
        return self._result(target, cached=False, generated=len(missing))

    def _present_images(self, key: str, total: int) -> set[int]:
        present = set()
        for info in self._store.list(images_prefix(key)):
            index = parse_image_index(key, info.key)
            if index is not None and index < total and info.size > 0:
                present.add(index)
        return present


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
