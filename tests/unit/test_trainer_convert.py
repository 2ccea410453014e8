"""Protobuf <-> domain translation of the trainer."""

from __future__ import annotations

import dataclasses

import pytest
from dreambooth.v1 import common_pb2, trainer_pb2

from services.common.errors import InvalidArgument
from services.trainer.api import convert
from services.trainer.job_spec import Concept, ConceptRequest, JobSpec
from services.trainer.jobs.events import JobEvent, Preview, PriorProgressInfo
from services.trainer.jobs.records import Job, JobState, Progress
from tests.fixtures.trainer_server import encode, make_image

SPEC = JobSpec(
    base_model="tiny-sd",
    dataset="a" * 64,
    instance_prompt="a photo of sks dog",
    class_prompt="a photo of dog",
    with_prior_preservation=True,
    max_train_steps=10,
    learning_rate=1e-4,
    lr_schedule="cosine",
    mixed_precision="no",
    validation_prompts=("sks dog",),
    model_id="my-dog",
    additional_concepts=(Concept("b" * 64, "a photo of zwx cat", "zwx", "a photo of cat"),),
    use_lora=True,
    snr_gamma=5.0,
    noise_offset=0.05,
    ema_decay=0.9999,
    optimizer="prodigy",
    use_dora=True,
)


def test_a_spec_goes_to_proto_and_back_unchanged() -> None:
    proto = convert.spec_to_proto(SPEC)
    assert proto.base_model == "models/tiny-sd" and proto.dataset == "datasets/" + "a" * 64
    assert proto.lr_schedule == trainer_pb2.LR_SCHEDULE_COSINE
    assert proto.mixed_precision == trainer_pb2.MIXED_PRECISION_NO
    assert proto.optimizer == trainer_pb2.OPTIMIZER_PRODIGY
    request = convert.spec_request_from_proto(proto)
    for field in dataclasses.fields(request):
        value = getattr(request, field.name)
        expected = getattr(SPEC, field.name)
        if field.name == "base_model":
            expected = "models/tiny-sd"
        elif field.name == "dataset":
            expected = "datasets/" + "a" * 64
        elif field.name == "additional_concepts":
            expected = (
                ConceptRequest("datasets/" + "b" * 64, "a photo of zwx cat", "zwx", "a photo of cat"),
            )
        assert value == expected, field.name


def test_concept_fields_the_client_left_unset_stay_unset() -> None:
    proto = trainer_pb2.TrainingJobSpec(
        additional_concepts=[trainer_pb2.TrainingConcept(dataset="datasets/x", identifier_token="")]
    )
    (concept,) = convert.spec_request_from_proto(proto).additional_concepts
    assert concept == ConceptRequest(dataset="datasets/x", identifier_token="")
    assert concept.instance_prompt is None and concept.class_prompt is None
    assert convert.spec_request_from_proto(trainer_pb2.TrainingJobSpec()).additional_concepts is None


def test_unset_enums_and_unknown_values() -> None:
    request = convert.spec_request_from_proto(trainer_pb2.TrainingJobSpec(lr_schedule=99, optimizer=9))
    assert request.lr_schedule == "unknown enum value 99" and request.mixed_precision is None
    assert request.optimizer == "unknown enum value 9" and request.ema_decay is None
    # Every field has presence: unset means "use the default"; an explicit zero is what was sent.
    assert request.max_train_steps is None and request.prior_loss_weight is None
    assert request.with_prior_preservation is None and request.identifier_token is None
    explicit = convert.spec_request_from_proto(
        trainer_pb2.TrainingJobSpec(
            max_train_steps=0,
            prior_loss_weight=0.0,
            use_lora=False,
            identifier_token="",
            lr_schedule=trainer_pb2.LR_SCHEDULE_UNSPECIFIED,
        )
    )
    assert (explicit.max_train_steps, explicit.prior_loss_weight, explicit.use_lora) == (0, 0.0, False)
    assert explicit.identifier_token == "" and explicit.lr_schedule == "unspecified"


def test_list_state_filter() -> None:
    assert convert.state_from_proto(trainer_pb2.TRAINING_JOB_STATE_UNSPECIFIED) is None
    assert convert.state_from_proto(trainer_pb2.TRAINING_JOB_STATE_TRAINING) == JobState.TRAINING
    with pytest.raises(InvalidArgument) as info:
        convert.state_from_proto(77)
    assert info.value.field == "state"


def test_a_job_and_its_events() -> None:
    job = Job(
        job_id="0123456789ab",
        spec=SPEC,
        state=JobState.SUCCEEDED,
        request_id="r",
        create_time=1_700_000_000.25,
        start_time=1_700_000_001.0,
        end_time=1_700_000_009.0,
        update_time=1_700_000_009.0,
        progress=Progress(step=10, total_steps=10, loss=0.1, learning_rate=1e-4),
        model="models/my-dog",
        checkpoint_step=5,
    )
    proto = convert.job_to_proto(job)
    assert (
        proto.name == "trainingJobs/0123456789ab" and proto.state == trainer_pb2.TRAINING_JOB_STATE_SUCCEEDED
    )
    assert proto.create_time.seconds == 1_700_000_000 and proto.create_time.nanos == 250_000_000
    assert proto.progress.step == 10 and proto.model == "models/my-dog" and proto.checkpoint_step == 5
    queued = convert.job_to_proto(dataclasses.replace(job, start_time=None, end_time=None))
    assert not queued.HasField("start_time") and not queued.HasField("end_time")

    jpeg = encode(make_image(0, (48, 32)), "JPEG")
    events = [
        JobEvent(1, 1.0, job),
        JobEvent(2, 2.0, Progress(step=3, total_steps=10, eta_seconds=4.0)),
        JobEvent(3, 3.0, PriorProgressInfo(images_done=1, images_total=4)),
        JobEvent(4, 4.0, Preview(step=3, prompt="sks dog", image_key="k", jpeg=jpeg)),
    ]
    responses = [convert.event_to_proto(event) for event in events]
    assert [r.WhichOneof("event") for r in responses] == [
        "state_change",
        "progress",
        "prior_progress",
        "preview",
    ]
    assert [r.sequence for r in responses] == [1, 2, 3, 4]
    assert responses[1].progress.eta_seconds == 4.0
    assert responses[2].prior_progress.images_total == 4
    image = responses[3].preview.image
    assert image.format == common_pb2.IMAGE_FORMAT_JPEG and (image.width, image.height) == (48, 32)
