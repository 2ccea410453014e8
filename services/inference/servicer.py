"""InferenceService over gRPC: protobuf <-> plain Python, and nothing else (DESIGN §3).

Domain errors raised here or in the core (also mid-stream) are mapped to status codes by the
server's interceptor.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
from dreambooth.v1 import common_pb2, inference_pb2, inference_pb2_grpc
from dreambooth_client import vocabulary

from services.common.auth import caller
from services.common.model_proto import model_proto
from services.common.model_store import parse_model_name
from services.common.request_checks import image_format_from_proto, scheduler_from_proto
from services.inference.core import InferenceCore
from services.inference.export import Chunk, ExportedFile, ExportPart, ExportPlan, FileStart
from services.inference.params import (
    EncodedImage,
    FinalImage,
    GenerateEvent,
    GenerateParams,
    Preview,
    Progress,
)

SERVICE_NAME = "dreambooth.v1.InferenceService"


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self, core: InferenceCore) -> None:
        self._core = core

    async def Generate(
        self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[inference_pb2.GenerateResponse]:
        async for event in self._core.generate(generate_params(request), caller()):
            yield generate_response(event)

    async def ListModels(
        self, request: inference_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.ListModelsResponse:
        manifests, next_token = await asyncio.to_thread(
            self._core.list_models, request.page_size, request.page_token, caller()
        )
        return inference_pb2.ListModelsResponse(
            models=[model_proto(m) for m in manifests], next_page_token=next_token
        )

    async def GetModel(
        self, request: inference_pb2.GetModelRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.GetModelResponse:
        model_id = parse_model_name(request.name, "name")
        manifest = await asyncio.to_thread(self._core.get_model, model_id, caller())
        return inference_pb2.GetModelResponse(model=model_proto(manifest))

    async def ExportModel(
        self, request: inference_pb2.ExportModelRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[inference_pb2.ExportModelResponse]:
        model_id = parse_model_name(request.name, "name")
        parts = await asyncio.to_thread(self._core.export_model, model_id, caller())
        while (part := await asyncio.to_thread(next, parts, None)) is not None:
            yield export_response(part)


def generate_params(request: inference_pb2.GenerateRequest) -> GenerateParams:
    scheduler = scheduler_from_proto(request.scheduler)
    output_format = image_format_from_proto(request.output_format)
    return GenerateParams(
        model_id=parse_model_name(request.model, "model"),
        prompt=request.prompt,
        negative_prompt=request.negative_prompt,
        num_images=request.num_images,
        width=request.width,
        height=request.height,
        steps=request.steps,
        guidance_scale=request.guidance_scale,
        scheduler=scheduler,
        seed=request.seed if request.HasField("seed") else None,
        preview_interval=request.preview_interval,
        output_format=output_format,
        truncate_prompt=request.truncate_prompt,
        adapter_scale=request.adapter_scale if request.HasField("adapter_scale") else None,
    )


def generate_response(event: GenerateEvent) -> inference_pb2.GenerateResponse:
    if isinstance(event, Progress):
        progress = inference_pb2.GenerateProgress(step=event.step, total_steps=event.total_steps)
        return inference_pb2.GenerateResponse(progress=progress)
    if isinstance(event, Preview):
        preview = inference_pb2.PreviewImage(
            step=event.step, index=event.index, image=image_proto(event.image)
        )
        return inference_pb2.GenerateResponse(preview=preview)
    if isinstance(event, FinalImage):
        image = inference_pb2.GeneratedImage(
            index=event.index, image=image_proto(event.image), seed=event.seed
        )
        return inference_pb2.GenerateResponse(image=image)
    raise TypeError(f"unknown event {event!r}")


def export_response(part: ExportPart) -> inference_pb2.ExportModelResponse:
    if isinstance(part, Chunk):
        return inference_pb2.ExportModelResponse(chunk=part.data)
    if isinstance(part, FileStart):
        return inference_pb2.ExportModelResponse(file=export_file_proto(part.file))
    if isinstance(part, ExportPlan):
        manifest = inference_pb2.ExportManifest(
            model=model_proto(part.manifest), files=[export_file_proto(f) for f in part.files]
        )
        return inference_pb2.ExportModelResponse(manifest=manifest)
    raise TypeError(f"unknown export part {part!r}")


def export_file_proto(exported: ExportedFile) -> inference_pb2.ExportFile:
    return inference_pb2.ExportFile(path=exported.path, sha256=exported.sha256, size_bytes=exported.size)


def image_proto(image: EncodedImage) -> common_pb2.Image:
    return common_pb2.Image(
        data=image.data,
        format=vocabulary.image_format_value(image.format),
        width=image.width,
        height=image.height,
    )
