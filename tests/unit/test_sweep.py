"""`dreambooth train --sweep`: parsing the axes, the grid, the usage it refuses, the result table."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from dreambooth.v1 import trainer_pb2
from dreambooth_client import cli, sweep

BASE = ["train", "--base-model", "tiny-sd", "--dataset", "datasets/abc", "--instance-prompt", "a sks dog"]


def test_values_are_parsed_with_the_fields_type() -> None:
    assert sweep.parse_axis("learning_rate=1e-4, 2e-4").values == (1e-4, 2e-4)
    assert sweep.parse_axis("max_train_steps=100,200").values == (100, 200)
    assert sweep.parse_axis("use_lora=true,false").values == (True, False)
    assert sweep.parse_axis("lr_schedule=constant,cosine").values == ("constant", "cosine")


def test_the_grid_is_the_cartesian_product_first_axis_slowest() -> None:
    axes = sweep.parse_axes(["learning_rate=1e-4,2e-4", "max_train_steps=100,200,300"])
    points = sweep.grid(axes)
    assert len(points) == 6
    assert points[:4] == [
        {"learning_rate": 1e-4, "max_train_steps": 100},
        {"learning_rate": 1e-4, "max_train_steps": 200},
        {"learning_rate": 1e-4, "max_train_steps": 300},
        {"learning_rate": 2e-4, "max_train_steps": 100},
    ]
    assert sweep.grid([]) == [{}]  # no axes: the one job the spec describes


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("learning_rate", "expected NAME=VALUE,VALUE,..."),
        ("=1,2", "expected NAME=VALUE,VALUE,..."),
        ("steps=1,2", "--sweep steps: not a training spec field (the spec calls it max_train_steps)"),
        ("colour=red", "--sweep colour: not a training spec field"),
        ("validation_prompts=a,b", "a list field cannot be swept"),
        ("max_train_steps=100,", "without empty values"),
        ("max_train_steps=1.5", "--sweep max_train_steps=1.5: expected a whole number, got '1.5'"),
        ("learning_rate=0,1e-4", "--sweep learning_rate=0: must be in >0..1, got 0"),
        ("learning_rate=fast", "expected a number, got 'fast'"),
        ("use_lora=maybe", "expected true or false, got 'maybe'"),
        ("lr_schedule=warp", "must be one of constant"),
        ("learning_rate=1e-4,0.0001", "0.0001 is given twice"),
    ],
)
def test_bad_axes_are_refused_before_any_job(text: str, message: str) -> None:
    with pytest.raises(sweep.SweepError) as refused:
        sweep.parse_axis(text)
    assert message in str(refused.value)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--sweep", "seed=1,2", "--sweep", "seed=3"], "--sweep seed: given twice"),
        (["--lr", "1e-4", "--sweep", "learning_rate=1e-4,2e-4"], "also given as --lr; give one or the other"),
        (["--model-id", "mine", "--sweep", "seed=1,2"], "model_id names one model"),
        (["--sweep", "seed=1,2", "--previews", "out"], "--previews saves one job's previews"),
        (["--sweep", "seed=1,2", "--toybench-subject", "no-such-subject"], "no held-out subject"),
    ],
)
def test_sweep_usage_errors_exit_2_before_any_call(
    argv: list[str], message: str, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["--trainer", "127.0.0.1:1", *BASE, *argv])  # nothing listens: no call is made
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_toybench_scoring_is_refused_clearly_without_toybench(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "toybench.exported", None)  # as with the client alone installed
    with pytest.raises(SystemExit) as exited:
        cli.main(["--trainer", "127.0.0.1:1", *BASE, "--toybench-subject", "striped-ball"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "--toybench-subject needs the toybench package" in err and "server distribution" in err


def test_the_table_has_a_row_per_point(tmp_path: Path) -> None:
    done = trainer_pb2.TrainingJob(
        name="trainingJobs/a",
        state=trainer_pb2.TRAINING_JOB_STATE_SUCCEEDED,
        progress=trainer_pb2.TrainingProgress(step=2, total_steps=2, loss=0.25),
        model="models/job-a",
    )
    failed = trainer_pb2.TrainingJob(
        name="trainingJobs/b", state=trainer_pb2.TRAINING_JOB_STATE_FAILED, error_message="out of memory"
    )
    runs = [
        sweep.PointRun({"learning_rate": 1e-4}, done, scores={"subject_fidelity": 0.5}),
        sweep.PointRun({"learning_rate": 2e-4}, failed),
        sweep.PointRun({"learning_rate": 3e-4}, None, error="INVALID_ARGUMENT: spec.x: no"),
    ]
    headers, rows = sweep.table_rows(runs, ["learning_rate"], ["subject_fidelity"])
    assert headers == ["learning_rate", "JOB", "STATE", "LOSS", "MODEL", "SUBJECT_FIDELITY"]
    assert rows == [
        ["0.0001", "trainingJobs/a", "SUCCEEDED", "0.2500", "models/job-a", "0.500"],
        ["0.0002", "trainingJobs/b", "FAILED", "", "", ""],
        ["0.0003", "", "REFUSED", "", "", ""],
    ]
    assert [point.succeeded for point in runs] == [True, False, False]
    assert sweep.errors(runs) == [
        "[2/3] learning_rate=0.0002: trainingJobs/b  FAILED  error: out of memory",
        "[3/3] learning_rate=0.0003: INVALID_ARGUMENT: spec.x: no",
    ]
    assert sweep.records(runs)[0]["loss"] == 0.25 and sweep.records(runs)[2]["state"] == "REFUSED"
