"""Every benchmark's `--quick` smoke run, so a benchmark never rots: it runs its project side and
its baseline, and its last line is one JSON object with the keys the docs quote. No timing is
asserted (speed is measured in bench/, figures in docs/benchmarks.md)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from services.common.toy_base_files import COMMITTED_BASE, MANIFEST_FILE

ROOT = Path(__file__).resolve().parents[2]
KEYS = {
    "priorgen.py": {"ratio_vs_batched", "baseline_images_per_s", "identical_images", "max_pixel_difference"},
    "inference.py": {"sequential_ratio", "concurrent_vs_ideal", "concurrent_identical_images"},
    "train.py": {"ratio", "plain_steps_per_s", "ray_steps_per_s", "job_wall_s"},
    "quality.py": {
        "subject_fidelity_ratio",
        "prompt_fidelity",
        "class_accuracy_drop",
        "other_class_accuracy_drop",
        "prior_beats_no_prior",
        "lora_ratio",
        "rows",
        "multi_subject",
    },
    "lora.py": {
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
    },
}
# What must hold of a quick run's figures beyond their presence (never a speed).
CHECKS = {
    "quality.py": lambda r: (  # the quick run's one multi-subject job: both subjects scored
        set(r["multi_subject"]) == {"2_subjects"}
        and len(r["multi_subject"]["2_subjects"]["rows"]) == 2
        and all(0 <= row["confusion"] <= 1 for row in r["multi_subject"]["2_subjects"]["rows"].values())
    ),
    "lora.py": lambda r: (
        0 < r["adapter_bytes"] < r["full_model_new_bytes"] < r["full_model_bytes"]
        and all(r[name] > 0 for name in ("switch_ms", "full_load_ms", "mixed_ratio", "fused_ratio"))
    ),
}


@pytest.mark.timeout(900)  # quality.py --quick fine-tunes four recipes and one 2-subject job
@pytest.mark.parametrize("bench", sorted(KEYS))
def test_a_quick_run_ends_with_one_json_line_of_its_figures(bench: str, tmp_path: Path) -> None:
    (tmp_path / "ray_bootstrap_config.yaml").write_text("provider:\n  type: local\n")  # Ray stays offline
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / bench), "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=840,
        env={**os.environ, "HOME": str(tmp_path), "RAY_USAGE_STATS_ENABLED": "0"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert KEYS[bench] <= set(result), result
    assert all(value is not None for key, value in result.items() if key in KEYS[bench]), result
    assert CHECKS.get(bench, lambda _: True)(result), result


def test_the_quality_benchmark_refuses_a_model_of_another_world(tmp_path: Path) -> None:
    other = tmp_path / "other-world"
    shutil.copytree(COMMITTED_BASE, other)
    manifest = json.loads((other / MANIFEST_FILE).read_text())
    manifest["world_fingerprint"] = "f" * 64
    (other / MANIFEST_FILE).write_text(json.dumps(manifest))
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "quality.py"), "--quick", "--base", str(other)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "another drawing of the toy world" in done.stderr and "Traceback" not in done.stderr
