"""The SDK's behaviour on the wire: retries, idempotency keys, watch resume, paging, cancellation.

A scripted TrainerService/InferenceService on loopback plays the failures (a dropped watch, an
UNAVAILABLE create) that the real services only show under a crash; the integration tests run the
SDK against the real servers.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from dreambooth.v1 import (
    common_pb2,
    inference_pb2,
    inference_pb2_grpc,
    trainer_pb2,
    trainer_pb2_grpc,
)
from dreambooth_client import (
    AsyncDreamBoothClient,
    DreamBoothClient,
    InvalidArgumentError,
    JobFailedError,
    NotFoundError,
    RetryPolicy,
    UnavailableError,
)

FAST_RETRY = RetryPolicy(max_attempts=4, initial_backoff=0.01, max_backoff=0.02, max_total=10)
SUCCEEDED = trainer_pb2.TRAINING_JOB_STATE_SUCCEEDED


def job(name: str = "trainingJobs/j1", state: int = SUCCEEDED, **kwargs: object) -> trainer_pb2.TrainingJob:
    return trainer_pb2.TrainingJob(name=name, state=state, **kwargs)  # type: ignore[arg-type]


def progress_event(sequence: int) -> trainer_pb2.WatchTrainingJobResponse:
    progress = trainer_pb2.TrainingProgress(step=sequence, total_steps=5, loss=1.0 / sequence)
    return trainer_pb2.WatchTrainingJobResponse(sequence=sequence, progress=progress)


class ScriptedTrainer(trainer_pb2_grpc.TrainerServiceServicer):
    """Records every request; fails the first `unavailable[method]` calls of a method."""

    def __init__(self) -> None:
        self.requests: dict[str, list[object]] = {}
        self.unavailable: dict[str, int] = {}
        self.final_state = SUCCEEDED
        self.watch_cancelled = threading.Event()

    def _record(self, method: str, request: object, context: grpc.ServicerContext) -> None:
        self.requests.setdefault(method, []).append(request)
        self.metadata = dict(context.invocation_metadata())
        if self.unavailable.get(method, 0) > 0:
            self.unavailable[method] -= 1
            context.abort(grpc.StatusCode.UNAVAILABLE, "try again")

    def UploadImages(self, request_iterator, context):
        parts = list(request_iterator)  # consume everything, then fail: the retry must resend it all
        self._record("UploadImages", parts, context)
        data = b"".join(p.chunk for p in parts if p.HasField("chunk"))
        count = sum(p.HasField("image_header") for p in parts)
        dataset = trainer_pb2.Dataset(name="datasets/abc", image_count=count, size_bytes=len(data))
        return trainer_pb2.UploadImagesResponse(dataset=dataset)

    def CreateTrainingJob(self, request, context):
        self._record("CreateTrainingJob", request, context)
        if request.spec.max_train_steps < 0:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "spec.max_train_steps: must be > 0")
        return trainer_pb2.CreateTrainingJobResponse(
            training_job=job(state=trainer_pb2.TRAINING_JOB_STATE_QUEUED, request_id=request.request_id)
        )

    def GetTrainingJob(self, request, context):
        self._record("GetTrainingJob", request, context)
        if request.name != "trainingJobs/j1":
            context.abort(grpc.StatusCode.NOT_FOUND, f"{request.name} not found")
        error = "the dataset vanished" if self.final_state != SUCCEEDED else ""
        final = job(state=self.final_state, model="models/m1", error_message=error)
        return trainer_pb2.GetTrainingJobResponse(training_job=final)

    def ListTrainingJobs(self, request, context):
        self._record("ListTrainingJobs", request, context)
        page = int(request.page_token or 0)
        jobs = [job(f"trainingJobs/p{page}-{i}") for i in range(2)]
        token = str(page + 1) if page < 2 else ""
        return trainer_pb2.ListTrainingJobsResponse(training_jobs=jobs, next_page_token=token)

    def CancelTrainingJob(self, request, context):
        self._record("CancelTrainingJob", request, context)
        cancelled = job(state=trainer_pb2.TRAINING_JOB_STATE_CANCELLED)
        return trainer_pb2.CancelTrainingJobResponse(training_job=cancelled)

    def WatchTrainingJob(self, request, context):
        """Events 1..5; the first stream drops after event 3 (and repeats event 3 when resumed)."""
        self.requests.setdefault("WatchTrainingJob", []).append(request)
        context.add_callback(self.watch_cancelled.set)
        first = len(self.requests["WatchTrainingJob"]) == 1
        start = max(1, request.after_sequence)  # a server may resend the last event: the client skips it
        for sequence in range(start, 6):
            yield progress_event(sequence)
            if first and sequence == 3:
                context.abort(grpc.StatusCode.UNAVAILABLE, "trainer restarting")


class ScriptedInference(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self) -> None:
        self.calls = 0
        self.fail_before_first = 0
        self.fail_after_first = False
        self.cancelled = threading.Event()

    def Generate(self, request, context):
        self.calls += 1
        context.add_callback(self.cancelled.set)
        if self.fail_before_first > 0:
            self.fail_before_first -= 1
            context.abort(grpc.StatusCode.UNAVAILABLE, "loading")
        for step in (1, 2):
            yield inference_pb2.GenerateResponse(
                progress=inference_pb2.GenerateProgress(step=step, total_steps=2)
            )
            if self.fail_after_first:
                context.abort(grpc.StatusCode.UNAVAILABLE, "gone")
        preview = inference_pb2.PreviewImage(step=2, index=0, image=common_pb2.Image(data=b"jpeg"))
        yield inference_pb2.GenerateResponse(preview=preview)
        for index in reversed(range(request.num_images)):  # out of order on purpose
            image = inference_pb2.GeneratedImage(
                index=index, seed=request.seed + index, image=common_pb2.Image(data=f"img{index}".encode())
            )
            yield inference_pb2.GenerateResponse(image=image)

    def ListModels(self, request, context):
        page = int(request.page_token or 0)
        models = [common_pb2.Model(name=f"models/m{page}")]
        return inference_pb2.ListModelsResponse(models=models, next_page_token="1" if page == 0 else "")

    def GetModel(self, request, context):
        if request.name != "models/m0":
            context.abort(grpc.StatusCode.NOT_FOUND, f"{request.name} not found")
        return inference_pb2.GetModelResponse(model=common_pb2.Model(name=request.name))


@pytest.fixture
def scripted() -> Iterator[tuple[ScriptedTrainer, ScriptedInference, str]]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    trainer, inference = ScriptedTrainer(), ScriptedInference()
    trainer_pb2_grpc.add_TrainerServiceServicer_to_server(trainer, server)
    inference_pb2_grpc.add_InferenceServiceServicer_to_server(inference, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield trainer, inference, f"127.0.0.1:{port}"
    server.stop(grace=None)


@pytest.fixture
def client(scripted) -> Iterator[DreamBoothClient]:
    _, _, address = scripted
    with DreamBoothClient(address, address, api_key="k-123", retry=FAST_RETRY, watch_retry=FAST_RETRY) as c:
        yield c


def test_create_retries_unavailable_with_the_same_request_id(scripted, client) -> None:
    trainer, _, _ = scripted
    trainer.unavailable["CreateTrainingJob"] = 2
    created = client.create_training_job(base_model="m", dataset="d", instance_prompt="sks")
    ids = [r.request_id for r in trainer.requests["CreateTrainingJob"]]
    assert len(ids) == 3 and len(set(ids)) == 1 and ids[0]
    assert created.request_id == ids[0]
    assert trainer.metadata["authorization"] == "Bearer k-123"
    client.create_training_job(base_model="m", dataset="d", instance_prompt="sks", request_id="mine")
    assert trainer.requests["CreateTrainingJob"][-1].request_id == "mine"


def test_retries_stop_after_the_policy_and_raise_unavailable(scripted, client) -> None:
    trainer, _, _ = scripted
    trainer.unavailable["GetTrainingJob"] = 100
    with pytest.raises(UnavailableError, match="try again"):
        client.get_training_job("j1")
    assert len(trainer.requests["GetTrainingJob"]) == FAST_RETRY.max_attempts


def test_server_errors_are_not_retried_and_keep_the_message(scripted, client) -> None:
    trainer, _, _ = scripted
    with pytest.raises(InvalidArgumentError) as caught:
        client.create_training_job(base_model="m", dataset="d", instance_prompt="sks", max_train_steps=-1)
    assert caught.value.field == "spec.max_train_steps"
    assert len(trainer.requests["CreateTrainingJob"]) == 1
    with pytest.raises(NotFoundError, match="trainingJobs/nope not found"):
        client.get_training_job("nope")


def test_upload_resends_every_chunk_on_retry(scripted, client, tmp_path) -> None:
    trainer, _, _ = scripted
    (tmp_path / "a.png").write_bytes(b"a" * (1024 * 1024 + 5))
    (tmp_path / "b.png").write_bytes(b"b" * 10)
    trainer.unavailable["UploadImages"] = 1
    dataset = client.upload_images(tmp_path)
    assert (dataset.name, dataset.image_count, dataset.size_bytes) == ("datasets/abc", 2, 1024 * 1024 + 15)
    first, second = trainer.requests["UploadImages"]
    assert [p.WhichOneof("part") for p in first] == [p.WhichOneof("part") for p in second]
    assert max(len(p.chunk) for p in second) == 1024 * 1024


def test_list_iterates_every_page(scripted, client) -> None:
    trainer, _, _ = scripted
    names = [j.name for j in client.list_training_jobs(state="succeeded", page_size=2)]
    assert names == [f"trainingJobs/p{p}-{i}" for p in range(3) for i in range(2)]
    requests = trainer.requests["ListTrainingJobs"]
    assert [r.page_token for r in requests] == ["", "1", "2"]
    assert all(r.state == SUCCEEDED and r.page_size == 2 for r in requests)
    assert [m.name for m in client.list_models()] == ["models/m0", "models/m1"]
    assert client.get_model("m0").name == "models/m0"


def test_watch_resumes_after_the_last_event_it_yielded(scripted, client) -> None:
    trainer, _, _ = scripted
    sequences = [event.sequence for event in client.watch("j1")]
    assert sequences == [1, 2, 3, 4, 5]
    assert [r.after_sequence for r in trainer.requests["WatchTrainingJob"]] == [0, 3]


def test_watch_from_a_sequence_and_early_stop_cancels_the_rpc(scripted, client) -> None:
    trainer, _, _ = scripted
    trainer.requests["WatchTrainingJob"] = [object()]  # not the first stream: no drop
    stream = client.watch("trainingJobs/j1", after_sequence=4)
    assert next(stream).sequence == 5
    stream.close()
    assert trainer.watch_cancelled.wait(10)


def test_wait_returns_the_final_job_and_check_raises_on_failure(scripted, client) -> None:
    trainer, _, _ = scripted
    seen: list[int] = []
    final = client.wait("j1", on_event=lambda e: seen.append(e.sequence))
    assert (final.state, final.model, seen) == (SUCCEEDED, "models/m1", [1, 2, 3, 4, 5])
    trainer.final_state = trainer_pb2.TRAINING_JOB_STATE_FAILED
    with pytest.raises(JobFailedError, match="trainingJobs/j1 ended FAILED: the dataset vanished") as caught:
        client.wait("j1", after_sequence=5, check=True)
    assert caught.value.job.state == trainer_pb2.TRAINING_JOB_STATE_FAILED


def test_generate_orders_images_and_calls_back(scripted, client) -> None:
    _, inference, _ = scripted
    inference.fail_before_first = 1  # nothing received yet: safe to retry
    progress: list[tuple[int, int]] = []
    previews: list[tuple[int, int, bytes]] = []
    images = client.generate(
        "m0",
        "a photo of sks dog",
        num_images=3,
        seed=10,
        on_progress=lambda s, t: progress.append((s, t)),
        on_preview=lambda s, i, d: previews.append((s, i, d)),
    )
    assert [(data, seed) for data, seed in images] == [(b"img0", 10), (b"img1", 11), (b"img2", 12)]
    assert progress == [(1, 2), (2, 2)]
    assert previews == [(2, 0, b"jpeg")]
    assert inference.calls == 2


def test_generate_is_not_retried_once_the_stream_started(scripted, client) -> None:
    _, inference, _ = scripted
    inference.fail_after_first = True
    with pytest.raises(UnavailableError, match="gone"):
        client.generate("m0", "p")
    assert inference.calls == 1


def test_an_exception_in_a_callback_cancels_the_generation(scripted, client) -> None:
    _, inference, _ = scripted

    def stop(step: int, total: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        client.generate("m0", "p", on_progress=stop)
    assert inference.cancelled.wait(10)


def test_cancel_and_missing_address(scripted) -> None:
    _, _, address = scripted
    with DreamBoothClient(address, None) as only_trainer:
        cancelled = only_trainer.cancel_training_job("j1")
        assert cancelled.state == trainer_pb2.TRAINING_JOB_STATE_CANCELLED
        with pytest.raises(ValueError, match="no inference address"):
            only_trainer.get_model("m0")


def test_async_client_has_the_same_behaviour(scripted) -> None:
    trainer, _, address = scripted
    trainer.unavailable["CreateTrainingJob"] = 1

    async def scenario() -> None:
        async with AsyncDreamBoothClient(
            address, address, retry=FAST_RETRY, watch_retry=FAST_RETRY
        ) as client:
            created = await client.create_training_job(base_model="m", dataset="d", instance_prompt="sks")
            assert created.request_id == trainer.requests["CreateTrainingJob"][0].request_id
            assert [e.sequence async for e in client.watch("j1")] == [1, 2, 3, 4, 5]
            assert (await client.wait("j1", after_sequence=5)).model == "models/m1"
            assert len([j async for j in client.list_training_jobs()]) == 6
            images = await client.generate("m0", "p", num_images=2, seed=3)
            assert [seed for _, seed in images] == [3, 4]
            assert [m.name async for m in client.list_models()] == ["models/m0", "models/m1"]
            with pytest.raises(NotFoundError):
                await client.get_model("nope")

    asyncio.run(scenario())


def test_from_env_reads_addresses_and_api_key(scripted, monkeypatch) -> None:
    trainer, _, address = scripted
    monkeypatch.setenv("DREAMBOOTH_TRAINER_ADDRESS", address)
    monkeypatch.setenv("DREAMBOOTH_INFERENCE_ADDRESS", address)
    monkeypatch.setenv("DREAMBOOTH_API_KEY", "from-env")
    with DreamBoothClient.from_env() as client:
        assert client.get_training_job("j1").name == "trainingJobs/j1"
        assert client.get_model("m0").name == "models/m0"
    assert trainer.metadata["authorization"] == "Bearer from-env"
