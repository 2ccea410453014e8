"""The inference service without gRPC: validate, admit, load (cached), batch, sample, stream.

    core = InferenceCore(settings, ModelStore(store, cache_dir), InferenceMetrics.create(registry))
    core.start()
    async for event in core.generate(GenerateParams("tiny-sd", "a photo of a dog", seed=1)):
        ...  # Progress per step, Preview every k steps when asked, then FinalImage per image

A request is validated completely (model existence, sizes, prompt tokens) before any model is
loaded; admission bounds the requests waiting for a batch (past it ResourceExhausted at once);
torch runs only in the batcher's worker threads, never on the event loop. A LoRA model runs on
its base's loaded pipeline with its adapter (model cache + adapter cache): its requests batch
with those of every other LoRA of that base, and of the base itself.

Every call is made for a tenant, which sees, samples and exports only its own models and the
shared bases (model specs are looked up through its view; loaded weights and adapters are shared
by digest), within its quota of concurrent streams; its final images count towards its usage.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

from services.common.cost import check_cost, sampling_cost
from services.common.errors import InvalidArgument, ResourceExhausted
from services.common.model_store import ModelManifest, ModelStore, validate_model_id
from services.common.tenancy import IMPLICIT_TENANT, Tenant
from services.common.usage import UsageLedger
from services.inference.adapter_cache import AdapterCache
from services.inference.batcher import Batcher
from services.inference.export import ExportPart, export_parts
from services.inference.job import Job
from services.inference.lora import LoraAdapter
from services.inference.metrics import InferenceMetrics
from services.inference.model_cache import LoadedModel, ModelCache
from services.inference.model_specs import ModelSpec, ModelSpecs
from services.inference.params import FinalImage, GenerateEvent, GenerateParams
from services.inference.sampler import Sampler
from services.inference.settings import InferenceSettings
from services.inference.tenant_accounting import TenantAccounting
from services.inference.validation import RequestLimits, check_against_model, check_request, with_seed

log = logging.getLogger(__name__)

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
WARM_UP_PROMPT = "a photo"


class _Admission:
    """Counts requests admitted and not yet sampling, and what they cost; refuses past `limit`
    requests or `max_cost` megapixel-steps in the queue."""

    def __init__(self, limit: int, max_cost: float, metrics: InferenceMetrics) -> None:
        self._limit = limit
        self._max_cost = max_cost
        self._metrics = metrics
        self._lock = threading.Lock()
        self._count = 0
        self._cost = 0.0

    @property
    def count(self) -> int:
        with self._lock:
            return self._count

    def admit(self, cost: float) -> _Ticket:
        with self._lock:
            if self._count >= self._limit or self._cost + cost > self._max_cost:
                raise ResourceExhausted(
                    f"the server is busy ({self._count} requests, {self._cost:,.0f} megapixel-steps "
                    "waiting); retry with back-off"
                )
            self._count += 1
            self._cost += cost
            self._metrics.queue_depth.set(self._count)
        return _Ticket(self, cost)

    def _release(self, cost: float) -> None:
        with self._lock:
            self._count -= 1
            self._cost -= cost
            self._metrics.queue_depth.set(self._count)


class _Ticket:
    """One admitted request's place in the queue; released once, when it starts or ends."""

    def __init__(self, admission: _Admission, cost: float) -> None:
        self._admission = admission
        self._cost = cost
        self._lock = threading.Lock()
        self._held = True

    def release(self, *_: object) -> None:
        with self._lock:
            if not self._held:
                return
            self._held = False
        self._admission._release(self._cost)


class InferenceCore:
    def __init__(
        self,
        settings: InferenceSettings,
        models: ModelStore,
        metrics: InferenceMetrics,
        usage: UsageLedger | None = None,
    ) -> None:
        self.settings = settings
        self.models = models
        self.metrics = metrics
        self.limits = RequestLimits(settings.max_width, settings.max_height, settings.max_prompt_chars)
        self.specs = ModelSpecs(models, Path(settings.store.cache_dir))  # the implicit tenant's
        self._tenant_specs: dict[str, ModelSpecs] = {}
        self._specs_lock = threading.Lock()
        self.accounting = TenantAccounting(metrics, usage)
        self.cache = ModelCache(
            models,
            max_models=settings.cache_max_models,
            max_bytes=settings.cache_max_bytes,
            device=settings.device,
            dtype=settings.dtype,
            metrics=metrics.cache,
        )
        self.adapters = AdapterCache(
            models, max_bytes=settings.adapter_cache_max_bytes, metrics=metrics.adapters
        )
        self.sampler = Sampler(metrics, settings.preview_max_size)
        self.batcher = Batcher(
            self._run_batch,
            max_batch=settings.max_batch,
            max_wait_s=settings.max_wait_ms / 1000.0,
            workers=settings.workers,
        )
        self._admission = _Admission(settings.max_queue, settings.max_queued_cost, metrics)

    # ---- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        self.batcher.start()

    def close(self) -> None:
        """Fail the waiting requests and wait for the running batches (they end their requests)."""
        self.batcher.stop()

    async def warm_up(self) -> None:
        """Load the default model and run one tiny sampling (2 steps) on it.

        Straight through the sampler, not the batcher: a long batching window must not delay
        readiness.
        """
        model_id = self.settings.default_model
        if not model_id:
            return
        started = time.perf_counter()
        spec = await asyncio.to_thread(self.specs.get, model_id)
        params = check_request(GenerateParams(model_id, WARM_UP_PROMPT, steps=2, seed=0), self.limits)
        params = self._check_against(spec, params)
        model = await asyncio.to_thread(self.cache.get, spec)
        job = Job(params, model, asyncio.get_running_loop())
        await asyncio.to_thread(self._run_batch, [job])
        job.finish()
        async for _ in job.events():
            pass
        log.info(
            "warmed up", extra={"model_id": model_id, "seconds": round(time.perf_counter() - started, 3)}
        )

    @property
    def queue_depth(self) -> int:
        return self._admission.count

    # ---- Generate -----------------------------------------------------------------------------

    def specs_for(self, tenant: Tenant) -> ModelSpecs:
        """Model specs as `tenant` sees the store: its models and the shared bases."""
        if tenant.implicit:
            return self.specs
        with self._specs_lock:
            specs = self._tenant_specs.get(tenant.name)
            if specs is None:
                models = self.models.for_tenant(tenant.name)
                specs = self._tenant_specs[tenant.name] = ModelSpecs(
                    models, Path(self.settings.store.cache_dir)
                )
            return specs

    async def generate(
        self, params: GenerateParams, tenant: Tenant = IMPLICIT_TENANT
    ) -> AsyncIterator[GenerateEvent]:
        params = check_request(params, self.limits)  # no I/O: refused before anything is spent
        with self.accounting.stream(tenant):  # the tenant's quota of streams, before the queue's
            events = self._generate(params, tenant)
            try:
                async for event in events:
                    if isinstance(event, FinalImage):
                        self.accounting.image_sent(tenant)
                    yield event
            finally:
                await events.aclose()  # a client that went away stops the sampling now

    async def _generate(self, params: GenerateParams, tenant: Tenant) -> AsyncIterator[GenerateEvent]:
        arrived = time.monotonic()
        spec = await asyncio.to_thread(self.specs_for(tenant).get, params.model_id)  # NotFound; cached
        params = with_seed(self._check_against(spec, params))
        ticket = self._admission.admit(self._cost(params))  # past the queue's bounds: refused at once
        job: Job | None = None
        finished = False
        try:
            model, adapter = await asyncio.to_thread(self._load, spec)
            job = Job(params, model, asyncio.get_running_loop(), on_start=ticket.release, adapter=adapter)
            self.batcher.submit(job)
            first_image = True
            async for event in job.events():
                if first_image and isinstance(event, FinalImage):
                    first_image = False
                    self.metrics.time_to_first_image.observe(time.monotonic() - arrived)
                yield event
            finished = True
            log.info("generate finished", extra=_log_fields(params, arrived))
        except (asyncio.CancelledError, GeneratorExit):
            self.metrics.cancelled.inc()
            log.info("generate cancelled", extra=_log_fields(params, arrived))
            raise
        finally:
            ticket.release()
            if job is not None and not finished:
                job.cancel()  # its rows leave the batch at the next step

    def _cost(self, params: GenerateParams) -> float:
        """The request's cost (sizes resolved), checked against the per-request ceiling."""
        cost = sampling_cost(
            params.width, params.height, params.steps, params.num_images, params.guidance_scale
        )
        advice = "ask for fewer images, fewer steps or fewer pixels"
        return check_cost(cost, self.settings.max_request_cost, "request", advice)

    def _check_against(self, spec: ModelSpec, params: GenerateParams) -> GenerateParams:
        return check_against_model(
            params,
            self.limits,
            default_width=spec.default_width,
            default_height=spec.default_height,
            count_tokens=spec.count_tokens,
            max_tokens=spec.max_tokens,
            is_lora=spec.is_lora,
        )

    def _load(self, spec: ModelSpec) -> tuple[LoadedModel, LoraAdapter | None]:
        """The pipeline a request on `spec` runs on, and its adapter for a LoRA model."""
        model = self.cache.get(spec)  # a LoRA's base: loaded once for all its LoRAs
        return model, self.adapters.get(spec, model) if spec.is_lora else None

    def _run_batch(self, jobs: list[Job]) -> None:
        self.sampler.run(jobs[0].model, jobs)

    # ---- models -------------------------------------------------------------------------------

    def get_model(self, model_id: str, tenant: Tenant = IMPLICIT_TENANT) -> ModelManifest:
        return self.models.for_tenant(tenant.name).get(model_id)

    def export_model(self, model_id: str, tenant: Tenant = IMPLICIT_TENANT) -> Iterator[ExportPart]:
        """The parts of an export of `model_id`, one of the tenant's models or a shared base
        (blocking: iterate it in a worker thread)."""
        return export_parts(self.models.for_tenant(tenant.name), model_id)

    def list_models(
        self, page_size: int, page_token: str, tenant: Tenant = IMPLICIT_TENANT
    ) -> tuple[list[ModelManifest], str]:
        """One page of the tenant's models and the shared bases, ordered by id, and the token of
        the next page ("" on the last)."""
        if page_size < 0:
            raise InvalidArgument("page_size", f"must be >= 0, got {page_size}")
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        after = _decode_page_token(page_token)
        remaining = [m for m in self.models.for_tenant(tenant.name).list() if m.model_id > after]
        page = remaining[:size]
        next_token = _encode_page_token(page[-1].model_id) if len(remaining) > size else ""
        return page, next_token


def _log_fields(params: GenerateParams, arrived: float) -> dict[str, object]:
    """What a log line may say about a request: never the prompts (they are user content)."""
    return {
        "model_id": params.model_id,
        "num_images": params.num_images,
        "size": f"{params.width}x{params.height}",
        "steps": params.steps,
        "scheduler": params.scheduler,
        "seconds": round(time.monotonic() - arrived, 3),
    }


def _encode_page_token(model_id: str) -> str:
    return base64.urlsafe_b64encode(f"after:{model_id}".encode()).decode()


def _decode_page_token(token: str) -> str:
    if not token:
        return ""
    try:
        text = base64.urlsafe_b64decode(token.encode()).decode()
    except (binascii.Error, UnicodeError, ValueError) as err:
        raise InvalidArgument("page_token", "is not a token this service issued") from err
    if not text.startswith("after:"):
        raise InvalidArgument("page_token", "is not a token this service issued")
    model_id = text.removeprefix("after:")
    validate_model_id(model_id, "page_token")
    return model_id
