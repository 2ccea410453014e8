"""One admitted Generate request on its way through the batcher and the sampler.

The sampler runs in a worker thread and reports through `emit`; the request's coroutine reads
the same events from an asyncio queue. Cancelling (the client went away, its deadline passed)
sets a flag the sampler checks before every step.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections.abc import AsyncIterator, Callable

from services.common.errors import Unavailable
from services.inference.lora import LoraAdapter
from services.inference.model_cache import LoadedModel
from services.inference.params import GenerateEvent, GenerateParams


@dataclasses.dataclass(frozen=True)
class BatchKey:
    """Requests that agree on all of these can share UNet calls.

    The model is the loaded pipeline: requests on different LoRA models of one base (and on the
    base itself) share a key, each row of the batch carrying its own adapter (row_adapters.py).
    """

    model_digest: str
    width: int
    height: int
    steps: int
    scheduler: str
    guidance_scale: float

    @classmethod
    def of(cls, model: LoadedModel, params: GenerateParams) -> BatchKey:
        return cls(
            model.digest, params.width, params.height, params.steps, params.scheduler, params.guidance_scale
        )


class _End:
    """Marks the end of a job's events, with the error that ended it, if any."""

    def __init__(self, error: BaseException | None = None) -> None:
        self.error = error


class Job:
    def __init__(
        self,
        params: GenerateParams,
        model: LoadedModel,
        loop: asyncio.AbstractEventLoop,
        on_start: Callable[[Job], None] = lambda job: None,
        adapter: LoraAdapter | None = None,
    ) -> None:
        if params.seed is None or not params.width or not params.height:
            raise ValueError("a job needs a validated request (seed and size resolved)")
        if adapter is not None and params.adapter_scale is None:
            raise ValueError("a LoRA job needs a validated request (adapter scale resolved)")
        self.params = params
        self.model = model  # the pipeline it runs on (its base's, for a LoRA model)
        self.adapter = adapter
        self.key = BatchKey.of(model, params)
        self.enqueued_at = time.monotonic()
        self._loop = loop
        self._queue: asyncio.Queue[GenerateEvent | _End] = asyncio.Queue()
        self._cancelled = threading.Event()
        self._started = threading.Event()
        self._on_start = on_start

    @property
    def num_images(self) -> int:
        return self.params.num_images

    # ---- worker side (any thread) -------------------------------------------------------------

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def start(self) -> None:
        """The job leaves the queue for a batch run (once)."""
        if not self._started.is_set():
            self._started.set()
            self._on_start(self)

    @property
    def started(self) -> bool:
        return self._started.is_set()

    def emit(self, event: GenerateEvent) -> None:
        if not self.cancelled:  # nobody reads a cancelled job's events
            self._put(event)

    def finish(self, error: BaseException | None = None) -> None:
        self._put(_End(error))

    def _put(self, item: GenerateEvent | _End) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self._cancelled.set()

    # ---- request side (the event loop) --------------------------------------------------------

    def cancel(self) -> None:
        self._cancelled.set()

    async def events(self) -> AsyncIterator[GenerateEvent]:
        """The job's events until it finishes; re-raises the error that ended it."""
        while True:
            item = await self._queue.get()
            if isinstance(item, _End):
                if item.error is None:
                    return
                raise item.error
            yield item


def shutting_down() -> Unavailable:
    return Unavailable("the inference server is shutting down; retry on another replica")
