"""`up`'s supervision with stand-in services (tests/integration/fake_service.py: gRPC health only).

Fast (no torch, no Ray): ready and a clean stop, a service that dies, one that fails to start,
one that leaves a process behind, a store without the base model asked for. The real services
are in test_up.py.
"""

from __future__ import annotations

import io
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.common.local_store import LocalObjectStore
from services.common.model_store import ModelStore
from services.launcher import up
from services.launcher.children import session_members
from services.launcher.plan import SERVICES, env_prefix

TIMEOUT_S = 60.0


def fake_argv(name: str) -> list[str]:
    return [sys.executable, "-m", "tests.integration.fake_service", name]


class UpThread:
    """`up` run in this process (a thread) with fake services; `stop()` is what a signal does."""

    def __init__(self, data_dir: Path, *extra: str) -> None:
        self.buffer = io.StringIO()
        # The store holds tiny-sd (see data_dir); a later --base-model-id in `extra` wins.
        argv = ["--data-dir", str(data_dir), "--start-timeout", "60", "--base-model-id", "tiny-sd", *extra]
        args = up.parse_args(argv)
        self.up = up.Up(args, up.LogStream(self.buffer), argv=fake_argv)
        self.status: int | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        self.status = self.up.run()

    @property
    def output(self) -> str:
        return self.buffer.getvalue()

    def wait_for(self, pattern: str, timeout: float = TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while not re.search(pattern, self.output, re.MULTILINE):
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise AssertionError(f"no {pattern!r} in:\n{self.output}")
            time.sleep(0.05)

    def pids(self) -> dict[str, int]:
        return {
            m[1]: int(m[2]) for m in re.finditer(r"\[up\] +(\w+) SERVING on \S+ \(pid (\d+)\)", self.output)
        }

    def stop(self) -> None:
        self.up.signals.append("SIGTERM")

    def join(self) -> int:
        self.thread.join(TIMEOUT_S)
        assert not self.thread.is_alive(), self.output
        assert self.status is not None
        return self.status


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A data dir whose store has a (fake) base model tiny-sd; every service on a free port."""
    for name in SERVICES:
        monkeypatch.setenv(f"{env_prefix(name)}PORT", "0")
    for variable in ("DREAMBOOTH_S3_ENDPOINT", "RAY_ADDRESS", "DREAMBOOTH_INFERENCE_DEFAULT_MODEL"):
        monkeypatch.delenv(variable, raising=False)
    folder = tmp_path / "fake-model"
    folder.mkdir()
    (folder / "model_index.json").write_text("{}")
    data = tmp_path / "data"
    ModelStore(LocalObjectStore(data / "store"), tmp_path / "cache").import_folder(folder, "tiny-sd")
    yield data


def running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's zombie waits for whoever reaps it, not for us)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2 :].split()[0] != "Z"


def assert_gone(pids: dict[str, int]) -> None:
    for name, pid in pids.items():
        assert session_members(pid) == [], f"{name} (pid {pid}) or its processes are still there"


def test_ready_then_a_signal_stops_everything_with_status_0(data_dir: Path) -> None:
    run = UpThread(data_dir)
    run.wait_for(r"^\[up\] +ready in")
    pids = run.pids()
    assert sorted(pids) == sorted(SERVICES)
    assert "base model tiny-sd is in the store" in run.output
    for name in SERVICES:  # each service's own lines, prefixed with its name
        assert re.search(rf"^\[{name}\] +fake {name} serving$", run.output, re.MULTILINE)
    run.stop()
    assert run.join() == 0
    assert re.search(r"^\[up\] +stopped$", run.output, re.MULTILINE)
    for name in SERVICES:
        assert re.search(rf"^\[{name}\] +fake {name} stopped$", run.output, re.MULTILINE)
    assert_gone(pids)


def test_a_service_that_dies_stops_the_others_and_up_exits_1(data_dir: Path) -> None:
    run = UpThread(data_dir)
    run.wait_for(r"^\[up\] +ready in")
    pids = run.pids()
    os.kill(pids["trainer"], signal.SIGKILL)
    assert run.join() == 1
    assert "error: trainer exited unexpectedly (killed by SIGKILL); stopping the others" in run.output
    for name in ("priorgen", "inference"):  # stopped gracefully, by SIGTERM
        assert re.search(rf"^\[{name}\] +fake {name} stopped$", run.output, re.MULTILINE)
    assert_gone(pids)


def test_a_service_that_fails_to_start(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_INFERENCE_EXIT", "3")
    run = UpThread(data_dir)
    assert run.join() == 1
    assert "error: inference exited unexpectedly (exit code 3); stopping the others" in run.output
    assert "ready in" not in run.output
    assert_gone(run.pids())


def test_processes_a_service_leaves_behind_are_ended(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_TRAINER_ORPHAN", "1")
    run = UpThread(data_dir)
    run.wait_for(r"^\[up\] +ready in")
    orphan = int(re.findall(r"orphan pid (\d+)", run.output)[0])
    run.stop()
    assert run.join() == 1  # stopping was not clean
    assert f"error: trainer left processes behind: killed {orphan}" in run.output
    assert not running(orphan)


def test_a_store_without_the_base_model_asked_for_starts_nothing(data_dir: Path) -> None:
    run = UpThread(data_dir, "--base-model-id", "sd15")
    assert run.join() == 2
    assert "base model 'sd15' is not in the store" in run.output and "it holds tiny-sd" in run.output
    assert run.pids() == {} and "[priorgen]" not in run.output
