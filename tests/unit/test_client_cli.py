"""The `dreambooth` CLI: argument handling, output, exit codes (against the scripted servers)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from dreambooth.v1 import trainer_pb2
from dreambooth_client import cli

from tests.unit.test_client_resilience import scripted  # noqa: F401  (the scripted servers fixture)

GENERATE = ["generate", "--model", "m", "--prompt", "p"]


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = cli.main(list(argv), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "required: COMMAND"),
        (["generate", "--model", "m", "--prompt", "p"], "--out"),
        (
            ["generate", "--model", "m", "--prompt", "p", "--out", "x", "--scheduler", "warp"],
            "invalid choice",
        ),
        (["generate", "--model", "m", "--prompt", "p", "--out", "x", "--n", "0"], "must be >= 1"),
        ([*GENERATE, "--out", "x", "--seed", "4294967296"], "must be in 0..4294967295"),
        ([*GENERATE, "--out", "x", "--seed", "-1"], "must be in 0..4294967295"),
        ([*GENERATE, "--out", "x", "--guidance", "31"], "must be in 1..30"),
        (
            ["train", "--base-model", "m", "--dataset", "d", "--instance-prompt", "p", "--seed", "-2"],
            "0..4294967295",
        ),
        (["train", "--base-model", "m", "--dataset", "d"], "--instance-prompt"),
        (["jobs", "frobnicate"], "invalid choice"),
        (["--trainer", "127.0.0.1:1", "jobs", "get", "a/b/c"], "expected 'trainingJobs/ID'"),
        (["--trainer", "127.0.0.1:1", "upload", "/definitely/not/here"], "no such file or directory"),
    ],
)
def test_bad_usage_is_an_argparse_error(argv: list[str], message: str, capsys) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(argv)
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_addresses_come_from_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("DREAMBOOTH_TRAINER_ADDRESS", "trainer.example:1")
    monkeypatch.setenv("DREAMBOOTH_INFERENCE_ADDRESS", "inference.example:2")
    args = cli.build_parser().parse_args(["models", "list"])
    assert (args.trainer, args.inference) == ("trainer.example:1", "inference.example:2")
    args = cli.build_parser().parse_args(["--trainer", "flag:3", "models", "list"])
    assert args.trainer == "flag:3"


def test_a_server_error_is_one_line_and_exit_1(scripted) -> None:  # noqa: F811
    _, _, address = scripted
    code, out, err = run_cli("--trainer", address, "jobs", "get", "nope")
    assert code == 1
    assert out == ""
    assert err == "error: NOT_FOUND: trainingJobs/nope not found\n"


def test_jobs_list_get_cancel(scripted) -> None:  # noqa: F811
    _, _, address = scripted
    code, out, _ = run_cli("--trainer", address, "jobs", "list", "--limit", "3")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "STATE", "STEP", "MODEL", "CREATED"]
    assert [line.split()[:2] for line in lines[1:]] == [
        ["trainingJobs/p0-0", "SUCCEEDED"],
        ["trainingJobs/p0-1", "SUCCEEDED"],
        ["trainingJobs/p1-0", "SUCCEEDED"],
    ]
    code, out, _ = run_cli("--trainer", address, "jobs", "get", "j1")
    assert code == 0 and "state:           SUCCEEDED" in out and "model:           models/m1" in out
    code, out, _ = run_cli("--trainer", address, "--json", "jobs", "cancel", "trainingJobs/j1")
    assert code == 0 and json.loads(out)["state"] == "TRAINING_JOB_STATE_CANCELLED"


def test_train_wait_prints_one_line_per_event(scripted, tmp_path: Path) -> None:  # noqa: F811
    trainer, _, address = scripted
    (tmp_path / "a.png").write_bytes(b"not really a png")
    argv = ["--trainer", address, "train", "--base-model", "tiny-sd", "--dataset", str(tmp_path)]
    argv += ["--instance-prompt", "a photo of sks toy", "--steps", "5", "--lr", "0.001", "--workers", "2"]
    argv += ["--prior-preservation", "--class-prompt", "a photo of toy", "--lr-schedule", "cosine", "--wait"]
    code, out, err = run_cli(*argv)
    assert code == 0, err
    spec = trainer.requests["CreateTrainingJob"][0].spec
    assert spec.dataset == "datasets/abc"  # the folder was uploaded first
    assert (spec.base_model, spec.max_train_steps, spec.num_workers) == ("models/tiny-sd", 5, 2)
    assert spec.with_prior_preservation and spec.lr_schedule == trainer_pb2.LR_SCHEDULE_COSINE
    assert not spec.train_text_encoder  # a flag not given is left to the server
    events = out.splitlines()
    assert len(events) == 5
    assert events[0].startswith("#1") and "step 1/5" in events[0] and "loss 1.0000" in events[0]
    assert "ETA" in events[0] and "ETA" not in events[-1]
    assert "done: trainingJobs/j1  SUCCEEDED  model models/m1" in err

    trainer.final_state = trainer_pb2.TRAINING_JOB_STATE_FAILED
    code, _, err = run_cli("--trainer", address, "jobs", "watch", "j1", "--after", "5")
    assert code == 1
    assert err.strip().splitlines()[-1] == "error: trainingJobs/j1 ended FAILED: the dataset vanished"


def test_generate_writes_the_images(scripted, tmp_path: Path) -> None:  # noqa: F811
    _, _, address = scripted
    argv = ["--inference", address, "generate", "--model", "models/m0", "--prompt", "p", "--n", "2"]
    code, out, err = run_cli(*argv, "--seed", "40", "--out", str(tmp_path / "out"))
    assert code == 0, err
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == ["m0-seed40.bin", "m0-seed41.bin"]  # the fake's bytes are no known format
    assert (tmp_path / "out" / "m0-seed41.bin").read_bytes() == b"img1"
    assert out.splitlines()[0].endswith("m0-seed40.bin  seed 40")


def test_models_list_and_get(scripted) -> None:  # noqa: F811
    _, _, address = scripted
    code, out, _ = run_cli("--inference", address, "models", "list")
    assert code == 0 and [line.split()[0] for line in out.splitlines()] == ["NAME", "models/m0", "models/m1"]
    code, out, _ = run_cli("--inference", address, "--json", "models", "get", "m0")
    assert code == 0 and json.loads(out)["name"] == "models/m0"
    code, out, _ = run_cli("--inference", address, "--json", "models", "list")
    assert code == 0 and [m["name"] for m in json.loads(out)["models"]] == ["models/m0", "models/m1"]
    code, out, _ = run_cli("--trainer", address, "--json", "jobs", "list", "--limit", "1")
    assert code == 0 and [j["name"] for j in json.loads(out)["trainingJobs"]] == ["trainingJobs/p0-0"]


def test_the_installed_command_prints_no_traceback_when_the_server_is_down() -> None:
    env = {**os.environ, "DREAMBOOTH_TRAINER_ADDRESS": "127.0.0.1:1"}
    script = Path(sys.executable).with_name("dreambooth")
    done = subprocess.run(
        [str(script), "jobs", "list"], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert done.stderr.startswith("error: UNAVAILABLE:") and done.stderr.count("\n") == 1
