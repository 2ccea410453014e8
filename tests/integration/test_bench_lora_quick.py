"""`bench/lora.py --quick`: every step of the LoRA benchmark runs, its checks pass, and its last
line is the JSON object docs/benchmarks.md quotes (a smoke test; speed is never asserted)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "lora.py"
FIGURES = {
    "switch_ms",
    "full_load_ms",
    "switch_fraction",
    "adapter_bytes",
    "full_model_bytes",
    "full_model_new_bytes",
    "mixed_images_per_s",
    "single_lora_images_per_s",
    "mixed_ratio",
    "runtime_images_per_s",
    "merged_images_per_s",
    "fused_ratio",
}


def test_the_quick_lora_benchmark_runs_and_ends_with_its_figures(capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location("bench_lora", BENCH)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--quick"]) == 0
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(figures) == FIGURES
    assert 0 < figures["adapter_bytes"] < figures["full_model_new_bytes"] < figures["full_model_bytes"]
    assert all(figures[name] > 0 for name in ("switch_ms", "full_load_ms", "mixed_ratio", "fused_ratio"))
