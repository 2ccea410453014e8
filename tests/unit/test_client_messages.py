"""Request building of the SDK: names, enums, training specs, upload chunking, generate requests."""

from __future__ import annotations

import pytest
from dreambooth.v1 import common_pb2, trainer_pb2
from dreambooth_client import Concept, messages
from dreambooth_client.messages import GeneratedImage


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("abc", "trainingJobs/abc"),
        ("trainingJobs/abc", "trainingJobs/abc"),
        (" abc ", "trainingJobs/abc"),
        (trainer_pb2.TrainingJob(name="trainingJobs/xyz"), "trainingJobs/xyz"),
    ],
)
def test_job_name_accepts_ids_names_and_messages(value: object, expected: str) -> None:
    assert messages.job_name(value) == expected


@pytest.mark.parametrize("value", ["", "models/x", "trainingJobs/a/b", "/x"])
def test_job_name_refuses_malformed_names(value: str) -> None:
    with pytest.raises(ValueError, match="job"):
        messages.job_name(value)


def test_model_and_dataset_names() -> None:
    assert messages.model_name("tiny-sd") == "models/tiny-sd"
    assert messages.model_name(common_pb2.Model(name="models/m")) == "models/m"
    assert messages.dataset_name(trainer_pb2.Dataset(name="datasets/ab12")) == "datasets/ab12"
    assert messages.resource_id("models/tiny-sd") == "tiny-sd"
    with pytest.raises(TypeError):
        messages.model_name(42)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (None, common_pb2.SCHEDULER_UNSPECIFIED),
        ("euler", common_pb2.SCHEDULER_EULER),
        ("EULER_ANCESTRAL", common_pb2.SCHEDULER_EULER_ANCESTRAL),
        ("dpmpp-2m-karras", common_pb2.SCHEDULER_DPMPP_2M_KARRAS),
        ("SCHEDULER_PNDM", common_pb2.SCHEDULER_PNDM),
        (common_pb2.SCHEDULER_DDIM, common_pb2.SCHEDULER_DDIM),
    ],
)
def test_parse_scheduler(text: object, expected: int) -> None:
    assert messages.parse_scheduler(text) == expected


@pytest.mark.parametrize("value", ["warp", "unspecified", 99, True])
def test_parse_scheduler_refuses_unknown_values(value: object) -> None:
    with pytest.raises((ValueError, TypeError), match="scheduler"):
        messages.parse_scheduler(value)


def test_enum_helpers() -> None:
    assert messages.parse_image_format("jpg") == common_pb2.IMAGE_FORMAT_JPEG
    assert messages.parse_job_state("succeeded") == trainer_pb2.TRAINING_JOB_STATE_SUCCEEDED
    assert messages.state_label(trainer_pb2.TRAINING_JOB_STATE_GENERATING_PRIORS) == "GENERATING_PRIORS"
    assert messages.enum_choices(common_pb2.ImageFormat, "IMAGE_FORMAT_") == ["png", "jpeg", "webp"]
    assert messages.is_terminal(trainer_pb2.TRAINING_JOB_STATE_CANCELLED)
    assert not messages.is_terminal(trainer_pb2.TRAINING_JOB_STATE_PUBLISHING)


def test_build_training_spec_from_kwargs_dict_and_aliases() -> None:
    spec = messages.build_training_spec(
        {"base_model": "tiny-sd", "dataset": trainer_pb2.Dataset(name="datasets/ab"), "steps": 10},
        instance_prompt="a photo of sks dog",
        lr=1e-3,
        workers=2,
        prior_preservation=True,
        class_prompt="a photo of dog",
        lr_schedule="cosine",
        mixed_precision="bf16",
        validation_prompts="a photo of sks dog",
        seed=None,  # None leaves the default
    )
    assert spec.base_model == "models/tiny-sd"
    assert spec.dataset == "datasets/ab"
    assert spec.max_train_steps == 10
    assert spec.learning_rate == pytest.approx(1e-3)
    assert spec.num_workers == 2
    assert spec.with_prior_preservation
    assert spec.lr_schedule == trainer_pb2.LR_SCHEDULE_COSINE
    assert spec.mixed_precision == trainer_pb2.MIXED_PRECISION_BF16
    assert list(spec.validation_prompts) == ["a photo of sks dog"]
    assert spec.seed == 0


def test_build_training_spec_overrides_a_message() -> None:
    base = trainer_pb2.TrainingJobSpec(base_model="models/a", max_train_steps=5, validation_prompts=["x"])
    spec = messages.build_training_spec(base, max_train_steps=7, validation_prompts=["y", "z"])
    assert (spec.base_model, spec.max_train_steps, list(spec.validation_prompts)) == (
        "models/a",
        7,
        ["y", "z"],
    )
    assert base.max_train_steps == 5  # the caller's message is not modified


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"max_steps": 3}, "unknown training spec field 'max_steps'"),
        ({"max_train_steps": "many"}, "max_train_steps"),
        ({"lr_schedule": "sawtooth"}, "lr_schedule"),
    ],
)
def test_build_training_spec_refuses_typos_and_wrong_types(fields: dict, match: str) -> None:
    with pytest.raises((TypeError, ValueError), match=match):
        messages.build_training_spec(**fields)


def test_additional_concepts_from_concepts_messages_or_dicts() -> None:
    spec = messages.build_training_spec(
        additional_concepts=[
            Concept(trainer_pb2.Dataset(name="datasets/b"), "a zwx cat", "zwx", "a cat"),
            trainer_pb2.TrainingConcept(dataset="c", instance_prompt="an ohwx bird", identifier_token="ohwx"),
            {
                "dataset": "d",
                "instance_prompt": "a bnha cup",
                "identifier_token": "bnha",
                "class_prompt": None,
            },
        ]
    )
    assert [(c.dataset, c.instance_prompt, c.identifier_token) for c in spec.additional_concepts] == [
        ("datasets/b", "a zwx cat", "zwx"),
        ("datasets/c", "an ohwx bird", "ohwx"),
        ("datasets/d", "a bnha cup", "bnha"),
    ]
    assert spec.additional_concepts[0].class_prompt == "a cat"
    assert not spec.additional_concepts[1].HasField("class_prompt")  # unset: not sent
    assert not spec.additional_concepts[2].HasField("class_prompt")
    one = messages.build_training_spec(concept=Concept("datasets/b", "a zwx cat", "zwx"))  # the flag's alias
    assert len(one.additional_concepts) == 1
    with pytest.raises(TypeError, match="unknown training concept field 'token'"):
        messages.build_training_spec(additional_concepts=[{"dataset": "b", "token": "zwx"}])
    with pytest.raises(TypeError, match="Concept"):
        messages.build_training_spec(additional_concepts=["datasets/b"])


def test_upload_requests_chunk_each_image_after_its_header(tmp_path) -> None:
    (tmp_path / "b.png").write_bytes(b"B" * 5)
    (tmp_path / "a.jpg").write_bytes(b"A" * 7)
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / ".hidden.png").write_bytes(b"x")
    sources = messages.collect_image_sources([tmp_path, b"rawbytes", ("named.webp", b"W" * 3)])
    assert [(s.filename, s.size) for s in sources] == [
        ("a.jpg", 7),
        ("b.png", 5),
        ("image-2", 8),
        ("named.webp", 3),
    ]
    parts = [
        (r.WhichOneof("part"), r.image_header.filename if r.HasField("image_header") else r.chunk)
        for r in messages.iter_upload_requests(sources, chunk_size=3)
    ]
    assert parts == [
        ("image_header", "a.jpg"),
        ("chunk", b"AAA"),
        ("chunk", b"AAA"),
        ("chunk", b"A"),
        ("image_header", "b.png"),
        ("chunk", b"BBB"),
        ("chunk", b"BB"),
        ("image_header", "image-2"),
        ("chunk", b"raw"),
        ("chunk", b"byt"),
        ("chunk", b"es"),
        ("image_header", "named.webp"),
        ("chunk", b"WWW"),
    ]
    headers = [r.image_header for r in messages.iter_upload_requests(sources) if r.HasField("image_header")]
    assert [h.size_bytes for h in headers] == [7, 5, 8, 3]


def test_upload_requests_default_to_1_mib_chunks_and_can_be_replayed(tmp_path) -> None:
    path = tmp_path / "big.png"
    path.write_bytes(bytes(range(256)) * 4097 * 2)  # a little over 2 MiB
    sources = messages.collect_image_sources(path)
    first = [len(r.chunk) for r in messages.iter_upload_requests(sources) if r.HasField("chunk")]
    again = [len(r.chunk) for r in messages.iter_upload_requests(sources) if r.HasField("chunk")]
    assert first == again == [1024 * 1024, 1024 * 1024, path.stat().st_size - 2 * 1024 * 1024]
    with pytest.raises(ValueError, match="chunk_size"):
        list(messages.iter_upload_requests(sources, chunk_size=2 * 1024 * 1024))


def test_collect_image_sources_refuses_missing_and_empty(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="missing"):
        messages.collect_image_sources(tmp_path / "missing")
    with pytest.raises(ValueError, match="no image files"):
        messages.collect_image_sources(tmp_path)
    with pytest.raises(ValueError, match="nothing to upload"):
        messages.collect_image_sources([])
    with pytest.raises(TypeError):
        messages.collect_image_sources([3.5])


def test_build_generate_request() -> None:
    request = messages.build_generate_request(
        "my-model",
        "a photo of sks dog",
        num_images=2,
        steps=20,
        scheduler="euler",
        output_format="webp",
        seed=0,
    )
    assert request.model == "models/my-model"
    assert (request.num_images, request.steps) == (2, 20)
    assert request.scheduler == common_pb2.SCHEDULER_EULER
    assert request.output_format == common_pb2.IMAGE_FORMAT_WEBP
    assert request.HasField("seed") and request.seed == 0  # seed 0 is a seed, not "random"
    assert not messages.build_generate_request("m", "p").HasField("seed")


def test_generated_image_unpacks_and_knows_its_extension() -> None:
    data, seed = GeneratedImage(b"\x89PNG\r\n\x1a\n....", 7)
    assert seed == 7
    assert GeneratedImage(data, seed).extension == "png"
    assert messages.image_extension(b"\xff\xd8\xff\xe0") == "jpg"
    assert messages.image_extension(b"RIFF\x00\x00\x00\x00WEBPVP8 ") == "webp"
    assert messages.image_extension(b"??") == "bin"
