"""Inference settings from the environment, and the servicer's protobuf <-> Python translation."""

from __future__ import annotations

import pytest
from dreambooth.v1 import common_pb2, inference_pb2

from services.common.errors import InvalidArgument
from services.common.model_proto import model_proto
from services.common.model_store import ManifestEntry, ModelManifest
from services.common.settings import from_env
from services.inference.params import EncodedImage, FinalImage, Preview, Progress
from services.inference.servicer import generate_params, generate_response
from services.inference.settings import ENV_PREFIX, InferenceSettings


def test_defaults_listen_on_the_documented_ports() -> None:
    settings = from_env(InferenceSettings, ENV_PREFIX, env={})
    assert (settings.server.host, settings.server.port, settings.server.metrics_port) == (
        "127.0.0.1",
        50053,
        9183,
    )
    assert settings.default_model == "tiny-sd" and settings.max_batch == 8


def test_environment_overrides() -> None:
    env = {
        "DREAMBOOTH_INFERENCE_PORT": "6000",
        "DREAMBOOTH_INFERENCE_METRICS_PORT": "6001",
        "DREAMBOOTH_INFERENCE_DEFAULT_MODEL": "sd-1-5",
        "DREAMBOOTH_INFERENCE_MAX_BATCH": "4",
        "DREAMBOOTH_INFERENCE_MAX_WAIT_MS": "12.5",
        "DREAMBOOTH_INFERENCE_CACHE_MAX_BYTES": str(2**30),
        "DREAMBOOTH_S3_ENDPOINT": "minio:9000",
    }
    settings = from_env(InferenceSettings, ENV_PREFIX, env=env)
    assert (settings.server.port, settings.server.metrics_port) == (6000, 6001)
    assert (settings.default_model, settings.max_batch, settings.max_wait_ms) == ("sd-1-5", 4, 12.5)
    assert settings.cache_max_bytes == 2**30 and settings.store.s3_endpoint == "minio:9000"


@pytest.mark.parametrize(
    "env",
    [
        {"DREAMBOOTH_INFERENCE_MAX_BATCH": "0"},
        {"DREAMBOOTH_INFERENCE_MAX_WIDTH": "100"},
        {"DREAMBOOTH_INFERENCE_MAX_WAIT_MS": "-1"},
        {"DREAMBOOTH_INFERENCE_DTYPE": "float8"},
        {"DREAMBOOTH_INFERENCE_WORKERS": "many"},
    ],
)
def test_bad_settings_fail_at_start(env: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        from_env(InferenceSettings, ENV_PREFIX, env=env)


def test_generate_request_translation() -> None:
    request = inference_pb2.GenerateRequest(
        model="models/tiny-sd",
        prompt="a dog",
        negative_prompt="blur",
        num_images=2,
        width=128,
        height=64,
        steps=10,
        guidance_scale=5.0,
        scheduler=common_pb2.SCHEDULER_DPMPP_2M_KARRAS,
        seed=0,
        preview_interval=3,
        output_format=common_pb2.IMAGE_FORMAT_WEBP,
        truncate_prompt=True,
    )
    params = generate_params(request)
    assert params.model_id == "tiny-sd" and params.seed == 0  # an explicit 0 is a seed, not "unset"
    assert (params.scheduler, params.output_format, params.truncate_prompt) == (
        "dpmpp_2m_karras",
        "webp",
        True,
    )
    assert (params.num_images, params.width, params.height, params.steps) == (2, 128, 64, 10)
    unset = generate_params(inference_pb2.GenerateRequest(model="models/tiny-sd", prompt="x"))
    assert unset.seed is None and unset.scheduler == "ddim" and unset.output_format == "png"


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"scheduler": 17}, "scheduler"),
        ({"output_format": 9}, "output_format"),
        ({"model": "tiny-sd"}, "model"),
    ],
)
def test_untranslatable_requests_name_the_field(fields: dict[str, object], field: str) -> None:
    values: dict[str, object] = {"model": "models/tiny-sd", "prompt": "x", **fields}
    with pytest.raises(InvalidArgument) as caught:
        generate_params(inference_pb2.GenerateRequest(**values))
    assert caught.value.field == field


def test_events_become_the_oneof() -> None:
    image = EncodedImage(b"png", "png", 64, 32)
    assert generate_response(Progress(3, 20)).progress.total_steps == 20
    preview = generate_response(Preview(4, 1, EncodedImage(b"jpg", "jpeg", 16, 16))).preview
    assert (preview.step, preview.index, preview.image.format) == (4, 1, common_pb2.IMAGE_FORMAT_JPEG)
    final = generate_response(FinalImage(1, image, seed=8)).image
    assert (final.index, final.seed, final.image.width, final.image.height) == (1, 8, 64, 32)
    assert final.image.format == common_pb2.IMAGE_FORMAT_PNG and final.image.data == b"png"


def test_model_translation() -> None:
    manifest = ModelManifest(
        model_id="dog",
        kind="lora",
        base_model="tiny-sd",
        training_job="job-7",
        create_time="2025-01-31T12:00:00.250Z",
        labels={"k": "v"},
        files={"a": ManifestEntry("0" * 64, 10), "b": ManifestEntry("1" * 64, 5)},
    )
    model = model_proto(manifest)
    assert (model.name, model.kind, model.base_model) == (
        "models/dog",
        common_pb2.MODEL_KIND_LORA,
        "models/tiny-sd",
    )
    assert model.training_job == "trainingJobs/job-7"
    assert (model.size_bytes, model.file_count, model.manifest_digest) == (15, 2, manifest.digest)
    assert model.create_time.ToJsonString() == "2025-01-31T12:00:00.250Z"
