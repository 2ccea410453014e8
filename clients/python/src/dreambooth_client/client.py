"""The synchronous SDK: one object that talks to the trainer and the inference service.

    with DreamBoothClient() as client:
        dataset = client.upload_images("photos/")
        job = client.create_training_job(base_model="tiny-sd", dataset=dataset,
                                         instance_prompt="a photo of sks dog")
        job = client.wait(job)
        for image in client.generate(job.model, "a photo of sks dog on the moon", seed=1):
            ...  # image.data (PNG bytes), image.seed

Every failure is a `DreamBoothError` subclass (errors.py). Idempotent calls are retried with
backoff on UNAVAILABLE; a create is idempotent because it always carries a `request_id`.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc
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
    sync_channel,
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


class DreamBoothClient:
    """Sync client. Addresses are `host:port` strings or ready `grpc.Channel`s (not closed here)."""

    def __init__(
        self,
        trainer: str | grpc.Channel | None = DEFAULT_TRAINER,
        inference: str | grpc.Channel | None = DEFAULT_INFERENCE,
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
        self.timeout = timeout  # per attempt of a unary call; streams take their own
        self.retry = retry or RetryPolicy()
        self.watch_retry = watch_retry or WATCH_RETRY
        self._metadata = call_metadata(api_key, metadata)
        self._owned: list[grpc.Channel] = []
        self._trainer = self._open(trainer, config, trainer_pb2_grpc.TrainerServiceStub)
        self._inference = self._open(inference, config, inference_pb2_grpc.InferenceServiceStub)

    @classmethod
    def from_env(cls, **kwargs: Any) -> DreamBoothClient:
        """Addresses and API key from DREAMBOOTH_TRAINER_ADDRESS, DREAMBOOTH_INFERENCE_ADDRESS and
        DREAMBOOTH_API_KEY (else the defaults); `kwargs` override, as in the constructor."""
        kwargs.setdefault("trainer", env_address(TRAINER_ADDRESS_ENV, DEFAULT_TRAINER))
        kwargs.setdefault("inference", env_address(INFERENCE_ADDRESS_ENV, DEFAULT_INFERENCE))
        kwargs.setdefault("api_key", os.environ.get(API_KEY_ENV) or None)
        return cls(**kwargs)

    def _open(
        self, target: str | grpc.Channel | None, config: ChannelConfig, stub: Callable[[Any], T]
    ) -> T | None:
        if target is None:
            return None
        if isinstance(target, str):
            channel = sync_channel(target, config)
            self._owned.append(channel)
        else:
            channel = target
        return stub(channel)

    # ------------------------------------------------------------ lifecycle

    def close(self) -> None:
        for channel in self._owned:
            channel.close()
        self._owned.clear()

    def __enter__(self) -> DreamBoothClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------------ plumbing

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

    def _call(self, attempt: Callable[[], T], *, idempotent: bool = True) -> T:
        """Run one RPC attempt-by-attempt: retry UNAVAILABLE when idempotent, translate errors."""
        backoff = Backoff(self.retry)
        while True:
            try:
                return attempt()
            except grpc.RpcError as err:
                delay = backoff.next_delay() if idempotent and is_retryable(err) else None
                if delay is None:
                    raise error_from_rpc(err) from err
            time.sleep(delay)

    def _unary(self, method: Callable[..., T], request: Any, timeout: float | None = None) -> T:
        deadline = self.timeout if timeout is None else timeout
        return self._call(lambda: method(request, timeout=deadline, metadata=self._metadata))

    # ------------------------------------------------------------ datasets

    def upload_images(
        self,
        images: ImageInput | Iterable[ImageInput],
        *,
        chunk_size: int = messages.CHUNK_SIZE,
        timeout: float | None = None,
    ) -> trainer_pb2.Dataset:
        """Upload image files (a directory means its image files), bytes, or (name, bytes) pairs.

        The dataset is content-addressed, so a retried upload lands on the same dataset.
        `timeout` bounds each attempt (default: none, large uploads take what they take).
        """
        sources = messages.collect_image_sources(images)
        response = self._call(
            lambda: self.trainer_stub.UploadImages(
                messages.iter_upload_requests(sources, chunk_size), timeout=timeout, metadata=self._metadata
            )
        )
        return response.dataset

    def delete_dataset(self, dataset: Any, *, timeout: float | None = None) -> trainer_pb2.Dataset:
        """Delete a dataset (refused while an unfinished job uses it); returns it as it was."""
        request = trainer_pb2.DeleteDatasetRequest(name=messages.dataset_name(dataset))
        return self._unary(self.trainer_stub.DeleteDataset, request, timeout).dataset

    # ------------------------------------------------------------ training jobs

    def create_training_job(
        self,
        spec: trainer_pb2.TrainingJobSpec | Mapping[str, Any] | None = None,
        *,
        request_id: str | None = None,
        timeout: float | None = None,
        **fields: Any,
    ) -> trainer_pb2.TrainingJob:
        """Create a job from spec fields (proto names, or aliases steps/lr/workers/prior_preservation).

        `request_id` defaults to a fresh uuid4 reused by every retry of this call, so a retry
        after a lost response returns the job the first attempt created instead of a second one.
        """
        request = trainer_pb2.CreateTrainingJobRequest(
            spec=messages.build_training_spec(spec, **fields), request_id=request_id or str(uuid.uuid4())
        )
        return self._unary(self.trainer_stub.CreateTrainingJob, request, timeout).training_job

    def get_training_job(self, job: Any, *, timeout: float | None = None) -> trainer_pb2.TrainingJob:
        request = trainer_pb2.GetTrainingJobRequest(name=messages.job_name(job))
        return self._unary(self.trainer_stub.GetTrainingJob, request, timeout).training_job

    def list_training_jobs(
        self, *, state: Any = None, page_size: int = 0, timeout: float | None = None
    ) -> Iterator[trainer_pb2.TrainingJob]:
        """Every job (newest first), fetching pages lazily; `state` filters by state name or number."""
        request = trainer_pb2.ListTrainingJobsRequest(
            page_size=page_size,
            state=messages.parse_job_state(state),  # type: ignore[arg-type]
        )
        while True:
            response = self._unary(self.trainer_stub.ListTrainingJobs, request, timeout)
            yield from response.training_jobs
            if not response.next_page_token:
                return
            request.page_token = response.next_page_token

    def cancel_training_job(self, job: Any, *, timeout: float | None = None) -> trainer_pb2.TrainingJob:
        """Cancel a job (a finished job comes back unchanged); safe to retry."""
        request = trainer_pb2.CancelTrainingJobRequest(name=messages.job_name(job))
        return self._unary(self.trainer_stub.CancelTrainingJob, request, timeout).training_job

    def delete_training_job(self, job: Any, *, timeout: float | None = None) -> trainer_pb2.TrainingJob:
        """Delete a job and everything it stored but its model (a running job is cancelled first)."""
        request = trainer_pb2.DeleteTrainingJobRequest(name=messages.job_name(job))
        return self._unary(self.trainer_stub.DeleteTrainingJob, request, timeout).training_job

    def watch(
        self, job: Any, after_sequence: int = 0, *, timeout: float | None = None
    ) -> Iterator[trainer_pb2.WatchTrainingJobResponse]:
        """The job's events after `after_sequence`, until the job ends.

        When the connection drops (UNAVAILABLE, e.g. the trainer restarts), it reconnects with
        backoff and resumes after the last event it yielded: no event is lost or repeated.
        `timeout` bounds the whole watch. Stopping the iteration cancels the RPC.
        """
        name = messages.job_name(job)
        last = after_sequence
        deadline = None if timeout is None else time.monotonic() + timeout
        backoff = Backoff(self.watch_retry)
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            request = trainer_pb2.WatchTrainingJobRequest(name=name, after_sequence=last)
            call = self.trainer_stub.WatchTrainingJob(request, timeout=remaining, metadata=self._metadata)
            try:
                for event in call:
                    if event.sequence <= last:
                        continue  # a resumed stream never repeats what the caller already saw
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
            time.sleep(delay)

    def wait(
        self,
        job: Any,
        *,
        after_sequence: int = 0,
        timeout: float | None = None,
        on_event: EventCallback | None = None,
        check: bool = False,
    ) -> trainer_pb2.TrainingJob:
        """Block until the job ends and return its final record.

        `on_event` sees every event after `after_sequence`. With `check=True` a job that ends FAILED or
        CANCELLED raises `JobFailedError` (carrying the job) instead of being returned.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        last = after_sequence
        backoff = Backoff(self.watch_retry)
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                message = f"{messages.job_name(job)} still running after {timeout} s"
                raise error_from_code(grpc.StatusCode.DEADLINE_EXCEEDED, message)
            for event in self.watch(job, last, timeout=remaining):
                last = event.sequence
                if on_event is not None:
                    on_event(event)
            final = self.get_training_job(job)
            if messages.is_terminal(final.state):
                break
            # The stream ended without the job ending (a server shutting down): watch on.
            delay = backoff.next_delay()
            if delay is None:
                raise error_from_code(grpc.StatusCode.UNAVAILABLE, f"lost the event stream of {final.name}")
            time.sleep(delay)
        if check and final.state != trainer_pb2.TRAINING_JOB_STATE_SUCCEEDED:
            raise JobFailedError(job_failure_message(final), final)
        return final

    # ------------------------------------------------------------ inference

    def generate(
        self,
        model: Any,
        prompt: str,
        *,
        negative_prompt: str = "",
        num_images: int = 1,
        width: int = 0,
        height: int = 0,
        steps: int = 0,
        guidance_scale: float = 0.0,
        scheduler: Any = None,
        seed: int | None = None,
        preview_interval: int = 0,
        output_format: Any = None,
        truncate_prompt: bool = False,
        adapter_scale: float | None = None,
        on_progress: ProgressCallback | None = None,
        on_preview: PreviewCallback | None = None,
        timeout: float | None = None,
    ) -> list[GeneratedImage]:
        """Sample images; returns (bytes, seed) pairs in request order.

        Zero values take the server's defaults; `scheduler` and `output_format` take names
        ("euler", "jpeg"); `adapter_scale` (LoRA models only, 0..2) sets the adapter's strength
        (None: full strength). `on_progress(step, total)` runs for every denoising step and
        `on_preview(step, index, jpeg)` for every preview (set `preview_interval`). Retried on
        UNAVAILABLE only before the first response (sampling is side-effect free); an exception
        from a callback cancels the RPC and the server stops sampling.
        """
        request = messages.build_generate_request(
            model,
            prompt,
            negative_prompt=negative_prompt,
            num_images=num_images,
            width=width,
            height=height,
            steps=steps,
            guidance_scale=guidance_scale,
            scheduler=scheduler,
            seed=seed,
            preview_interval=preview_interval,
            output_format=output_format,
            truncate_prompt=truncate_prompt,
            adapter_scale=adapter_scale,
        )
        backoff = Backoff(self.retry)
        while True:
            call = self.inference_stub.Generate(request, timeout=timeout, metadata=self._metadata)
            collector = GenerateCollector(on_progress, on_preview)
            try:
                for response in call:
                    collector.add(response)
                return collector.images()
            except grpc.RpcError as err:
                retryable = not collector.received and is_retryable(err)
                delay = backoff.next_delay() if retryable else None
                if delay is None:
                    raise error_from_rpc(err) from err
            finally:
                call.cancel()
            time.sleep(delay)

    def list_models(self, *, page_size: int = 0, timeout: float | None = None) -> Iterator[common_pb2.Model]:
        """Every model in the store (ordered by name), fetching pages lazily."""
        request = inference_pb2.ListModelsRequest(page_size=page_size)
        while True:
            response = self._unary(self.inference_stub.ListModels, request, timeout)
            yield from response.models
            if not response.next_page_token:
                return
            request.page_token = response.next_page_token

    def get_model(self, model: Any, *, timeout: float | None = None) -> common_pb2.Model:
        request = inference_pb2.GetModelRequest(name=messages.model_name(model))
        return self._unary(self.inference_stub.GetModel, request, timeout).model

    # ------------------------------------------------------------ usage

    def get_usage(self, *, timeout: float | None = None) -> trainer_pb2.GetUsageResponse:
        """This key's tenant: training step-seconds, images generated, bytes stored, quotas."""
        return self._unary(self.trainer_stub.GetUsage, trainer_pb2.GetUsageRequest(), timeout)

    # ------------------------------------------------------------ deletes and export

    def delete_model(self, model: Any, *, timeout: float | None = None) -> common_pb2.Model:
        """Delete a model (through the trainer, which knows the jobs using it); returns it as it was.

        Refused (FailedPreconditionError) while an unfinished job trains on it or publishes it, or
        while a LoRA model needs it as its base.
        """
        request = trainer_pb2.DeleteModelRequest(name=messages.model_name(model))
        return self._unary(self.trainer_stub.DeleteModel, request, timeout).model

    def export_model(
        self, model: Any, out_dir: str | os.PathLike[str], *, timeout: float | None = None
    ) -> common_pb2.Model:
        """Download a model into `out_dir` (missing or empty), every file checked against its sha256.

        A base or full fine-tune becomes a diffusers folder for
        `StableDiffusionPipeline.from_pretrained(out_dir)`; a LoRA model becomes
        `pytorch_lora_weights.safetensors` for `pipe.load_lora_weights(out_dir)` on its base.
        The folder appears only once complete. Retried on UNAVAILABLE before the first response.
        """
        request = inference_pb2.ExportModelRequest(name=messages.model_name(model))
        return self._receive_folder(
            self.inference_stub.ExportModel, request, lambda: ExportWriter(Path(out_dir)), timeout
        )

    def download_training_logs(
        self,
        job: Any,
        out_dir: str | os.PathLike[str],
        *,
        overwrite: bool = False,
        timeout: float | None = None,
    ) -> trainer_pb2.TrainingJobLogs:
        """Download a job's TensorBoard event files into `out_dir` (one run's folder), every file
        checked against its sha256: `tensorboard --logdir PARENT` then shows the job as a run.

        `out_dir` must be missing or empty unless `overwrite` (it is then replaced, only once the
        download is complete). FailedPreconditionError while the job has uploaded no logs yet
        (they are uploaded at each checkpoint and when training ends). Retried on UNAVAILABLE
        before the first response.
        """
        request = trainer_pb2.DownloadTrainingJobLogsRequest(name=messages.job_name(job))
        return self._receive_folder(
            self.trainer_stub.DownloadTrainingJobLogs,
            request,
            lambda: TrainingLogsWriter(Path(out_dir), overwrite=overwrite),
            timeout,
        )

    def _receive_folder(
        self,
        method: Callable[..., Any],
        request: Any,
        new_writer: Callable[[], VerifiedFolderWriter],
        timeout: float | None,
    ) -> Any:
        """A stream of files into a folder that appears only once complete (see export.py)."""
        backoff = Backoff(self.retry)
        while True:
            writer = new_writer()
            call = method(request, timeout=timeout, metadata=self._metadata)
            received = False
            try:
                for response in call:
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
            time.sleep(delay)
