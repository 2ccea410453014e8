"""PriorGenService over gRPC: translates protobuf <-> plain Python and calls the core.

Progress reaches the stream through an asyncio queue fed from the core's threads. A client that
goes away stops listening; the generation goes on (other callers may share it, and a finished
set is cached for the next request).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import grpc
from dreambooth.v1 import common_pb2, priorgen_pb2, priorgen_pb2_grpc

from services.common.auth import caller
from services.common.request_checks import scheduler_from_proto
from services.priorgen.generate import PriorGenerator, PriorSetResult
from services.priorgen.request import PriorRequest

SERVICE_NAME = "dreambooth.v1.PriorGenService"

_Progress = tuple[int, int]


def request_from_proto(message: priorgen_pb2.GeneratePriorsRequest) -> PriorRequest:
    return PriorRequest(
        base_model=message.base_model,
        class_prompt=message.class_prompt,
        negative_prompt=message.negative_prompt,
        num_images=message.num_images,
        resolution=message.resolution,
        steps=message.steps,
        guidance_scale=message.guidance_scale,
        scheduler=scheduler_from_proto(message.scheduler),  # unknown numbers: InvalidArgument
        seed=message.seed,
    )


def prior_set_to_proto(result: PriorSetResult) -> priorgen_pb2.PriorSet:
    return priorgen_pb2.PriorSet(
        key=result.key,
        prefix=result.prefix,
        count=result.count,
        cached=result.cached,
        generated=result.generated,
    )


def _progress_message(done: int, total: int) -> priorgen_pb2.GeneratePriorsResponse:
    return priorgen_pb2.GeneratePriorsResponse(
        progress=common_pb2.PriorProgress(images_done=done, images_total=total)
    )


class PriorGenServicer(priorgen_pb2_grpc.PriorGenServiceServicer):
    def __init__(self, core: PriorGenerator) -> None:
        self._core = core

    async def GeneratePriors(
        self, request: priorgen_pb2.GeneratePriorsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[priorgen_pb2.GeneratePriorsResponse]:
        loop = asyncio.get_running_loop()
        progress: asyncio.Queue[_Progress] = asyncio.Queue()

        def on_progress(done: int, total: int) -> None:  # called from the core's threads
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody is listening
                loop.call_soon_threadsafe(progress.put_nowait, (done, total))

        # Validation, model lookup and the cache check touch the store: off the event loop.
        ticket = await asyncio.to_thread(
            self._core.start,
            request_from_proto(request),
            on_progress,
            caller=caller(),
            for_tenant=request.tenant,
        )
        next_progress: asyncio.Future[Any] | None = None
        finished = asyncio.wrap_future(ticket.future)
        try:
            while not finished.done():
                next_progress = asyncio.ensure_future(progress.get())
                waits: set[asyncio.Future[Any]] = {next_progress, finished}
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                if next_progress.done():
                    yield _progress_message(*next_progress.result())
                else:
                    next_progress.cancel()
            # Progress is queued before the result is published (same thread, same loop queue).
            while not progress.empty():
                yield _progress_message(*progress.get_nowait())
            yield priorgen_pb2.GeneratePriorsResponse(prior_set=prior_set_to_proto(finished.result()))
        finally:
            # A cancelled call leaves its last read and the result pending: drop both, or their
            # "never retrieved" warnings fire later, from inside whatever runs at that moment.
            if next_progress is not None:
                next_progress.cancel()
            finished.cancel()
            ticket.release()  # a cancelled caller may leave a set nobody waits for: it stops
