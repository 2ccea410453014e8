"""`dreambooth-server up` for real: the three services as its children, on free loopback ports.

First start on an empty data dir: the committed toy-world base is imported, the SDK lists it and
generates with it through the inference service, SIGTERM stops everything with status 0. A start on a data
dir that already has the model does not import it again, and a service killed with SIGKILL makes
`up` stop the others and exit 1. Every PID is checked afterwards, with the processes of its
session (the trainer's Ray), and anything left would be ended here and fail the test.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from dreambooth_client import DreamBoothClient

from services.common.local_store import LocalObjectStore
from services.common.model_store import ModelStore
from services.launcher.children import session_members
from services.launcher.plan import SERVICES, env_prefix
from tests.fixtures.s3 import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
READY_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 90.0  # up gives the services 60 s, then ends what is left


class UpProcess:
    """`python -m services.cli up` with its output collected line by line."""

    def __init__(self, data_dir: Path, *args: str) -> None:
        self.ports = {name: free_port() for name in SERVICES}
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DREAMBOOTH_", "RAY_"))}
        for name, port in self.ports.items():
            env[f"{env_prefix(name)}PORT"] = str(port)
            env[f"{env_prefix(name)}METRICS_PORT"] = "0"
        self.started = time.monotonic()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "services.cli", "up", "--data-dir", str(data_dir), *args],
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def address(self, name: str) -> str:
        return f"127.0.0.1:{self.ports[name]}"

    def wait_ready(self) -> float:
        deadline = self.started + READY_TIMEOUT_S
        while not any(re.match(r"\[up\] +ready in", line) for line in self.lines):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"up not ready (exit {self.process.poll()}):\n{self.output[-6000:]}")
            time.sleep(0.2)
        return time.monotonic() - self.started

    def pids(self) -> dict[str, int]:
        found = re.finditer(r"\[up\] +(\w+) SERVING on \S+ \(pid (\d+)\)", self.output)
        return {m[1]: int(m[2]) for m in found}

    def wait_exit(self) -> tuple[int, float]:
        started = time.monotonic()
        code = self.process.wait(STOP_TIMEOUT_S)
        self.reader.join(10)
        return code, time.monotonic() - started

    def leftovers(self) -> dict[int, list[int]]:
        """Live processes of up's session and of each service's session."""
        sessions = [self.process.pid, *self.pids().values()]
        return {sid: members for sid in sessions if (members := session_members(sid))}

    def end(self) -> None:
        """After the test, pass or fail: nothing of this run may survive."""
        with contextlib.suppress(ProcessLookupError):
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(STOP_TIMEOUT_S)
        for members in self.leftovers().values():
            for pid in members:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


@pytest.fixture
def start_up() -> Iterator:
    runs: list[UpProcess] = []

    def start(data_dir: Path, *args: str) -> UpProcess:
        runs.append(UpProcess(data_dir, *args))
        return runs[-1]

    yield start
    for run in runs:
        run.end()


def manifest_path(data_dir: Path, model_id: str) -> Path:
    return data_dir / "store" / "models" / model_id / "manifest.json"


def test_up_imports_the_toy_world_base_serves_and_stops_on_sigterm(tmp_path: Path, start_up) -> None:
    data_dir = tmp_path / "data"
    up = start_up(data_dir)
    ready_s = up.wait_ready()
    print(f"first start: ready in {ready_s:.1f} s")
    assert "imported base model toy-world" in up.output
    assert manifest_path(data_dir, "toy-world").is_file()
    assert sorted(up.pids()) == sorted(SERVICES)
    for name in SERVICES:  # one stream, every line with its process's name
        assert re.search(rf"^\[{name}\] +\S", up.output, re.MULTILINE), name

    with DreamBoothClient(
        trainer=up.address("trainer"), inference=up.address("inference"), timeout=30
    ) as client:
        models = {model.name: model for model in client.list_models()}
        assert "models/toy-world" in models
        assert client.get_model("toy-world").name == "models/toy-world"
        assert list(client.list_training_jobs()) == []  # the trainer answers too
        images = client.generate("toy-world", "a photo of a red ball", steps=4, width=64, height=64, seed=0)
    assert len(images) == 1 and images[0].data.startswith(b"\x89PNG") and images[0].seed == 0

    pids = up.pids()
    up.process.send_signal(signal.SIGTERM)
    code, stop_s = up.wait_exit()
    print(f"SIGTERM to exit: {stop_s:.1f} s")
    assert code == 0, up.output[-4000:]
    assert re.search(r"^\[up\] +SIGTERM: stopping the services$", up.output, re.MULTILINE)
    assert re.search(r"^\[up\] +stopped$", up.output, re.MULTILINE)
    assert up.leftovers() == {}
    for pid in pids.values():
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_up_keeps_an_imported_model_and_exits_1_when_a_service_dies(
    tmp_path: Path, tiny_model_dir: Path, start_up
) -> None:
    data_dir = tmp_path / "data"  # the state a first start leaves: tiny-sd in the store
    models = ModelStore(LocalObjectStore(data_dir / "store"), tmp_path / "import-cache")
    models.import_folder(tiny_model_dir, "tiny-sd", kind="base")
    manifest = manifest_path(data_dir, "tiny-sd").read_bytes()

    up = start_up(data_dir, "--base-model-id", "tiny-sd")
    ready_s = up.wait_ready()
    print(f"start with the model in the store: ready in {ready_s:.1f} s")
    assert "base model tiny-sd is in the store" in up.output
    assert "[tiny-model]" not in up.output and "imported base model" not in up.output
    assert manifest_path(data_dir, "tiny-sd").read_bytes() == manifest  # not imported again

    pids = up.pids()
    os.kill(pids["trainer"], signal.SIGKILL)  # the one with Ray processes of its own
    code, stop_s = up.wait_exit()
    print(f"SIGKILL of the trainer to exit: {stop_s:.1f} s")
    assert code == 1, up.output[-4000:]
    assert "error: trainer exited unexpectedly (killed by SIGKILL); stopping the others" in up.output
    assert re.search(r"^\[up\] +stopped; exiting with status 1$", up.output, re.MULTILINE)
    assert up.leftovers() == {}
