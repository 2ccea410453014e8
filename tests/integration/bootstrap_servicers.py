"""Test servicers for the server bootstrap: each behaviour is chosen by the request's text field.

`GetModel(name=...)` and `Generate(prompt=...)` read a behaviour:
  "ok"                 return normally (Generate: stream three progress messages)
  "raise:<ErrorName>"  raise that DomainError (Generate: after two messages, i.e. mid-stream)
  "crash"              raise an unexpected exception carrying SECRET (must never reach a client)
  "block"              wait until cancelled (Generate: after one message); records the cancellation
  "gate"               wait for `gate` to be set, then return (Generate: after one message)
  "long"               raise NotFound echoing a 20 KB name and an object repr (messages are bounded)
GetModel also takes "abort" (context.abort(OUT_OF_RANGE)) and "set_code" (set_code(ABORTED), return).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc.aio
from dreambooth.v1 import inference_pb2, inference_pb2_grpc, trainer_pb2, trainer_pb2_grpc

from services.common import errors

SECRET = "s3cr3t-internal-detail"

# One instance of every domain error, with the status code and the message the client must see.
DOMAIN_ERRORS: dict[str, tuple[errors.DomainError, str, str]] = {
    "InvalidArgument": (
        errors.InvalidArgument("prompt", "must not be empty"),
        "INVALID_ARGUMENT",
        "prompt: ",
    ),
    "NotFound": (errors.NotFound("model", "models/x not found"), "NOT_FOUND", "models/x not found"),
    "AlreadyExists": (errors.AlreadyExists("job j1 exists"), "ALREADY_EXISTS", "job j1 exists"),
    "FailedPrecondition": (errors.FailedPrecondition("job is running"), "FAILED_PRECONDITION", "job is"),
    "ResourceExhausted": (errors.ResourceExhausted("queue full"), "RESOURCE_EXHAUSTED", "queue full"),
    "Unavailable": (errors.Unavailable("store down"), "UNAVAILABLE", "store down"),
    "Unauthenticated": (errors.Unauthenticated("no api key"), "UNAUTHENTICATED", "no api key"),
    "PermissionDenied": (errors.PermissionDenied("not yours"), "PERMISSION_DENIED", "not yours"),
    "DataCorruption": (errors.DataCorruption("unet.safetensors: sha256 mismatch"), "DATA_LOSS", "unet."),
}


class Behaviours:
    """Events a test waits on or sets, shared by the servicers of one server."""

    def __init__(self) -> None:
        self.started = asyncio.Event()  # a "block" or "gate" call is running
        self.cancelled = asyncio.Event()  # a "block" call saw CancelledError
        self.gate = asyncio.Event()  # releases "gate" calls

    async def run(self, behaviour: str) -> None:
        if behaviour == "ok":
            return
        if behaviour.startswith("raise:"):
            raise DOMAIN_ERRORS[behaviour.removeprefix("raise:")][0]
        if behaviour == "crash":
            raise RuntimeError(f"database password is {SECRET}")
        if behaviour == "block":
            self.started.set()
            try:
                await asyncio.Event().wait()  # forever
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
        if behaviour == "long":
            name = "x" * 20_000
            raise errors.NotFound(
                "model", f"model {name!r} not found in <_io.BytesIO object at 0x7f3a2c1d9e80>"
            )
        if behaviour == "gate":
            self.started.set()
            await self.gate.wait()
            return
        raise ValueError(f"unknown behaviour {behaviour!r}")


def _progress(step: int) -> inference_pb2.GenerateResponse:
    return inference_pb2.GenerateResponse(progress=inference_pb2.GenerateProgress(step=step, total_steps=3))


class InferenceTestServicer(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self, behaviours: Behaviours) -> None:
        self.behaviours = behaviours

    async def GetModel(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        if request.name == "abort":  # a servicer may still abort by itself
            await context.abort(grpc.StatusCode.OUT_OF_RANGE, "page out of range")
        if request.name == "set_code":
            context.set_code(grpc.StatusCode.ABORTED)
            context.set_details("conflict, retry")
            return inference_pb2.GetModelResponse()
        await self.behaviours.run(request.name)
        return inference_pb2.GetModelResponse()

    async def ListModels(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return inference_pb2.ListModelsResponse(next_page_token=request.page_token)

    async def Generate(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        behaviour = request.prompt
        if behaviour == "ok":
            for step in (1, 2, 3):
                yield _progress(step)
            return
        sent_before = 2 if behaviour.startswith("raise:") else 1
        for step in range(1, sent_before + 1):
            yield _progress(step)
        await self.behaviours.run(behaviour)
        yield _progress(sent_before + 1)


class TrainerTestServicer(trainer_pb2_grpc.TrainerServiceServicer):
    """Client streaming: UploadImages counts headers; a header named "raise:<Error>" raises it."""

    def __init__(self, behaviours: Behaviours) -> None:
        self.behaviours = behaviours

    async def UploadImages(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
        count = 0
        async for part in request_iterator:
            if part.WhichOneof("part") == "image_header":
                await self.behaviours.run(part.image_header.filename)
                count += 1
        return trainer_pb2.UploadImagesResponse(dataset=trainer_pb2.Dataset(image_count=count))
