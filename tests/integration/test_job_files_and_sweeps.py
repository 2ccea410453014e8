"""Job files and sweeps through the CLI against the real trainer (S3 store, local Ray): a job's
spec written back as a job file reproduces it, a 2-point sweep trains both points, and the
ToyBench columns score a model exported from the inference service."""

from __future__ import annotations

import io
import time
from pathlib import Path

import pytest
from dreambooth_client import DreamBoothClient, cli
from dreambooth_client.messages import resource_id

from services.common.model_store import ModelStore
from services.common.toy_base_files import COMMITTED_BASE
from tests.fixtures.trainer_server import make_png
from toyworld import subject

JOB_FILE = """\
base_model = "tiny-sd"
dataset = "photos"                # a folder next to this file: uploaded first
instance_prompt = "a photo of sks dog"
max_train_steps = 50
learning_rate = 3e-5
resolution = 64
num_workers = 1
checkpointing_steps = 0
validation_prompts = ["a photo of sks dog", "sks dog, on the \\"moon\\""]
"""


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = cli.main(list(argv), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def job_folder(tmp_path: Path, text: str = JOB_FILE) -> Path:
    folder = tmp_path / "job"
    (folder / "photos").mkdir(parents=True)
    for seed in range(3):
        (folder / "photos" / f"subject-{seed}.png").write_bytes(make_png(seed))
    (folder / "job.toml").write_text(text)
    return folder


def test_a_job_written_as_a_job_file_runs_again_with_the_same_spec(
    trainer_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_folder(tmp_path)
    monkeypatch.chdir(tmp_path)  # not the file's folder: `dataset = "photos"` is the file's
    trainer = ["--trainer", trainer_server.address]
    code, out, err = run_cli(*trainer, "train", "--config", "job/job.toml", "--steps", "2000")
    assert code == 0, err
    first = out.strip()
    assert "uploading 3 images" in err

    code, _, err = run_cli(*trainer, "jobs", "get", first, "--as-config", "again.toml")
    assert code == 0, err
    code, printed, _ = run_cli(*trainer, "jobs", "get", first, "--as-config", "-")
    assert code == 0 and printed == (tmp_path / "again.toml").read_text()
    assert "max_train_steps = 2000\n" in printed  # the flag beat the file
    assert "learning_rate = 3e-05\n" in printed and "mixed_precision = " in printed  # resolved values

    code, out, err = run_cli(*trainer, "train", "--config", "again.toml")
    assert code == 0, err
    second = out.strip()
    with DreamBoothClient(trainer=trainer_server.address, inference=None) as client:
        a, b = client.get_training_job(first), client.get_training_job(second)
        for job in (a, b):
            client.cancel_training_job(job)
    assert a.name != b.name
    assert list(b.spec.validation_prompts) == ["a photo of sks dog", 'sks dog, on the "moon"']
    assert b.spec.max_train_steps == 2000 and b.spec.dataset == a.spec.dataset
    assert (a.spec.model_id, b.spec.model_id) == (f"job-{resource_id(a.name)}", f"job-{resource_id(b.name)}")
    b.spec.model_id = a.spec.model_id  # each run publishes its own model; everything else is the same
    assert b.spec == a.spec


def test_a_sweep_trains_every_point_and_prints_a_table(start_trainer, ray_local, tmp_path: Path) -> None:
    trainer_server = start_trainer(max_concurrent_jobs=2)  # the points train side by side, as on a cluster
    folder = job_folder(tmp_path, JOB_FILE.replace("max_train_steps = 50", "max_train_steps = 2"))
    started = time.perf_counter()
    code, out, err = run_cli(
        "--trainer",
        trainer_server.address,
        "train",
        "--config",
        str(folder / "job.toml"),
        "--sweep",
        "learning_rate=1e-4,2e-4",
        "--request-id",
        "sweep-it",
    )
    took = time.perf_counter() - started
    assert code == 0, err
    header, *rows = out.splitlines()
    assert header.split() == ["learning_rate", "JOB", "STATE", "LOSS", "MODEL"]
    assert [row.split()[0] for row in rows] == ["0.0001", "0.0002"]
    assert [row.split()[2] for row in rows] == ["SUCCEEDED", "SUCCEEDED"]
    assert all(float(row.split()[3]) > 0 for row in rows)
    with DreamBoothClient(trainer=trainer_server.address, inference=None) as client:
        jobs = [client.get_training_job(row.split()[1]) for row in rows]
    assert [round(job.spec.learning_rate, 9) for job in jobs] == [1e-4, 2e-4]
    assert [job.request_id for job in jobs] == ["sweep-it-0", "sweep-it-1"]
    assert [row.split()[4] for row in rows] == [job.model for job in jobs]
    assert err.count("uploading 3 images") == 1  # the folder went up once for both points
    print(f"2-point sweep: {took:.1f} s")


@pytest.mark.slow
def test_toybench_columns_score_the_exported_model(
    trainer_server, inference_server, model_store: ModelStore, tmp_path: Path
) -> None:
    model_store.import_folder(COMMITTED_BASE, "toy-world")
    photos = tmp_path / "striped-ball"
    photos.mkdir()
    for index, photo in enumerate(subject("striped-ball").photos(count=4)):
        photo.save(photos / f"{index}.png")
    (tmp_path / "job.toml").write_text(
        'base_model = "toy-world"\ndataset = "striped-ball"\ninstance_prompt = "a photo of sks ball"\n'
        "max_train_steps = 2\nlearning_rate = 1e-4\nnum_workers = 1\ncheckpointing_steps = 0\n"
    )
    started = time.perf_counter()
    code, out, err = run_cli(
        "--trainer",
        trainer_server.address,
        "--inference",
        inference_server.address,
        "train",
        "--config",
        str(tmp_path / "job.toml"),
        "--sweep",
        "use_lora=false,true",
        "--toybench-subject",
        "striped-ball",
        "--toybench-images",
        "1",
    )
    took = time.perf_counter() - started
    assert code == 0, err
    header, *rows = out.splitlines()
    assert header.split()[-3:] == ["SUBJECT_FIDELITY", "PROMPT_FIDELITY", "CLASS_ACCURACY"]
    assert len(rows) == 2  # a full fine-tune, and a LoRA scored on its exported base
    for row in rows:
        fidelity, prompt, class_accuracy = (float(cell) for cell in row.split()[-3:])
        assert -1 <= fidelity <= 1 and 0 <= prompt <= 1 and 0 <= class_accuracy <= 1
    assert err.count("scored: subject_fidelity") == 2
    print(f"ToyBench-scored 2-point sweep: {took:.1f} s")
