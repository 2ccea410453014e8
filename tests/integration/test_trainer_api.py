"""TrainerService over real gRPC on loopback (S3 store): uploads and every bad input.

Nothing here trains: every request is refused (or only stores a dataset) before a job exists,
so these tests need neither Ray nor the prior-generation service.
"""

from __future__ import annotations

import threading
import time
import urllib.request
from collections.abc import Callable, Iterator

import grpc
import pytest
from dreambooth.v1 import trainer_pb2

from services.trainer.jobs.datasets import DatasetStore
from tests.fixtures.trainer_server import (
    RunningTrainer,
    encode,
    make_image,
    make_png,
    tiny_spec,
    upload_requests,
)


@pytest.fixture
def trainer(start_trainer: Callable[..., RunningTrainer]) -> RunningTrainer:
    return start_trainer(max_upload_images=5, max_image_bytes=200_000, max_image_pixels=1_000_000)


@pytest.fixture
def dataset(trainer: RunningTrainer) -> str:
    return trainer.upload([make_png(0), make_png(1)]).name


def rpc_error(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def test_upload_is_content_addressed(trainer: RunningTrainer) -> None:
    images = [make_png(0), encode(make_image(1), "JPEG", quality=95), make_png(2)]
    first = trainer.upload(images)
    assert first.name.startswith("datasets/") and len(first.name) == len("datasets/") + 64
    assert first.image_count == 3 and first.size_bytes > 0
    assert first.create_time.seconds > 0
    again = trainer.stub.UploadImages(upload_requests(images, chunk_bytes=1000)).dataset
    assert again == first
    stored = DatasetStore(trainer.core.store).get(first.name.removeprefix("datasets/"))
    assert stored.image_count == 3


def _upload_error(
    trainer: RunningTrainer, requests: Iterator[trainer_pb2.UploadImagesRequest]
) -> grpc.RpcError:
    return rpc_error(lambda: trainer.stub.UploadImages(requests, timeout=30))


BAD_UPLOADS: list[tuple[str, Callable[[], Iterator[trainer_pb2.UploadImagesRequest]], str]] = [
    ("no images", lambda: iter(()), "images:"),
    ("too many", lambda: upload_requests([make_png(i) for i in range(6)]), "images: too many"),
    ("undecodable", lambda: upload_requests([make_png(0), b"this is not an image"]), "images[1]:"),
    ("oversized bytes", lambda: upload_requests([make_png(0), b"\x89PNG" + b"0" * 300_000]), "images[1]:"),
    ("too many pixels", lambda: upload_requests([encode(make_image(0, (1200, 1000)))]), "images[0]:"),
    (
        "chunk over 1 MiB",
        lambda: iter(
            [
                trainer_pb2.UploadImagesRequest(image_header=trainer_pb2.ImageHeader()),
                trainer_pb2.UploadImagesRequest(chunk=b"0" * (1024 * 1024 + 1)),
            ]
        ),
        "chunk:",
    ),
    ("chunk before header", lambda: iter([trainer_pb2.UploadImagesRequest(chunk=b"abc")]), "image_header:"),
    ("empty message", lambda: iter([trainer_pb2.UploadImagesRequest()]), "part:"),
]


def test_bad_uploads_are_invalid_argument_naming_the_image(trainer: RunningTrainer) -> None:
    for what, requests, message in BAD_UPLOADS:
        error = _upload_error(trainer, requests())
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, what
        assert error.details().startswith(message), (what, error.details())
    assert list(trainer.core.store.list("datasets/")) == []


BAD_SPECS: list[tuple[dict[str, object], str]] = [
    ({"base_model": ""}, "spec.base_model"),
    ({"base_model": "tiny-sd"}, "spec.base_model"),
    ({"dataset": "datasets/123"}, "spec.dataset"),
    ({"instance_prompt": "a photo of a dog"}, "spec.instance_prompt"),
    ({"with_prior_preservation": True}, "spec.class_prompt"),
    ({"max_train_steps": 0}, "spec.max_train_steps"),
    ({"max_train_steps": -10}, "spec.max_train_steps"),
    ({"learning_rate": 0.0}, "spec.learning_rate"),
    ({"learning_rate": -0.001}, "spec.learning_rate"),
    ({"resolution": 100}, "spec.resolution"),
    ({"resolution": 2048}, "spec.resolution"),
    ({"num_workers": 100}, "spec.num_workers"),
    ({"num_class_images": -1}, "spec.num_class_images"),
    ({"mixed_precision": trainer_pb2.MIXED_PRECISION_FP16}, "spec.mixed_precision"),
    ({"lr_schedule": 42}, "spec.lr_schedule"),
    ({"validation_prompts": [""]}, "spec.validation_prompts[0]"),
    ({"model_id": "Bad Id"}, "spec.model_id"),
]


def test_bad_specs_are_invalid_argument_naming_the_field(trainer: RunningTrainer, dataset: str) -> None:
    for fields, field in BAD_SPECS:
        error = rpc_error(lambda fields=fields: trainer.create(tiny_spec(**{"dataset": dataset, **fields})))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (fields, error.details())
        assert error.details().startswith(f"{field}: "), (fields, error.details())
    assert trainer.core.repo.all() == []  # nothing was created, nothing runs


def test_unknown_base_model_and_dataset_are_not_found(trainer: RunningTrainer, dataset: str) -> None:
    model_error = rpc_error(lambda: trainer.create(tiny_spec(dataset, base_model="models/no-such-model")))
    assert model_error.code() == grpc.StatusCode.NOT_FOUND
    assert "spec.base_model" in model_error.details() and "models/no-such-model" in model_error.details()
    missing = "datasets/" + "f" * 64
    dataset_error = rpc_error(lambda: trainer.create(tiny_spec(missing)))
    assert dataset_error.code() == grpc.StatusCode.NOT_FOUND
    assert "spec.dataset" in dataset_error.details() and missing in dataset_error.details()
    assert trainer.core.repo.all() == []


def test_model_id_of_an_existing_model_is_already_exists(trainer: RunningTrainer, dataset: str) -> None:
    error = rpc_error(lambda: trainer.create(tiny_spec(dataset, model_id="tiny-sd")))
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS
    assert error.details().startswith("spec.model_id")


def test_bad_request_id(trainer: RunningTrainer, dataset: str) -> None:
    error = rpc_error(lambda: trainer.create(tiny_spec(dataset), request_id="x" * 300))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith("request_id: ")


def test_names_and_tokens(trainer: RunningTrainer) -> None:
    stub = trainer.stub
    unknown = "trainingJobs/0123456789ab"
    for call in (
        lambda: stub.GetTrainingJob(trainer_pb2.GetTrainingJobRequest(name=unknown)),
        lambda: stub.CancelTrainingJob(trainer_pb2.CancelTrainingJobRequest(name=unknown)),
        lambda: list(stub.WatchTrainingJob(trainer_pb2.WatchTrainingJobRequest(name=unknown))),
    ):
        error = rpc_error(call)
        assert error.code() == grpc.StatusCode.NOT_FOUND and unknown in error.details()
    for call in (
        lambda: stub.GetTrainingJob(trainer_pb2.GetTrainingJobRequest(name="jobs/1")),
        lambda: list(stub.WatchTrainingJob(trainer_pb2.WatchTrainingJobRequest(name=""))),
    ):
        error = rpc_error(call)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and error.details().startswith("name: ")
    token_error = rpc_error(
        lambda: stub.ListTrainingJobs(trainer_pb2.ListTrainingJobsRequest(page_token="nope"))
    )
    assert token_error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert token_error.details().startswith("page_token: ")
    empty = stub.ListTrainingJobs(trainer_pb2.ListTrainingJobsRequest())
    assert list(empty.training_jobs) == [] and empty.next_page_token == ""


def test_health_and_metrics(trainer: RunningTrainer) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    health = health_pb2_grpc.HealthStub(trainer.channel)
    status = health.Check(health_pb2.HealthCheckRequest(service="dreambooth.v1.TrainerService"), timeout=10)
    assert status.status == health_pb2.HealthCheckResponse.SERVING
    with urllib.request.urlopen(f"http://127.0.0.1:{trainer.metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    assert 'dreambooth_trainer_jobs{state="queued"} 0.0' in text
    assert "dreambooth_trainer_step_duration_seconds" in text


def _held_stream(first: trainer_pb2.UploadImagesRequest, release: threading.Event):
    """A client stream that sends one message, then stalls until `release` is set."""
    yield first
    release.wait(30)


def test_a_stalled_upload_is_ended_and_frees_its_place(start_trainer: Callable[..., RunningTrainer]) -> None:
    """A stalled stream used to stay open indefinitely (still open at 150 s)."""
    trainer = start_trainer(upload_idle_seconds=0.5, max_concurrent_uploads=1)
    release = threading.Event()
    header = trainer_pb2.UploadImagesRequest(image_header=trainer_pb2.ImageHeader(filename="a.png"))
    started = time.monotonic()
    err = rpc_error(lambda: trainer.stub.UploadImages(_held_stream(header, release), timeout=30))
    release.set()
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "UploadImages" in err.details()
    assert time.monotonic() - started < 10
    assert trainer.upload([make_png(0)]).image_count == 1  # the place was given back


def test_upload_streams_beyond_the_cap_are_refused_at_once(
    start_trainer: Callable[..., RunningTrainer],
) -> None:
    trainer = start_trainer(max_concurrent_uploads=1, upload_idle_seconds=20)
    release = threading.Event()
    header = trainer_pb2.UploadImagesRequest(image_header=trainer_pb2.ImageHeader(filename="a.png"))
    holder = trainer.stub.UploadImages.future(_held_stream(header, release), timeout=30)
    deadline = time.monotonic() + 10
    while trainer.core.uploads.open_streams == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        err = rpc_error(lambda: trainer.stub.UploadImages(upload_requests([make_png(1)]), timeout=10))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "uploads" in err.details()
    finally:
        release.set()
        holder.cancel()


def test_decoding_runs_apart_from_the_rpc_threads(start_trainer: Callable[..., RunningTrainer]) -> None:
    """Six 108-MB decodes once took both cores and made an unrelated CancelTrainingJob wait
    10.5 s. Decoding now has its own pool: while it is busy, other RPCs still answer."""
    trainer = start_trainer(max_image_bytes=20_000_000, max_image_pixels=40_000_000)
    gate = threading.Event()
    busy = trainer.core.uploads.decode_executor.submit(gate.wait, 30)  # the pool is occupied
    try:
        upload = trainer.stub.UploadImages.future(upload_requests([make_png(0)]), timeout=30)
        started = time.monotonic()
        err = rpc_error(
            lambda: trainer.stub.CancelTrainingJob(
                trainer_pb2.CancelTrainingJobRequest(name="trainingJobs/000000000000"), timeout=10
            )
        )
        assert err.code() == grpc.StatusCode.NOT_FOUND
        assert time.monotonic() - started < 2.0
        assert not upload.done()  # still waiting for the decode pool
    finally:
        gate.set()
    assert upload.result().dataset.image_count == 1
    busy.result()
