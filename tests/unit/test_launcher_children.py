"""`up`'s child processes: output line by line with the child's name, and nothing left behind."""

from __future__ import annotations

import io
import os
import signal
import sys
import threading

import pytest

from services.launcher.children import Child, describe_exit, session_members
from services.launcher.up import LogStream


class Lines:
    def __init__(self) -> None:
        self.lines: list[tuple[str, str]] = []
        self.lock = threading.Lock()

    def __call__(self, name: str, line: str) -> None:
        with self.lock:
            self.lines.append((name, line))


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_output_reaches_the_sink_line_by_line_in_order() -> None:
    sink = Lines()
    code = "import sys; print('one'); print('two', file=sys.stderr, flush=True); print('thr\\u00e9e')"
    child = Child("svc", python(code), os.environ, sink, tail_lines=2)
    assert child.wait(30) == 0
    child.end_session(linger=0)
    assert sink.lines == [("svc", "one"), ("svc", "two"), ("svc", "thrée")]
    assert child.tail() == "two\nthrée"


def test_a_child_has_its_own_session() -> None:
    child = Child("svc", python("import time; time.sleep(30)"), os.environ, Lines())
    try:
        assert os.getsid(child.pid) == child.pid != os.getsid(0)
        assert session_members(child.pid) == [child.pid]
        child.terminate()
        assert child.wait(10) == -signal.SIGTERM
    finally:
        child.end_session(linger=0)


def test_end_session_kills_what_the_child_left_behind() -> None:
    sink = Lines()
    code = (
        "import subprocess; p = subprocess.Popen(['sleep', '600'], stdout=subprocess.DEVNULL); "
        "print(p.pid, flush=True)"
    )
    child = Child("svc", python(code), os.environ, sink)
    assert child.wait(30) == 0
    orphan = int(sink.lines[0][1])
    assert session_members(child.pid) == [orphan]
    assert child.end_session(linger=0.2) == [orphan]
    assert session_members(child.pid) == []


def test_end_session_kills_a_child_that_still_runs() -> None:
    child = Child("svc", python("import time; time.sleep(30)"), os.environ, Lines())
    assert child.end_session(linger=0) == []
    assert child.returncode == -signal.SIGKILL
    with pytest.raises(ProcessLookupError):
        os.kill(child.pid, 0)


@pytest.mark.parametrize(
    ("code", "text"),
    [(0, "exit code 0"), (3, "exit code 3"), (-9, "killed by SIGKILL"), (-15, "killed by SIGTERM")],
)
def test_describe_exit(code: int, text: str) -> None:
    assert describe_exit(code) == text


def test_log_stream_prefixes_every_line_with_an_aligned_name() -> None:
    buffer = io.StringIO()
    stream = LogStream(buffer)
    stream.line("up", "ready")
    stream.line("inference", '{"msg": "serving"}')
    stream.line("tiny-model", "wrote it")
    assert buffer.getvalue().splitlines() == [
        "[up]         ready",
        '[inference]  {"msg": "serving"}',
        "[tiny-model] wrote it",
    ]
