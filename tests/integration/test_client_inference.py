"""The SDK and the CLI against the real inference service (tiny model in the S3 store)."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import pytest
from dreambooth.v1 import common_pb2
from dreambooth_client import (
    AsyncDreamBoothClient,
    DreamBoothClient,
    InvalidArgumentError,
    NotFoundError,
    cli,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def client(inference_server) -> DreamBoothClient:
    with DreamBoothClient(trainer=None, inference=inference_server.address) as sdk:
        yield sdk


def run_cli(address: str, *argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = cli.main(["--inference", address, *argv], stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def test_models(client: DreamBoothClient) -> None:
    names = [model.name for model in client.list_models()]
    assert "models/tiny-sd" in names
    model = client.get_model("tiny-sd")
    assert model.kind == common_pb2.MODEL_KIND_BASE
    assert model.size_bytes > 0 and model.file_count > 0 and len(model.manifest_digest) == 64
    with pytest.raises(NotFoundError, match="nope"):
        client.get_model("nope")


def test_generate_streams_progress_and_previews_and_is_deterministic(client: DreamBoothClient) -> None:
    progress: list[tuple[int, int]] = []
    previews: list[tuple[int, int]] = []
    images = client.generate(
        "tiny-sd",
        "a photo of a dog",
        num_images=2,
        steps=4,
        seed=123,
        preview_interval=2,
        on_progress=lambda step, total: progress.append((step, total)),
        on_preview=lambda step, index, data: previews.append((step, index)),
    )
    assert [seed for _, seed in images] == [123, 124]
    assert all(
        data.startswith(PNG_MAGIC) and image.extension == "png" for data, _ in images for image in images
    )
    assert [step for step, _ in progress] == [1, 2, 3, 4] and {total for _, total in progress} == {4}
    assert {(2, 0), (2, 1)} <= set(previews)  # every 2 steps (the last step is the image itself)
    assert {step for step, _ in previews} <= {2, 4}
    again = client.generate("models/tiny-sd", "a photo of a dog", num_images=2, steps=4, seed=123)
    assert [data for data, _ in again] == [data for data, _ in images]


def test_generate_options_and_bad_input(client: DreamBoothClient) -> None:
    (jpeg,) = client.generate("tiny-sd", "a dog", steps=2, seed=1, output_format="jpeg", scheduler="euler")
    assert jpeg.extension == "jpg"
    (random_seed,) = client.generate("tiny-sd", "a dog", steps=2)
    assert random_seed.seed >= 0
    with pytest.raises(InvalidArgumentError) as too_many_steps:
        client.generate("tiny-sd", "a dog", steps=1000)
    assert too_many_steps.value.field == "steps"
    with pytest.raises(InvalidArgumentError) as bad_width:
        client.generate("tiny-sd", "a dog", width=100, steps=2)
    assert bad_width.value.field == "width"
    with pytest.raises(NotFoundError):
        client.generate("no-such-model", "a dog", steps=2)


def test_async_client_generates(inference_server) -> None:
    async def scenario() -> list:
        async with AsyncDreamBoothClient(trainer=None, inference=inference_server.address) as client:
            models = [m.name async for m in client.list_models()]
            assert "models/tiny-sd" in models
            return await client.generate("tiny-sd", "a photo of a dog", steps=3, seed=5)

    (image,) = asyncio.run(scenario())
    assert image.seed == 5 and image.data.startswith(PNG_MAGIC)


def test_cli_generate_and_models(inference_server, tmp_path: Path) -> None:
    address = inference_server.address
    argv = ["generate", "--model", "tiny-sd", "--prompt", "a photo of a dog", "--n", "2", "--steps", "3"]
    code, out, err = run_cli(address, *argv, "--seed", "9", "--out", str(tmp_path / "images"))
    assert code == 0, err
    files = sorted(p.name for p in (tmp_path / "images").iterdir())
    assert files == ["tiny-sd-seed10.png", "tiny-sd-seed9.png"]
    assert (tmp_path / "images" / "tiny-sd-seed9.png").read_bytes().startswith(PNG_MAGIC)
    assert [line.split()[-1] for line in out.splitlines()] == ["9", "10"]

    code, out, _ = run_cli(address, "models", "list")
    assert code == 0 and "models/tiny-sd" in out and "BASE" in out
    code, out, _ = run_cli(address, "models", "get", "models/tiny-sd")
    assert code == 0 and "kind:     BASE" in out

    code, out, err = run_cli(address, "generate", "--model", "ghost", "--prompt", "p", "--out", str(tmp_path))
    assert (code, out) == (1, "")
    assert err.startswith("error: NOT_FOUND:") and err.count("\n") == 1
