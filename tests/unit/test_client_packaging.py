"""The client distribution stays light: grpcio + protobuf only, and importing it pulls in no ML stack."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import tomllib

CLIENT_PYPROJECT = Path(__file__).resolve().parents[2] / "clients" / "python" / "pyproject.toml"
HEAVY = ("torch", "numpy", "PIL", "diffusers", "transformers", "ray", "services")


def test_declared_dependencies_are_grpcio_and_protobuf_only() -> None:
    project = tomllib.loads(CLIENT_PYPROJECT.read_text())["project"]
    names = sorted(dep.split(">")[0].split("=")[0].split("<")[0].strip() for dep in project["dependencies"])
    assert names == ["grpcio", "protobuf"]
    assert project["scripts"]["dreambooth"] == "dreambooth_client.cli:main"


def test_importing_the_sdk_and_cli_loads_no_heavy_package() -> None:
    code = (
        "import sys, dreambooth_client, dreambooth_client.cli, dreambooth_client.aio\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    )
    command = [sys.executable, "-c", code]
    done = subprocess.run(command, capture_output=True, text=True, check=True, timeout=60)
    assert done.stdout.strip() == "[]"
