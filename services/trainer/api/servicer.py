"""TrainerService over gRPC: translates protobuf to the core's objects and back, nothing more.

Core calls that touch the store run in worker threads so the event loop keeps serving. Domain
errors raised here (or inside the Watch stream) become status codes in the shared interceptor.
Every call is made for the caller the auth interceptor resolved.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc.aio
from dreambooth.v1 import trainer_pb2, trainer_pb2_grpc

from services.common.auth import caller
from services.common.errors import InvalidArgument
from services.common.model_proto import model_proto
from services.common.streams import with_idle_timeout
from services.trainer.api import convert
from services.trainer.jobs.core import TrainerCore


class TrainerServicer(trainer_pb2_grpc.TrainerServiceServicer):
    def __init__(self, core: TrainerCore) -> None:
        self.core = core

    async def UploadImages(
        self,
        request_iterator: AsyncIterator[trainer_pb2.UploadImagesRequest],
        context: grpc.aio.ServicerContext,
    ) -> trainer_pb2.UploadImagesResponse:
        limits = self.core.upload_limits
        with self.core.uploads.stream():
            upload = self.core.new_upload()
            async for request in with_idle_timeout(request_iterator, limits.idle_seconds, "UploadImages"):
                part = request.WhichOneof("part")
                if part == "image_header":
                    upload.start_image(request.image_header.filename, request.image_header.size_bytes)
                elif part == "chunk":
                    upload.add_chunk(request.chunk)
                else:
                    raise InvalidArgument("part", "each message must carry an image_header or a chunk")
            loop = asyncio.get_running_loop()
            pool = self.core.uploads.decode_executor  # not the RPC threads: decoding is heavy
            info = await loop.run_in_executor(pool, self.core.finish_upload, upload, caller())
        return trainer_pb2.UploadImagesResponse(dataset=convert.dataset_to_proto(info))

    async def CreateTrainingJob(
        self, request: trainer_pb2.CreateTrainingJobRequest, context: grpc.aio.ServicerContext
    ) -> trainer_pb2.CreateTrainingJobResponse:
        spec = convert.spec_request_from_proto(request.spec)
        job = await asyncio.to_thread(self.core.create_job, spec, request.request_id, caller())
        return trainer_pb2.CreateTrainingJobResponse(training_job=convert.job_to_proto(job))

    async def GetTrainingJob(
        self, request: trainer_pb2.GetTrainingJobRequest, context: grpc.aio.ServicerContext
    ) -> trainer_pb2.GetTrainingJobResponse:
        job = self.core.get_job(request.name, caller())
        return trainer_pb2.GetTrainingJobResponse(training_job=convert.job_to_proto(job))

    async def ListTrainingJobs(
        self, request: trainer_pb2.ListTrainingJobsRequest, context: grpc.aio.ServicerContext
    ) -> trainer_pb2.ListTrainingJobsResponse:
        page = self.core.list_jobs(
            page_size=request.page_size,
            page_token=request.page_token,
            state=convert.state_from_proto(request.state),
            tenant=caller(),
        )
        return trainer_pb2.ListTrainingJobsResponse(
            training_jobs=[convert.job_to_proto(job) for job in page.jobs],
            next_page_token=page.next_page_token,
        )

    async def CancelTrainingJob(
        self, request: trainer_pb2.CancelTrainingJobRequest, context: grpc.aio.ServicerContext
    ) -> trainer_pb2.CancelTrainingJobResponse:
        job = await asyncio.to_thread(self.core.cancel_job, request.name, caller())
        return trainer_pb2.CancelTrainingJobResponse(training_job=convert.job_to_proto(job))

    async def WatchTrainingJob(
        self, request: trainer_pb2.WatchTrainingJobRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[trainer_pb2.WatchTrainingJobResponse]:
        if request.after_sequence < 0:
            raise InvalidArgument("after_sequence", f"must be >= 0, got {request.after_sequence}")
        event_log = await asyncio.to_thread(self.core.event_log, request.name, caller())
        async for event in event_log.watch(request.after_sequence):
            yield convert.event_to_proto(event)

    async def DownloadTrainingJobLogs(
        self, request: trainer_pb2.DownloadTrainingJobLogsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[trainer_pb2.DownloadTrainingJobLogsResponse]:
        parts = await asyncio.to_thread(self.core.training_logs, request.name, caller())
        try:
            while (part := await asyncio.to_thread(next, parts, None)) is not None:
                yield convert.logs_part_to_proto(part)
        finally:
            await asyncio.to_thread(parts.close)  # removes its copy of the files at once

    async def GetUsage(
        self, request: trainer_pb2.GetUsageRequest, context: grpc.aio.ServicerContext
    ) -> trainer_pb2.GetUsageResponse:
        usage = await asyncio.to_thread(self.core.usage, caller())
        return convert.usage_to_proto(usage)

    async def DeleteTrainingJob(
        self, request: trainer_pb2.DeleteTrainingJobRequest, context: grpc.aio.ServicerContext
    ) -> trainer_pb2.DeleteTrainingJobResponse:
        job = await asyncio.to_thread(self.core.delete_job, request.name, caller())
        return trainer_pb2.DeleteTrainingJobResponse(training_job=convert.job_to_proto(job))

    async def DeleteDataset(
        self, request: trainer_pb2.DeleteDatasetRequest, context: grpc.aio.ServicerContext
    ) -> trainer_pb2.DeleteDatasetResponse:
        info = await asyncio.to_thread(self.core.delete_dataset, request.name, caller())
        return trainer_pb2.DeleteDatasetResponse(dataset=convert.dataset_to_proto(info))

    async def DeleteModel(
        self, request: trainer_pb2.DeleteModelRequest, context: grpc.aio.ServicerContext
    ) -> trainer_pb2.DeleteModelResponse:
        manifest = await asyncio.to_thread(self.core.delete_model, request.name, caller())
        return trainer_pb2.DeleteModelResponse(model=model_proto(manifest))
