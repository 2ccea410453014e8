"""The PrometheusRule's groups through Prometheus' own tooling: `promtool check rules` (syntax,
PromQL, templates) and `promtool test rules` (alerts fire on synthetic series, and only then).

Skipped with a reason when promtool is not on PATH (Debian's `prometheus` package; `make tools`).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
PROMETHEUS_RULE = REPO / "k8s" / "base" / "monitoring" / "prometheusrule.yaml"
PROMTOOL = shutil.which("promtool")

needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not on PATH (apt-get install prometheus, or `make tools`)"
)

INFERENCE = {"job": "dreambooth-inference", "namespace": "dreambooth"}
TRAINER = {"job": "dreambooth-trainer", "namespace": "dreambooth"}


def series(name: str, labels: dict[str, str], values: str) -> dict[str, str]:
    """One input series in promtool's notation, e.g. values "0+60x30": +60 a minute for 30 min."""
    selector = ", ".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
    return {"series": f"{name}{{{selector}}}", "values": values}


def alert(
    name: str, at: str, *expected: dict[str, str], annotations: dict[str, str] | None = None
) -> dict[str, Any]:
    """`name` is firing at `at` with exactly these label sets (none: it must not fire).

    promtool compares annotations too; the cases run on rules without them (firing logic only)
    unless `annotations` is given, which then checks how the templates render.
    """
    exp_alerts = [
        {"exp_labels": labels, **({"exp_annotations": annotations} if annotations else {})}
        for labels in expected
    ]
    return {"alertname": name, "eval_time": at, "exp_alerts": exp_alerts}


# Each case: synthetic series, then which alerts fire (and which must stay silent) when.
CASES: dict[str, dict[str, Any]] = {
    "target-down": {
        "input_series": [series("up", {**TRAINER, "instance": "10.0.0.7:9181"}, "0x10")],
        "alert_rule_test": [
            alert("DreamboothTargetDown", "3m"),  # not yet: `for: 5m`
            alert(
                "DreamboothTargetDown",
                "6m",
                {**TRAINER, "instance": "10.0.0.7:9181", "severity": "critical"},
            ),
        ],
    },
    "target-down-annotations": {
        "keep_annotations": True,
        "input_series": [series("up", {**TRAINER, "instance": "10.0.0.7:9181"}, "0x10")],
        "alert_rule_test": [
            alert(
                "DreamboothTargetDown",
                "6m",
                {**TRAINER, "instance": "10.0.0.7:9181", "severity": "critical"},
                annotations={
                    "summary": "dreambooth-trainer target 10.0.0.7:9181 is down",
                    "description": "Prometheus has not scraped dreambooth-trainer at 10.0.0.7:9181 for 5 "
                    "minutes: the pod is gone, crash-looping, or its metrics port is unreachable.",
                },
            ),
        ],
    },
    "server-errors": {
        # Inference: 1 OK and 1/6 INTERNAL request per second (14% errors). Trainer: as many
        # failures, but INVALID_ARGUMENT: the client's fault, no alert.
        "input_series": [
            series(
                "dreambooth_inference_requests_total",
                {**INFERENCE, "method": "Generate", "code": "OK"},
                "0+60x30",
            ),
            series(
                "dreambooth_inference_requests_total",
                {**INFERENCE, "method": "Generate", "code": "INTERNAL"},
                "0+10x30",
            ),
            series(
                "dreambooth_trainer_requests_total",
                {**TRAINER, "method": "CreateTrainingJob", "code": "OK"},
                "0+60x30",
            ),
            series(
                "dreambooth_trainer_requests_total",
                {**TRAINER, "method": "CreateTrainingJob", "code": "INVALID_ARGUMENT"},
                "0+60x30",
            ),
        ],
        "alert_rule_test": [
            alert("DreamboothHighErrorRate", "8m"),
            alert("DreamboothHighErrorRate", "20m", {"job": "dreambooth-inference", "severity": "critical"}),
            alert("DreamboothRequestsRejected", "20m"),
        ],
    },
    "queue-full": {
        "input_series": [
            series(
                "dreambooth_inference_requests_total",
                {**INFERENCE, "method": "Generate", "code": "OK"},
                "0+60x20",
            ),
            series(
                "dreambooth_inference_requests_total",
                {**INFERENCE, "method": "Generate", "code": "RESOURCE_EXHAUSTED"},
                "0+6x20",
            ),
            series("dreambooth_inference_queue_depth", {**INFERENCE, "pod": "inference-a"}, "30x30"),
            series("dreambooth_inference_queue_depth", {**INFERENCE, "pod": "inference-b"}, "2x30"),
        ],
        "alert_rule_test": [
            alert(
                "DreamboothRequestsRejected", "15m", {"job": "dreambooth-inference", "severity": "warning"}
            ),
            alert("DreamboothHighErrorRate", "15m"),  # RESOURCE_EXHAUSTED is load, not failure
            alert(
                "DreamboothInferenceQueueBacklog",
                "25m",
                {**INFERENCE, "pod": "inference-a", "severity": "warning"},
            ),
        ],
    },
    "slow-unary-calls": {
        # Every GetTrainingJob takes 1-2.5 s (p95 ~2.4 s); Generate streams are long by nature.
        "input_series": [
            *(
                series(
                    "dreambooth_trainer_request_duration_seconds_bucket",
                    {**TRAINER, "method": "GetTrainingJob", "le": le},
                    values,
                )
                for le, values in (("0.5", "0x40"), ("1.0", "0x40"), ("2.5", "0+60x40"), ("+Inf", "0+60x40"))
            ),
            *(
                series(
                    "dreambooth_inference_request_duration_seconds_bucket",
                    {**INFERENCE, "method": "Generate", "le": le},
                    values,
                )
                for le, values in (("10.0", "0x40"), ("60.0", "0+60x40"), ("+Inf", "0+60x40"))
            ),
        ],
        "alert_rule_test": [
            alert(
                "DreamboothSlowRequests",
                "30m",
                {"job": "dreambooth-trainer", "method": "GetTrainingJob", "severity": "warning"},
            ),
        ],
    },
    "no-model-loaded": {
        "input_series": [
            series("dreambooth_inference_models_loaded", {**INFERENCE, "pod": "inference-a"}, "0x30"),
            series("dreambooth_inference_models_loaded", {**INFERENCE, "pod": "inference-b"}, "1x30"),
        ],
        "alert_rule_test": [
            alert("DreamboothNoModelLoaded", "10m"),
            alert(
                "DreamboothNoModelLoaded",
                "20m",
                {"job": "dreambooth-inference", "pod": "inference-a", "severity": "critical"},
            ),
        ],
    },
    "training-failures": {
        # One job finishes every 10 minutes; from the start on, three of four fail.
        "input_series": [
            series("dreambooth_trainer_jobs_finished_total", {**TRAINER, "state": "failed"}, "0+0.3x60"),
            series("dreambooth_trainer_jobs_finished_total", {**TRAINER, "state": "succeeded"}, "0+0.1x60"),
        ],
        "alert_rule_test": [
            alert("DreamboothTrainingJobsFailing", "5m"),  # too few jobs yet to call it a trend
            alert("DreamboothTrainingJobsFailing", "40m", {"severity": "critical"}),
            alert("DreamboothTrainingJobFailed", "40m", {"severity": "info"}),
        ],
    },
    "training-stalled": {
        "input_series": [
            series("dreambooth_trainer_jobs", {**TRAINER, "state": "training"}, "1x60"),
            series("dreambooth_trainer_step_duration_seconds_count", TRAINER, "0+10x10 100x50"),
        ],
        "alert_rule_test": [
            alert("DreamboothTrainingStalled", "12m"),  # stepping until minute 10
            alert("DreamboothTrainingStalled", "45m", {"severity": "warning"}),
        ],
    },
}


def rule_groups() -> list[dict[str, Any]]:
    with PROMETHEUS_RULE.open() as handle:
        rule = yaml.safe_load(handle)
    assert rule["kind"] == "PrometheusRule"
    return rule["spec"]["groups"]


def write_rules(path: Path, groups: list[dict[str, Any]]) -> Path:
    """The PrometheusRule's spec.groups as a plain Prometheus rules file."""
    path.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    return path


def without_annotations(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {**group, "rules": [{k: v for k, v in rule.items() if k != "annotations"} for rule in group["rules"]]}
        for group in groups
    ]


@pytest.fixture
def rules_file(tmp_path: Path) -> Path:
    return write_rules(tmp_path / "dreambooth.rules.yaml", rule_groups())


def promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


@needs_promtool
def test_promtool_check_rules(rules_file: Path) -> None:
    result = promtool("check", "rules", rules_file.name, cwd=rules_file.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@needs_promtool
@pytest.mark.parametrize("case", list(CASES))
def test_promtool_alert_unit_tests(tmp_path: Path, case: str) -> None:
    spec = dict(CASES[case])
    groups = rule_groups() if spec.pop("keep_annotations", False) else without_annotations(rule_groups())
    rules = write_rules(tmp_path / "dreambooth.rules.yaml", groups)
    tests = {"rule_files": [rules.name], "evaluation_interval": "1m", "tests": [{"interval": "1m", **spec}]}
    test_file = tmp_path / f"{case}.test.yaml"
    test_file.write_text(yaml.safe_dump(tests, sort_keys=False))
    result = promtool("test", "rules", test_file.name, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_is_unit_tested() -> None:
    alerts = {rule["alert"] for group in rule_groups() for rule in group["rules"] if "alert" in rule}
    tested = {check["alertname"] for case in CASES.values() for check in case["alert_rule_test"]}
    untested = alerts - tested
    # These three are a latency threshold, an eviction rate and a gauge threshold, each written
    # like the ones tested above; they are checked by `promtool check rules` only.
    assert untested <= {
        "DreamboothGenerateSlow",
        "DreamboothModelCacheThrashing",
        "DreamboothTrainingQueueBacklog",
    }
    assert not tested - alerts, f"tests of alerts that do not exist: {tested - alerts}"
