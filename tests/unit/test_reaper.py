"""The trainer's watcher: a trainer killed -9 takes its local Ray's processes with it; a clean
stop leaves nothing running and kills nothing."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

from services.trainer.driver.reaper import descendants

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _gone(pid: int, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                if stat.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except OSError:
            return True
        time.sleep(0.05)
    return False


def _trainer(script: str) -> subprocess.Popen[str]:
    """A stand-in trainer: starts the watcher and a child (Ray's place), prints their pids."""
    code = textwrap.dedent(
        """
        import os, subprocess, sys, time
        from services.trainer.driver.reaper import start_reaper, stop_reaper
        reaper = start_reaper()
        child = subprocess.Popen(["sleep", "120"])
        print(reaper.pid, child.pid, flush=True)
        time.sleep(2.5)  # at least one snapshot of the descendants
        """
    ) + textwrap.dedent(script)
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)


def test_a_killed_trainer_takes_its_descendants_with_it() -> None:
    trainer = _trainer("os.kill(os.getpid(), 9)")
    reaper, child = (int(pid) for pid in trainer.stdout.readline().split())  # type: ignore[union-attr]
    trainer.wait(30)
    assert _gone(child), "the trainer's child outlived it"
    assert _gone(reaper), "the watcher did not exit"


def test_a_clean_stop_ends_the_watcher_and_kills_nothing() -> None:
    trainer = _trainer("stop_reaper(reaper); child.wait(30)")  # the child outlives the stop
    reaper, child = (int(pid) for pid in trainer.stdout.readline().split())  # type: ignore[union-attr]
    assert _gone(reaper)
    assert not _gone(child, timeout=1.0)
    os.kill(child, 9)
    trainer.wait(30)


def test_descendants_are_found_through_the_tree() -> None:
    outer = subprocess.Popen(["sh", "-c", "sleep 60 & wait"])
    try:
        deadline = time.monotonic() + 10
        while len(descendants(os.getpid())) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert outer.pid in descendants(os.getpid()) and len(descendants(os.getpid())) >= 2
    finally:
        for pid in descendants(outer.pid):
            os.kill(pid, 9)
        outer.kill()
        outer.wait()
