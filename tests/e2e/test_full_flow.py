"""The whole flow on the committed toy-world base: upload a held-out subject's photos -> priors ->
train on Ray (2 workers) -> publish -> generate with the fine-tuned model through the inference
service, all over real gRPC on loopback and one S3 bucket. (That the fine-tune learns the
subject is tests/integration/test_learning.py's business: here, a few steps.)"""

from __future__ import annotations

import io

import grpc
import pytest
from dreambooth.v1 import common_pb2, inference_pb2, inference_pb2_grpc, trainer_pb2
from PIL import Image

from services.common.model_store import ModelStore
from services.common.toy_base_files import COMMITTED_BASE
from tests.fixtures.trainer_server import RunningTrainer, tiny_spec
from toyworld import subject

S = trainer_pb2


@pytest.mark.timeout(600)  # a cold Ray start, priors and 2 DDP workers on the toy-world base
def test_upload_train_with_priors_then_generate(
    trainer_server: RunningTrainer, inference_server, model_store: ModelStore
) -> None:
    trainer = trainer_server
    model_store.import_folder(COMMITTED_BASE, "toy-world")
    photos = []
    for photo in subject("striped-ball").photos(count=4):
        buffer = io.BytesIO()
        photo.save(buffer, format="PNG")
        photos.append(buffer.getvalue())
    dataset = trainer.upload(photos)
    assert dataset.image_count == 4

    spec = tiny_spec(
        dataset.name,
        base_model="models/toy-world",
        instance_prompt="a photo of sks ball",
        with_prior_preservation=True,
        class_prompt="a photo of a ball",
        num_class_images=4,
        prior_steps=4,
        max_train_steps=10,
        checkpointing_steps=5,
        model_id="e2e-sks-ball",
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
    assert done.model == "models/e2e-sks-ball"

    manifest = model_store.get("e2e-sks-ball")
    base = model_store.get("toy-world")
    assert manifest.base_model == "toy-world"
    # Unchanged components share their blobs with the base (the VAE is never trained).
    shared = {path for path, entry in manifest.files.items() if base.files.get(path) == entry}
    assert any(path.startswith("vae/") for path in shared)

    with grpc.insecure_channel(inference_server.address) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        request = inference_pb2.GenerateRequest(
            model=done.model,
            prompt="a photo of sks ball on the beach",
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
