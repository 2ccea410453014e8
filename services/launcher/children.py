"""One child process of the launcher: its own session, its output read line by line.

A child runs in a new session, so a Ctrl-C in the terminal reaches only the launcher (which
decides how to stop it), and everything the child starts (the trainer's Ray processes) can be
found afterwards by session id and ended, without touching any other process.
"""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

LineSink = Callable[[str, str], None]  # (child name, line without its newline)


def session_members(session_id: int) -> list[int]:
    """PIDs of the live processes in a session (Linux /proc; elsewhere the group leader's group)."""
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(session_id, 0)
        except (ProcessLookupError, PermissionError):
            return []
        return [session_id]
    members = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": state ppid pgrp session
        if int(fields[3]) == session_id and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-returncode).name}"
    return f"exit code {returncode}"


class Child:
    """A started process whose merged stdout/stderr goes, line by line, to `sink`."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        env: Mapping[str, str],
        sink: LineSink,
        *,
        cwd: Path | None = None,
        tail_lines: int = 40,
    ) -> None:
        self.name = name
        self._sink = sink
        self._tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
        self.process = subprocess.Popen(
            list(argv),
            env=dict(env),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._pump = threading.Thread(target=self._read_output, name=f"{name}-output", daemon=True)
        self._pump.start()

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        return self.process.poll()

    def running(self) -> bool:
        return self.process.poll() is None

    def tail(self) -> str:
        """Its last lines of output, for an error message."""
        return "\n".join(self._tail)

    def _read_output(self) -> None:
        assert self.process.stdout is not None
        with self.process.stdout:
            for raw in iter(self.process.stdout.readline, b""):
                line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
                self._tail.append(line)
                with contextlib.suppress(Exception):  # a broken sink must not stop the reading
                    self._sink(self.name, line)

    def terminate(self) -> None:
        """SIGTERM: the services stop gracefully (NOT_SERVING, then grace for in-flight calls)."""
        if self.running():
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)

    def wait(self, timeout: float | None) -> int | None:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def end_session(self, linger: float = 5.0) -> list[int]:
        """After the child exited: give what it started `linger` seconds, then SIGKILL the rest.

        Returns the PIDs that had to be killed. Kills the child itself too if it still runs.
        """
        if self.running():
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
            self.wait(10)
        deadline = time.monotonic() + linger
        while session_members(self.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        killed: set[int] = set()
        for _ in range(100):  # SIGKILL cannot be refused: a few rounds catch late forks too
            members = session_members(self.pid)
            if not members:
                break
            for pid in members:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
                    killed.add(pid)
            time.sleep(0.1)
        self._pump.join(timeout=2)  # its output pipe closes once no process holds it
        return sorted(killed)
