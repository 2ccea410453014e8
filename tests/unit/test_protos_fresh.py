"""The committed gRPC stubs are exactly what `make proto` writes, and the protos pass buf lint."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tools.gen_protos import DEFAULT_OUT, ROOT, generate


def test_committed_stubs_match_generated(tmp_path: Path) -> None:
    generated = {p.name: p.read_bytes() for p in generate(tmp_path)}
    committed_dir = DEFAULT_OUT / "dreambooth" / "v1"
    committed = {p.name: p.read_bytes() for p in committed_dir.iterdir() if p.is_file()}
    assert sorted(committed) == sorted(generated), "stub files differ: run `make proto`"
    stale = [name for name in generated if generated[name] != committed[name]]
    assert not stale, f"stale stubs {stale}: run `make proto` and commit the result"


def test_every_service_is_importable_from_the_client_package() -> None:
    from dreambooth.v1 import inference_pb2_grpc, priorgen_pb2_grpc, trainer_pb2_grpc

    assert hasattr(trainer_pb2_grpc, "TrainerServiceStub")
    assert hasattr(priorgen_pb2_grpc, "PriorGenServiceStub")
    assert hasattr(inference_pb2_grpc, "InferenceServiceStub")


@pytest.mark.skipif(shutil.which("npx") is None, reason="npx (Node.js) not installed: buf cannot run")
def test_buf_lint_is_clean() -> None:
    result = subprocess.run(
        ["npx", "-y", "@bufbuild/buf@1.75.0", "lint"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout + result.stderr
