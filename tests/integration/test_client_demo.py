"""`python -m demo` end to end, shortened: services as subprocesses, the SDK, real training."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]  # `demo` is a top-level package there


@pytest.mark.slow
def test_demo_runs_the_whole_flow_and_stops_its_services(tmp_path: Path) -> None:
    out, store = tmp_path / "out", tmp_path / "store"
    command = [sys.executable, "-m", "demo", "--out", str(out), "--store", str(store)]
    command += ["--steps", "10", "--photos", "3", "--class-images", "2", "--images", "1"]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "=== DreamBooth demo: done ===" in done.stdout
    assert re.search(r"state +trainingJobs/\w+ +SUCCEEDED +model models/", done.stdout)
    backgrounds = ("beach", "night", "snow", "studio")
    expected = ["base-class-0-seed0.png", "contact-sheet.png", *(f"sks-{b}-0-seed0.png" for b in backgrounds)]
    assert sorted(p.name for p in out.glob("*.png")) == sorted([*expected, "tuned-class-0-seed0.png"])
    assert len(list((out / "subject").glob("*.png"))) == 3
    assert (store / "models" / "toy-world" / "manifest.json").exists()
    assert re.search(r"subject fidelity \d\.\d{3} \(the uploads among themselves", done.stdout)
    for pid in map(int, re.findall(r"SERVING on 127\.0\.0\.1:\d+ \(pid (\d+)\)", done.stdout)):
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # every service the demo started is gone
