"""The SDK and the CLI against the real trainer (S3 store, local Ray, the real prior-generation server)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from dreambooth.v1 import trainer_pb2
from dreambooth_client import (
    DreamBoothClient,
    InvalidArgumentError,
    JobFailedError,
    NotFoundError,
    cli,
)

from tests.fixtures.trainer_server import make_png

CANCELLED = trainer_pb2.TRAINING_JOB_STATE_CANCELLED


@pytest.fixture
def client(trainer_server) -> DreamBoothClient:
    with DreamBoothClient(trainer=trainer_server.address, inference=None, timeout=60) as sdk:
        yield sdk


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    for seed in range(3):
        (folder / f"subject-{seed}.png").write_bytes(make_png(seed))
    return folder


def small_job(dataset: str, **fields) -> dict:
    spec = {
        "base_model": "tiny-sd",
        "dataset": dataset,
        "instance_prompt": "a photo of sks dog",
        "max_train_steps": 4,
        "learning_rate": 1e-4,
        "resolution": 64,
        "num_workers": 1,
    }
    return {**spec, **fields}


def run_cli(address: str, *argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = cli.main(["--trainer", address, *argv], stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def test_upload_is_content_addressed(client: DreamBoothClient, photos: Path) -> None:
    dataset = client.upload_images(photos)
    assert dataset.name.startswith("datasets/")
    assert dataset.image_count == 3 and dataset.size_bytes > 0
    same = client.upload_images([("x.png", make_png(s)) for s in range(3)])
    assert same.name == dataset.name  # same images as bytes, different names: the same dataset


def test_server_errors_become_sdk_exceptions(client: DreamBoothClient, photos: Path) -> None:
    dataset = client.upload_images(photos)
    with pytest.raises(InvalidArgumentError) as bad_prompt:
        client.create_training_job(small_job(dataset.name, instance_prompt="a photo of a dog"))
    assert bad_prompt.value.field == "spec.instance_prompt"
    with pytest.raises(InvalidArgumentError) as bad_resolution:
        client.create_training_job(small_job(dataset.name, resolution=100))
    assert bad_resolution.value.field == "spec.resolution"
    with pytest.raises(NotFoundError, match="no-such-model"):
        client.create_training_job(small_job(dataset.name, base_model="no-such-model"))
    with pytest.raises(NotFoundError):
        client.get_training_job("abcdef123456")  # well-formed (12 characters) but unknown
    with pytest.raises(InvalidArgumentError):
        client.upload_images(b"this is not an image")


def test_create_is_idempotent_and_a_cancelled_job_can_be_watched(
    client: DreamBoothClient, photos: Path
) -> None:
    dataset = client.upload_images(photos)
    job = client.create_training_job(small_job(dataset.name, max_train_steps=2000), request_id="client-it-1")
    again = client.create_training_job(
        small_job(dataset.name, max_train_steps=2000), request_id="client-it-1"
    )
    assert again.name == job.name and again.request_id == "client-it-1"
    assert job.spec.base_model == "models/tiny-sd" and job.spec.max_train_steps == 2000
    assert job.name in [j.name for j in client.list_training_jobs(page_size=1)]

    cancelled = client.cancel_training_job(job)
    events = list(client.watch(job, timeout=120))  # ends once the job has ended
    states = [e.state_change.state for e in events if e.WhichOneof("event") == "state_change"]
    assert states[0] == trainer_pb2.TRAINING_JOB_STATE_QUEUED and states[-1] == CANCELLED
    sequences = [e.sequence for e in events]
    assert sequences == sorted(set(sequences))
    resumed = list(client.watch(job, after_sequence=sequences[-2], timeout=60))
    assert [e.sequence for e in resumed] == sequences[-1:]

    final = client.wait(job, timeout=120)
    assert final.state == CANCELLED and cancelled.name == job.name
    with pytest.raises(JobFailedError, match="CANCELLED"):
        client.wait(job, timeout=120, check=True)
    assert job.name in [j.name for j in client.list_training_jobs(state="cancelled")]


def test_cli_upload_train_jobs(trainer_server, photos: Path, tmp_path: Path) -> None:
    address = trainer_server.address
    code, out, err = run_cli(address, "upload", str(photos))
    assert code == 0, err
    dataset = out.strip()
    assert dataset.startswith("datasets/") and "3 images" in err

    argv = [
        "train",
        "--base-model",
        "tiny-sd",
        "--dataset",
        dataset,
        "--instance-prompt",
        "a photo of sks dog",
    ]
    code, out, err = run_cli(
        address, "--json", *argv, "--steps", "2000", "--resolution", "64", "--lr", "1e-4"
    )
    assert code == 0, err
    job = json.loads(out)
    assert job["spec"]["maxTrainSteps"] == 2000

    code, out, err = run_cli(address, "jobs", "cancel", job["name"])
    assert code == 0, err
    code, out, err = run_cli(address, "jobs", "watch", job["name"])
    assert code == 1  # the job did not succeed
    assert "state     " in out and "CANCELLED" in out.splitlines()[-1]
    assert err.strip().splitlines()[-1] == f"error: {job['name']} ended CANCELLED"

    code, out, _ = run_cli(address, "jobs", "list", "--state", "cancelled")
    assert code == 0 and job["name"] in out
    code, out, _ = run_cli(address, "jobs", "get", job["name"].split("/")[-1])
    assert code == 0 and "state:           CANCELLED" in out

    bad = ["train", "--base-model", "tiny-sd", "--dataset", dataset, "--instance-prompt", "no token here"]
    code, out, err = run_cli(address, *bad)
    assert (code, out) == (1, "")
    assert err.startswith("error: INVALID_ARGUMENT: spec.instance_prompt") and err.count("\n") == 1


@pytest.mark.slow
def test_cli_trains_with_priors_and_generates_from_the_model(
    trainer_server, inference_server, photos: Path, tmp_path: Path
) -> None:
    """The user's whole path through the CLI: folder -> job with priors -> watch -> images."""
    argv = ["--trainer", trainer_server.address, "--inference", inference_server.address]
    train = ["train", "--base-model", "tiny-sd", "--dataset", str(photos)]
    train += ["--instance-prompt", "a photo of sks dog", "--class-prompt", "a photo of dog"]
    train += ["--prior-preservation", "--num-class-images", "2", "--prior-steps", "2", "--steps", "6"]
    train += ["--resolution", "64", "--lr", "1e-4", "--workers", "2", "--validation-prompt", "sks dog"]
    train += ["--previews", str(tmp_path / "previews"), "--wait"]
    out, err = io.StringIO(), io.StringIO()
    assert cli.main([*argv, *train], stdout=out, stderr=err) == 0, err.getvalue()
    lines = out.getvalue().splitlines()
    states = [line.split()[3] for line in lines if line.split()[1] == "state"]
    assert states == ["QUEUED", "GENERATING_PRIORS", "TRAINING", "PUBLISHING", "SUCCEEDED"]
    assert any(" priors " in line for line in lines) and any("step 6/6" in line for line in lines)
    assert list((tmp_path / "previews").iterdir())  # the validation preview was saved
    model = lines[-1].split("model ")[-1]
    assert model.startswith("models/")

    out, err = io.StringIO(), io.StringIO()
    generate = ["generate", "--model", model, "--prompt", "a photo of sks dog on the moon", "--steps", "3"]
    code = cli.main(
        [*argv, *generate, "--seed", "1", "--out", str(tmp_path / "images")], stdout=out, stderr=err
    )
    assert code == 0, err.getvalue()
    (image,) = (tmp_path / "images").iterdir()
    assert image.name == f"{model.split('/')[1]}-seed1.png" and image.stat().st_size > 0
