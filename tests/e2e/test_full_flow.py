"""The whole flow on the tiny model: upload -> priors -> train on Ray (2 workers) -> publish ->
generate with the fine-tuned model through the inference service, all over real gRPC on loopback
and one S3 bucket."""

from __future__ import annotations

import io

import grpc
from dreambooth.v1 import common_pb2, inference_pb2, inference_pb2_grpc, trainer_pb2
from PIL import Image

from services.common.model_store import ModelStore
from tests.fixtures.trainer_server import RunningTrainer, make_png, tiny_spec

S = trainer_pb2


def test_upload_train_with_priors_then_generate(
    trainer_server: RunningTrainer, inference_server, model_store: ModelStore
) -> None:
    trainer = trainer_server
    dataset = trainer.upload([make_png(seed) for seed in range(4)])
    assert dataset.image_count == 4

    spec = tiny_spec(
        dataset.name,
        with_prior_preservation=True,
        class_prompt="a photo of dog",
        num_class_images=4,
        prior_steps=4,
        max_train_steps=10,
        checkpointing_steps=5,
        model_id="e2e-sks-dog",
    )
    job = trainer.create(spec, request_id="e2e")
    events = trainer.watch(job.name)
    states = [e.state_change.state for e in events if e.WhichOneof("event") == "state_change"]
    assert states == [
        S.TRAINING_JOB_STATE_QUEUED,
        S.TRAINING_JOB_STATE_GENERATING_PRIORS,
        S.TRAINING_JOB_STATE_TRAINING,
        S.TRAINING_JOB_STATE_PUBLISHING,
        S.TRAINING_JOB_STATE_SUCCEEDED,
    ], events[-1].state_change.error_message
    done = events[-1].state_change
    assert done.model == "models/e2e-sks-dog"

    manifest = model_store.get("e2e-sks-dog")
    base = model_store.get("tiny-sd")
    assert manifest.base_model == "tiny-sd"
    # Unchanged components share their blobs with the base (the VAE is never trained).
    shared = {path for path, entry in manifest.files.items() if base.files.get(path) == entry}
    assert any(path.startswith("vae/") for path in shared)

    with grpc.insecure_channel(inference_server.address) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        request = inference_pb2.GenerateRequest(
            model=done.model,
            prompt="a photo of sks dog on the moon",
            num_images=1,
            steps=4,
            seed=3,
            output_format=common_pb2.IMAGE_FORMAT_PNG,
        )
        responses = list(stub.Generate(request, timeout=300))
    images = [r.image for r in responses if r.WhichOneof("event") == "image"]
    assert len(images) == 1 and images[0].seed == 3
    picture = Image.open(io.BytesIO(images[0].image.data))
    assert picture.format == "PNG" and picture.size == (64, 64)
