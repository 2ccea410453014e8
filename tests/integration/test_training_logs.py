"""Training logs over gRPC: a trainer with API keys on the S3 store, a job trained by the real worker
loop in this process (tests.fixtures.tenants.InProcessTraining: no Ray), and its TensorBoard event
files fetched through DownloadTrainingJobLogs by the SDK and the CLI, for their owner only."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable
from pathlib import Path

import pytest
from dreambooth.v1 import trainer_pb2
from dreambooth_client import DreamBoothClient
from dreambooth_client.cli import main as cli_main
from dreambooth_client.errors import FailedPreconditionError, NotFoundError
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from services.common.namespaced_store import scoped_store
from services.common.object_store import ObjectStore
from services.common.settings import AuthSettings
from services.trainer.training_logs_layout import tensorboard_prefix
from services.trainer.worker import tracking
from tests.fixtures.tenants import InProcessTraining, write_keys_file
from tests.fixtures.trainer_server import RunningTrainer, make_png, tiny_spec

MISSING_JOB = "trainingJobs/0123456789ab"


def _files(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in folder.iterdir()}


def _stored_logs(store: ObjectStore, tenant: str, job_id: str) -> dict[str, bytes]:
    tenant_store, prefix = scoped_store(store, tenant), tensorboard_prefix(job_id)
    return {
        info.key.removeprefix(prefix): tenant_store.get_bytes(info.key) for info in tenant_store.list(prefix)
    }


def _cli(trainer: RunningTrainer, key: str, *args: str) -> tuple[int, str]:
    """Exit code and stderr of one `dreambooth` command (argparse writes usage errors to sys.stderr)."""
    err = io.StringIO()
    argv = ["--trainer", trainer.address, "--api-key", key, *args]
    with contextlib.redirect_stderr(err):
        try:
            code = cli_main(argv, stdout=io.StringIO(), stderr=err)
        except SystemExit as exit_:
            code = int(exit_.code or 0)
    return code, err.getvalue()


def test_a_jobs_training_logs_download_by_sdk_and_cli_for_its_tenant_only(
    start_trainer: Callable[..., RunningTrainer],
    s3_store: ObjectStore,
    tmp_path: Path,
) -> None:
    keys = write_keys_file(tmp_path / "keys.toml", {"alpha": "alpha", "beta": "beta"})
    trainer = start_trainer(
        train=InProcessTraining(), auth=AuthSettings(api_keys_file=str(tmp_path / "keys.toml"))
    )
    alpha = DreamBoothClient(trainer.address, None, api_key=keys["alpha"])
    beta = DreamBoothClient(trainer.address, None, api_key=keys["beta"])

    dataset = alpha.upload_images([make_png(0), make_png(1)])
    spec = tiny_spec(
        dataset.name,
        num_workers=1,
        max_train_steps=4,
        checkpointing_steps=2,
        validation_prompts=["a photo of sks dog"],
        validation_steps=2,
    )
    job = alpha.wait(alpha.create_training_job(spec), timeout=300)
    assert job.state == trainer_pb2.TRAINING_JOB_STATE_SUCCEEDED, job.error_message
    job_id = job.name.removeprefix("trainingJobs/")
    stored = _stored_logs(s3_store, "alpha", job_id)
    assert len(stored) == 1, stored.keys()

    # The SDK: the stored files, byte for byte, as one TensorBoard run.
    logs = alpha.download_training_logs(job, tmp_path / "sdk" / job_id)
    assert logs.name == job.name and [f.path for f in logs.files] == list(stored)
    assert _files(tmp_path / "sdk" / job_id) == stored
    run = EventAccumulator(str(tmp_path / "sdk" / job_id), size_guidance={"scalars": 0, "images": 0})
    run.Reload()
    assert [event.step for event in run.Scalars(tracking.LOSS)] == [1, 2, 3, 4]
    assert [image.step for image in run.Images(tracking.PREVIEW + "0")] == [2, 4]

    # The CLI: DIR/JOB_ID, so `tensorboard --logdir DIR` lists the job as a run; a second download
    # into the same place is refused unless --overwrite.
    code, err = _cli(trainer, keys["alpha"], "jobs", "logs", job_id, "--tensorboard", str(tmp_path / "tb"))
    assert code == 0, err
    assert _files(tmp_path / "tb" / job_id) == stored
    assert f"tensorboard --logdir {tmp_path / 'tb'}" in err
    code, err = _cli(trainer, keys["alpha"], "jobs", "logs", job.name, "--tensorboard", str(tmp_path / "tb"))
    assert code == 2 and "is not an empty folder" in err and "--overwrite" in err
    (tmp_path / "tb" / job_id / "stale-file").write_text("from an earlier download")
    overwrite = ("jobs", "logs", job.name, "--tensorboard", str(tmp_path / "tb"), "--overwrite")
    code, err = _cli(trainer, keys["alpha"], *overwrite)
    assert code == 0, err
    assert _files(tmp_path / "tb" / job_id) == stored  # replaced whole: the stale file is gone

    # Another tenant gets NOT_FOUND, word for word what a job that does not exist gets.
    with pytest.raises(NotFoundError) as theirs:
        beta.download_training_logs(job, tmp_path / "beta")
    with pytest.raises(NotFoundError) as missing:
        beta.download_training_logs(MISSING_JOB, tmp_path / "beta")
    assert MISSING_JOB in missing.value.message
    assert theirs.value.message == missing.value.message.replace(MISSING_JOB, job.name)
    assert not (tmp_path / "beta").exists()
    code, err = _cli(trainer, keys["beta"], "jobs", "logs", job_id, "--tensorboard", str(tmp_path / "beta"))
    assert code == 1 and "NOT_FOUND" in err and job.name in err

    # A job that ended before training wrote anything: FAILED_PRECONDITION saying why.
    with_priors = tiny_spec(dataset.name, num_workers=1, with_prior_preservation=True, class_prompt="a dog")
    failed = alpha.wait(alpha.create_training_job(with_priors), timeout=120)  # priorgen is down
    assert failed.state == trainer_pb2.TRAINING_JOB_STATE_FAILED
    with pytest.raises(FailedPreconditionError, match="no training logs yet"):
        alpha.download_training_logs(failed, tmp_path / "none")

    # Deleting the job deletes its logs.
    alpha.delete_training_job(job)
    assert _stored_logs(s3_store, "alpha", job_id) == {}
    alpha.close()
    beta.close()
