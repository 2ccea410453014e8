"""The local Ray dies with the trainer, even when the trainer is killed with SIGKILL.

A trainer that starts a local Ray is the parent of Ray's processes (GCS, raylet, workers); when
it is killed -9 nothing of its own runs, and those processes used to live on (~180 MB) while a
training worker went on writing checkpoints. So the trainer starts this small watcher as a child
process with a pipe it never writes to. The watcher notes the trainer's descendants once a
second while the trainer lives; when the pipe closes (the kernel closes it when the trainer dies,
however it dies) and the trainer is gone, it kills the descendants it noted, each checked by its
start time so that a recycled process id is never hit. Only the trainer's own descendants are
touched: never its session, which may be a user's terminal.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

SNAPSHOT_SECONDS = 1.0
EXIT_GRACE_SECONDS = 5.0


def start_reaper() -> subprocess.Popen[bytes]:
    """Start the watcher of this process; keep the returned handle for the life of the trainer."""
    read_end, write_end = os.pipe()
    process = subprocess.Popen(
        [sys.executable, "-m", "services.trainer.driver.reaper", str(os.getpid())],
        stdin=read_end,
        close_fds=True,
    )
    os.close(read_end)
    process._dreambooth_pipe = write_end  # type: ignore[attr-defined]  # closed only by our death
    return process


def stop_reaper(process: subprocess.Popen[bytes]) -> None:
    """A clean shutdown: Ray was stopped by the trainer itself; the watcher is ended before its
    pipe closes, so it never mistakes this for the trainer's death."""
    process.terminate()
    process.wait(10)
    os.close(process._dreambooth_pipe)  # type: ignore[attr-defined]


def _stat(pid: int) -> tuple[int, str, int] | None:
    """(parent pid, state, start time) of a process, None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
    return int(fields[1]), fields[0], int(fields[19])


def descendants(root: int) -> dict[int, int]:
    """{pid: start time} of every live descendant of `root`."""
    children: dict[int, list[int]] = {}
    starts: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None:
            children.setdefault(stat[0], []).append(int(entry.name))
            starts[int(entry.name)] = stat[2]
    found: dict[int, int] = {}
    pending = list(children.get(root, []))
    while pending:
        pid = pending.pop()
        if pid not in found and pid in starts:
            found[pid] = starts[pid]
            pending.extend(children.get(pid, []))
    return found


def _alive(pid: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[1] != "Z"


def watch(parent: int) -> None:
    me = os.getpid()
    noted: dict[int, int] = {}
    while True:
        readable, _, _ = select.select([sys.stdin], [], [], SNAPSHOT_SECONDS)
        if readable and not sys.stdin.buffer.read1(1):  # EOF: the trainer closed it or died
            break
        noted = {pid: start for pid, start in descendants(parent).items() if pid != me}
    # The kernel closes a dying process's files before it becomes a zombie: give it a moment.
    deadline = time.monotonic() + EXIT_GRACE_SECONDS
    while _alive(parent) and time.monotonic() < deadline:
        time.sleep(0.05)
    if _alive(parent):
        return  # the pipe closed but the trainer lives on: not ours to clean up
    for pid, start in noted.items():
        stat = _stat(pid)
        if stat is not None and stat[2] == start:  # the same process, not a recycled id
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C in the terminal is the trainer's to handle
    watch(int(sys.argv[1]))
