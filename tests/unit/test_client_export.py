"""The SDK's export receiver: a folder appears only whole, every file checked against its sha256."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from dreambooth.v1 import common_pb2, inference_pb2
from dreambooth_client import DataLossError, cli
from dreambooth_client.export import ExportWriter

FILES = {"model_index.json": b"{}", "unet/weights.safetensors": b"x" * 3000}


def export_file(path: str, data: bytes) -> inference_pb2.ExportFile:
    return inference_pb2.ExportFile(path=path, sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data))


def stream(
    files: dict[str, bytes], sent: dict[str, bytes] | None = None
) -> list[inference_pb2.ExportModelResponse]:
    """The server's messages for `files`; `sent` replaces the bytes actually sent."""
    manifest = inference_pb2.ExportManifest(
        model=common_pb2.Model(name="models/m"), files=[export_file(p, d) for p, d in files.items()]
    )
    responses = [inference_pb2.ExportModelResponse(manifest=manifest)]
    for path, data in files.items():
        responses.append(inference_pb2.ExportModelResponse(file=export_file(path, data)))
        body = (sent or {}).get(path, data)
        responses += [
            inference_pb2.ExportModelResponse(chunk=body[i : i + 1024]) for i in range(0, len(body), 1024)
        ]
    return responses


def receive(out: Path, responses: list[inference_pb2.ExportModelResponse]) -> common_pb2.Model:
    writer = ExportWriter(out)
    try:
        for response in responses:
            writer.add(response)
        return writer.finish()
    except BaseException:
        writer.abort()
        raise


def test_a_whole_export_appears_with_every_file(tmp_path: Path) -> None:
    assert receive(tmp_path / "out", stream(FILES)).name == "models/m"
    assert {
        p.relative_to(tmp_path / "out").as_posix(): p.read_bytes()
        for p in (tmp_path / "out").rglob("*")
        if p.is_file()
    } == FILES
    assert list(tmp_path.iterdir()) == [tmp_path / "out"]  # no partial folder left beside it


@pytest.mark.parametrize(
    ("responses", "message"),
    [
        (
            stream(FILES, sent={"unet/weights.safetensors": b"y" * 3000}),
            "unet/weights.safetensors: expected sha256",
        ),
        (stream(FILES)[:-1], "expected sha256"),  # cut short inside the last file
        (stream(FILES)[:3], "ended before these files: unet/weights.safetensors"),
        (stream(FILES)[1:], "did not start with its manifest"),
        (stream(FILES)[:1] + stream({"other.bin": b"?"})[1:], "does not list: 'other.bin'"),
    ],
)
def test_a_corrupted_or_incomplete_export_leaves_nothing(
    tmp_path: Path, responses: list[inference_pb2.ExportModelResponse], message: str
) -> None:
    with pytest.raises(DataLossError, match=message):
        receive(tmp_path / "out", responses)
    assert list(tmp_path.iterdir()) == []


def test_paths_stay_inside_the_folder_and_the_folder_must_be_new_or_empty(tmp_path: Path) -> None:
    with pytest.raises(DataLossError, match="unsafe path"):
        receive(tmp_path / "out", stream({"../escape": b"x"}))
    assert not (tmp_path / "escape").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="is not an empty folder"):
        ExportWriter(tmp_path / "full")


@pytest.mark.parametrize("value", ["2.5", "-0.1", "nan"])
def test_the_cli_refuses_an_adapter_scale_out_of_range(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["generate", "--model", "m", "--prompt", "p", "--out", "x", "--adapter-scale", value])
    assert exited.value.code == 2 and "must be in 0..2" in capsys.readouterr().err
