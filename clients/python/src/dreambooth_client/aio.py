"""The asyncio SDK: the same calls as `DreamBoothClient`, awaited (streams are async iterators).

    async with AsyncDreamBoothClient() as client:
        job = await client.create_training_job(...)
        async for event in client.watch(job):
            ...

Request building, retry policy and error translation are shared with the sync client.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc
import grpc.aio
from dreambooth.v1 import common_pb2, inference_pb2, inference_pb2_grpc, trainer_pb2, trainer_pb2_grpc

from dreambooth_client import messages
from dreambooth_client.channels import (
    API_KEY_ENV,
    DEFAULT_INFERENCE,
    DEFAULT_TRAINER,
    INFERENCE_ADDRESS_ENV,
    TRAINER_ADDRESS_ENV,
    ChannelConfig,
    call_metadata,
    env_address,
)
from dreambooth_client.errors import JobFailedError, error_from_code, error_from_rpc
from dreambooth_client.export import ExportWriter, TrainingLogsWriter, VerifiedFolderWriter
from dreambooth_client.messages import GeneratedImage, ImageInput
from dreambooth_client.retry import Backoff, RetryPolicy, is_retryable
from dreambooth_client.streams import (
    WATCH_RETRY,
    EventCallback,
    GenerateCollector,
    PreviewCallback,
    ProgressCallback,
    job_failure_message,
)

T = TypeVar("T")


def aio_channel(address: str, config: ChannelConfig) -> grpc.aio.Channel:
    if config.tls:
        return grpc.aio.secure_channel(address, config.credentials(), options=list(config.options))
    return grpc.aio.insecure_channel(address, options=list(config.options))


class AsyncDreamBoothClient:
    """Asyncio client; create it inside the event loop that uses it."""

    def __init__(
        self,
        trainer: str | grpc.aio.Channel | None = DEFAULT_TRAINER,
        inference: str | grpc.aio.Channel | None = DEFAULT_INFERENCE,
        *,
        api_key: str | None = None,
        tls: bool = False,
        ca_cert: str | os.PathLike[str] | bytes | None = None,
        client_cert: str | os.PathLike[str] | bytes | None = None,
        client_key: str | os.PathLike[str] | bytes | None = None,
        root_certificates: bytes | None = None,
        timeout: float | None = 30.0,
        retry: RetryPolicy | None = None,
        watch_retry: RetryPolicy | None = None,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> None:
        # TLS: `ca_cert` (PEM bytes or a path; implies tls) is the CA to trust, None = the system's;
        # `client_cert` + `client_key` are presented to servers that require mTLS.
        # `root_certificates` is the older name of `ca_cert`.
        config = ChannelConfig.create(
            tls=tls, ca_cert=ca_cert or root_certificates, client_cert=client_cert, client_key=client_key
        )
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self.watch_retry = watch_retry or WATCH_RETRY
        self._metadata = call_metadata(api_key, metadata)
        self._owned: list[grpc.aio.Channel] = []
        self._trainer = self._open(trainer, config, trainer_pb2_grpc.TrainerServiceStub)
        self._inference = self._open(inference, config, inference_pb2_grpc.InferenceServiceStub)

    @classmethod
    def from_env(cls, **kwargs: Any) -> AsyncDreamBoothClient:
        """Addresses and API key from DREAMBOOTH_TRAINER_ADDRESS, DREAMBOOTH_INFERENCE_ADDRESS and
        DREAMBOOTH_API_KEY (else the defaults); `kwargs` override, as in the constructor."""
        kwargs.setdefault("trainer", env_address(TRAINER_ADDRESS_ENV, DEFAULT_TRAINER))
        kwargs.setdefault("inference", env_address(INFERENCE_ADDRESS_ENV, DEFAULT_INFERENCE))
        kwargs.setdefault("api_key", os.environ.get(API_KEY_ENV) or None)
        return cls(**kwargs)

    def _open(
        self, target: str | grpc.aio.Channel | None, config: ChannelConfig, stub: Callable[[Any], T]
    ) -> T | None:
        if target is None:
            return None
        if isinstance(target, str):
            channel = aio_channel(target, config)
            self._owned.append(channel)
        else:
            channel = target
        return stub(channel)

    async def close(self) -> None:
        for channel in self._owned:
            await channel.close()
        self._owned.clear()

    async def __aenter__(self) -> AsyncDreamBoothClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def trainer_stub(self) -> trainer_pb2_grpc.TrainerServiceStub:
        if self._trainer is None:
            raise ValueError("this client has no trainer address")
        return self._trainer

    @property
    def inference_stub(self) -> inference_pb2_grpc.InferenceServiceStub:
        if self._inference is None:
            raise ValueError("this client has no inference address")
        return self._inference

    async def _call(self, attempt: Callable[[], Awaitable[T]]) -> T:
        backoff = Backoff(self.retry)
        while True:
            try:
                return await attempt()
            except grpc.RpcError as err:
                delay = backoff.next_delay() if is_retryable(err) else None
                if delay is None:
                    raise error_from_rpc(err) from err
            await asyncio.sleep(delay)

    async def _unary(self, method: Callable[..., Awaitable[T]], request: Any, timeout: float | None) -> T:
        deadline = self.timeout if timeout is None else timeout
        return await self._call(lambda: method(request, timeout=deadline, metadata=self._metadata))

    # ------------------------------------------------------------ datasets and jobs

    async def upload_images(
        self,
        images: ImageInput | Iterable[ImageInput],
        *,
        chunk_size: int = messages.CHUNK_SIZE,
        timeout: float | None = None,
    ) -> trainer_pb2.Dataset:
        sources = messages.collect_image_sources(images)
        response = await self._call(
            lambda: self.trainer_stub.UploadImages(
                messages.iter_upload_requests(sources, chunk_size), timeout=timeout, metadata=self._metadata
            )
        )
        return response.dataset

    async def delete_dataset(self, dataset: Any, *, timeout: float | None = None) -> trainer_pb2.Dataset:
        """Like `DreamBoothClient.delete_dataset`."""
        request = trainer_pb2.DeleteDatasetRequest(name=messages.dataset_name(dataset))
        return (await self._unary(self.trainer_stub.DeleteDataset, request, timeout)).dataset

    async def create_training_job(
        self,
        spec: trainer_pb2.TrainingJobSpec | Mapping[str, Any] | None = None,
        *,
        request_id: str | None = None,
        timeout: float | None = None,
        **fields: Any,
    ) -> trainer_pb2.TrainingJob:
        request = trainer_pb2.CreateTrainingJobRequest(
            spec=messages.build_training_spec(spec, **fields), request_id=request_id or str(uuid.uuid4())
        )
        return (await self._unary(self.trainer_stub.CreateTrainingJob, request, timeout)).training_job

    async def get_training_job(self, job: Any, *, timeout: float | None = None) -> trainer_pb2.TrainingJob:
        request = trainer_pb2.GetTrainingJobRequest(name=messages.job_name(job))
        return (await self._unary(self.trainer_stub.GetTrainingJob, request, timeout)).training_job

    async def list_training_jobs(
        self, *, state: Any = None, page_size: int = 0, timeout: float | None = None
    ) -> AsyncIterator[trainer_pb2.TrainingJob]:
        request = trainer_pb2.ListTrainingJobsRequest(
            page_size=page_size,
            state=messages.parse_job_state(state),  # type: ignore[arg-type]
        )
        while True:
            response = await self._unary(self.trainer_stub.ListTrainingJobs, request, timeout)
            for job in response.training_jobs:
                yield job
            if not response.next_page_token:
                return
            request.page_token = response.next_page_token

    async def cancel_training_job(self, job: Any, *, timeout: float | None = None) -> trainer_pb2.TrainingJob:
        request = trainer_pb2.CancelTrainingJobRequest(name=messages.job_name(job))
        return (await self._unary(self.trainer_stub.CancelTrainingJob, request, timeout)).training_job

    async def delete_training_job(self, job: Any, *, timeout: float | None = None) -> trainer_pb2.TrainingJob:
        """Like `DreamBoothClient.delete_training_job`."""
        request = trainer_pb2.DeleteTrainingJobRequest(name=messages.job_name(job))
        return (await self._unary(self.trainer_stub.DeleteTrainingJob, request, timeout)).training_job

    async def watch(
        self, job: Any, after_sequence: int = 0, *, timeout: float | None = None
    ) -> AsyncIterator[trainer_pb2.WatchTrainingJobResponse]:
        """Like `DreamBoothClient.watch`: resumes after the last event on UNAVAILABLE."""
        name = messages.job_name(job)
        last = after_sequence
        deadline = None if timeout is None else time.monotonic() + timeout
        backoff = Backoff(self.watch_retry)
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            request = trainer_pb2.WatchTrainingJobRequest(name=name, after_sequence=last)
            call = self.trainer_stub.WatchTrainingJob(request, timeout=remaining, metadata=self._metadata)
            try:
                async for event in call:
                    if event.sequence <= last:
                        continue
                    last = event.sequence
                    backoff.reset()
                    yield event
                return
            except grpc.RpcError as err:
                delay = backoff.next_delay() if is_retryable(err) else None
                if delay is None:
                    raise error_from_rpc(err) from err
            finally:
                call.cancel()
            await asyncio.sleep(delay)

    async def wait(
        self,
        job: Any,
        *,
        after_sequence: int = 0,
        timeout: float | None = None,
        on_event: EventCallback | None = None,
        check: bool = False,
    ) -> trainer_pb2.TrainingJob:
        deadline = None if timeout is None else time.monotonic() + timeout
        last = after_sequence
        backoff = Backoff(self.watch_retry)
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                message = f"{messages.job_name(job)} still running after {timeout} s"
                raise error_from_code(grpc.StatusCode.DEADLINE_EXCEEDED, message)
            async for event in self.watch(job, last, timeout=remaining):
                last = event.sequence
                if on_event is not None:
                    on_event(event)
            final = await self.get_training_job(job)
            if messages.is_terminal(final.state):
                break
            delay = backoff.next_delay()
            if delay is None:
                raise error_from_code(grpc.StatusCode.UNAVAILABLE, f"lost the event stream of {final.name}")
            await asyncio.sleep(delay)
        if check and final.state != trainer_pb2.TRAINING_JOB_STATE_SUCCEEDED:
            raise JobFailedError(job_failure_message(final), final)
        return final

    # ------------------------------------------------------------ inference

    async def generate(
        self,
        model: Any,
        prompt: str,
        *,
        on_progress: ProgressCallback | None = None,
        on_preview: PreviewCallback | None = None,
        timeout: float | None = None,
        **options: Any,
    ) -> list[GeneratedImage]:
        """Like `DreamBoothClient.generate` (same keyword options)."""
        request = messages.build_generate_request(model, prompt, **options)
        backoff = Backoff(self.retry)
        while True:
            call = self.inference_stub.Generate(request, timeout=timeout, metadata=self._metadata)
            collector = GenerateCollector(on_progress, on_preview)
            try:
                async for response in call:
                    collector.add(response)
                return collector.images()
            except grpc.RpcError as err:
                delay = backoff.next_delay() if not collector.received and is_retryable(err) else None
                if delay is None:
                    raise error_from_rpc(err) from err
            finally:
                call.cancel()
            await asyncio.sleep(delay)

    async def list_models(
        self, *, page_size: int = 0, timeout: float | None = None
    ) -> AsyncIterator[common_pb2.Model]:
        request = inference_pb2.ListModelsRequest(page_size=page_size)
        while True:
            response = await self._unary(self.inference_stub.ListModels, request, timeout)
            for model in response.models:
                yield model
            if not response.next_page_token:
                return
            request.page_token = response.next_page_token

    async def get_model(self, model: Any, *, timeout: float | None = None) -> common_pb2.Model:
        request = inference_pb2.GetModelRequest(name=messages.model_name(model))
        return (await self._unary(self.inference_stub.GetModel, request, timeout)).model

    async def get_usage(self, *, timeout: float | None = None) -> trainer_pb2.GetUsageResponse:
        """This key's tenant: training step-seconds, images generated, bytes stored, quotas."""
        return await self._unary(self.trainer_stub.GetUsage, trainer_pb2.GetUsageRequest(), timeout)

    async def delete_model(self, model: Any, *, timeout: float | None = None) -> common_pb2.Model:
        """Like `DreamBoothClient.delete_model`."""
        request = trainer_pb2.DeleteModelRequest(name=messages.model_name(model))
        return (await self._unary(self.trainer_stub.DeleteModel, request, timeout)).model

    async def export_model(
        self, model: Any, out_dir: str | os.PathLike[str], *, timeout: float | None = None
    ) -> common_pb2.Model:
        """Like `DreamBoothClient.export_model` (files are written from the event loop's thread)."""
        request = inference_pb2.ExportModelRequest(name=messages.model_name(model))
        return await self._receive_folder(
            self.inference_stub.ExportModel, request, lambda: ExportWriter(Path(out_dir)), timeout
        )

    async def download_training_logs(
        self,
        job: Any,
        out_dir: str | os.PathLike[str],
        *,
        overwrite: bool = False,
        timeout: float | None = None,
    ) -> trainer_pb2.TrainingJobLogs:
        """Like `DreamBoothClient.download_training_logs` (files are written from the event loop's
        thread)."""
        request = trainer_pb2.DownloadTrainingJobLogsRequest(name=messages.job_name(job))
        return await self._receive_folder(
            self.trainer_stub.DownloadTrainingJobLogs,
            request,
            lambda: TrainingLogsWriter(Path(out_dir), overwrite=overwrite),
            timeout,
        )

    async def _receive_folder(
        self,
        method: Callable[..., Any],
        request: Any,
        new_writer: Callable[[], VerifiedFolderWriter],
        timeout: float | None,
    ) -> Any:
        backoff = Backoff(self.retry)
        while True:
            writer = new_writer()
            call = method(request, timeout=timeout, metadata=self._metadata)
            received = False
            try:
                async for response in call:
                    received = True
                    writer.add(response)
                return writer.finish()
            except grpc.RpcError as err:
                writer.abort()
                delay = backoff.next_delay() if not received and is_retryable(err) else None
                if delay is None:
                    raise error_from_rpc(err) from err
            except BaseException:
                writer.abort()
                raise
            finally:
                call.cancel()
            await asyncio.sleep(delay)
