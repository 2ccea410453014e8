"""kill -9 of the trainer process mid-training: a restarted trainer resumes the job from its
newest checkpoint (the step count continues) and the job succeeds.

The trainer runs as `dreambooth-server trainer` in a session of its own, configured through the
environment: free ports, the test's S3 bucket, the test's prior-generation server, an offline
local Ray (its HOME holds ray_bootstrap_config.yaml). Its Ray processes are its children; after
the kill they are found by that session id and ended too, and only those.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from dreambooth.v1 import trainer_pb2, trainer_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.settings import StoreSettings
from services.trainer.driver.cluster import OFFLINE_ENV
from tests.fixtures.s3 import free_port
from tests.fixtures.trainer_server import make_png, tiny_spec, upload_requests

S = trainer_pb2
STARTUP_DEADLINE_S = 180.0
FINAL = (S.TRAINING_JOB_STATE_SUCCEEDED, S.TRAINING_JOB_STATE_FAILED, S.TRAINING_JOB_STATE_CANCELLED)


# Processes of one session (the trainer is its leader, Ray's processes its members)


def session_members(session_id: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
        if int(fields[3]) == session_id:  # state ppid pgrp session ...
            members.append(int(entry.name))
    return members


def kill_session(session_id: int, deadline_s: float = 30.0) -> None:
    """SIGKILL every process of the session, then wait until none is left."""
    deadline = time.monotonic() + deadline_s
    while members := session_members(session_id):
        for pid in members:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            raise AssertionError(f"processes of session {session_id} survive: {members}")
        time.sleep(0.1)


class TrainerProcess:
    def __init__(self, env: dict[str, str], log_file: Path) -> None:
        self.port = int(env["DREAMBOOTH_TRAINER_PORT"])
        self.log_file = log_file
        with open(log_file, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "services.cli", "trainer"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own session: its Ray processes can be found and ended
            )
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.stub = trainer_pb2_grpc.TrainerServiceStub(self.channel)

    def wait_serving(self) -> None:
        health = health_pb2_grpc.HealthStub(self.channel)
        deadline = time.monotonic() + STARTUP_DEADLINE_S
        while True:
            if self.process.poll() is not None:
                raise AssertionError(f"trainer exited with {self.process.returncode}: {self.log_tail()}")
            with contextlib.suppress(grpc.RpcError):
                request = health_pb2.HealthCheckRequest(service="dreambooth.v1.TrainerService")
                if health.Check(request, timeout=2).status == health_pb2.HealthCheckResponse.SERVING:
                    return
            if time.monotonic() > deadline:
                raise AssertionError(f"trainer not serving after {STARTUP_DEADLINE_S}s: {self.log_tail()}")
            time.sleep(0.2)

    def get(self, name: str) -> trainer_pb2.TrainingJob:
        return self.stub.GetTrainingJob(S.GetTrainingJobRequest(name=name), timeout=30).training_job

    def wait_for(self, name: str, condition, what: str, timeout: float = 300.0) -> trainer_pb2.TrainingJob:
        deadline = time.monotonic() + timeout
        while True:
            job = self.get(name)
            if condition(job):
                return job
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise AssertionError(f"{what}: job is {job}; trainer log: {self.log_tail()}")
            time.sleep(0.1)

    def log_tail(self) -> str:
        return self.log_file.read_text(errors="replace")[-4000:]

    def kill_hard(self, orphans_deadline_s: float = 30.0) -> list[int]:
        """kill -9 of the trainer alone; returns what of its session outlived it past the
        deadline (its local Ray must die with it), then cleans that up."""
        self.channel.close()
        with contextlib.suppress(ProcessLookupError):
            self.process.kill()  # kill -9: no shutdown code runs
        self.process.wait(30)
        deadline = time.monotonic() + orphans_deadline_s
        while (left := session_members(self.process.pid)) and time.monotonic() < deadline:
            time.sleep(0.2)
        kill_session(self.process.pid)
        return left

    def stop(self) -> None:
        """SIGTERM (graceful), then make sure nothing of its session is left."""
        self.channel.close()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(30)
        kill_session(self.process.pid)


@pytest.fixture
def trainer_env(s3_store_settings: StoreSettings, priorgen_server, tmp_path: Path) -> dict[str, str]:
    home = tmp_path / "home"
    home.mkdir()
    (home / "ray_bootstrap_config.yaml").write_text("provider:\n  type: local\n")
    env = {key: value for key, value in os.environ.items() if not key.startswith(("RAY_", "DREAMBOOTH_"))}
    env.update(OFFLINE_ENV)
    env.update(
        {
            "HOME": str(home),
            "DREAMBOOTH_S3_ENDPOINT": s3_store_settings.s3_endpoint,
            "DREAMBOOTH_S3_ACCESS_KEY": s3_store_settings.s3_access_key,
            "DREAMBOOTH_S3_SECRET_KEY": s3_store_settings.s3_secret_key,
            "DREAMBOOTH_S3_BUCKET": s3_store_settings.s3_bucket,
            "DREAMBOOTH_CACHE_DIR": str(tmp_path / "trainer-cache"),
            "DREAMBOOTH_TRAINER_PRIORGEN_ADDRESS": priorgen_server.address,
            "DREAMBOOTH_TRAINER_RAY_STORAGE_PATH": str(tmp_path / "ray-results"),
            "DREAMBOOTH_TRAINER_PROGRESS_PERSIST_SECONDS": "0.2",
            "DREAMBOOTH_TRAINER_GRACE_SECONDS": "1",
        }
    )
    return env


@pytest.fixture
def start_process(trainer_env: dict[str, str], tmp_path: Path) -> Iterator:
    started: list[TrainerProcess] = []

    def start() -> TrainerProcess:
        env = {
            **trainer_env,
            "DREAMBOOTH_TRAINER_PORT": str(free_port()),
            "DREAMBOOTH_TRAINER_METRICS_PORT": str(free_port()),
        }
        process = TrainerProcess(env, tmp_path / f"trainer-{len(started)}.log")
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()


def test_killed_trainer_resumes_the_job_from_its_checkpoint(start_process) -> None:
    """kill -9 mid-job: nothing of the trainer's local Ray outlives it (its workers used to go on
    training and writing checkpoints, ~180 MB of orphans), and a new trainer resumes the job from
    its newest checkpoint."""
    first = start_process()
    first.wait_serving()
    dataset = first.stub.UploadImages(upload_requests([make_png(s) for s in range(3)]), timeout=60).dataset
    spec = tiny_spec(
        dataset.name,
        with_prior_preservation=True,
        class_prompt="a photo of dog",
        num_class_images=2,
        prior_steps=4,
        max_train_steps=40,
        checkpointing_steps=10,
    )
    job = first.stub.CreateTrainingJob(
        S.CreateTrainingJobRequest(spec=spec, request_id="restart-1"), timeout=60
    )
    name = job.training_job.name

    # Kill -9 once a checkpoint is in the store and training has gone past it.
    before = first.wait_for(
        name,
        lambda j: j.checkpoint_step >= 10 and j.progress.step > j.checkpoint_step,
        "a checkpoint",
        timeout=300,
    )
    assert before.state == S.TRAINING_JOB_STATE_TRAINING and before.progress.step < 40
    assert len(session_members(first.process.pid)) > 1  # its local Ray lives in its session
    assert first.kill_hard() == [], "processes outlived the killed trainer"

    second = start_process()
    second.wait_serving()
    recovered = second.get(name)
    assert recovered.state != S.TRAINING_JOB_STATE_FAILED, recovered.error_message
    # Idempotency survives the restart too.
    again = second.stub.CreateTrainingJob(
        S.CreateTrainingJobRequest(spec=spec, request_id="restart-1"), timeout=60
    )
    assert again.training_job.name == name

    events = list(second.stub.WatchTrainingJob(S.WatchTrainingJobRequest(name=name), timeout=600))
    done = events[-1].state_change
    assert done.state == S.TRAINING_JOB_STATE_SUCCEEDED, done.error_message
    assert done.progress.step == 40 and done.model == f"models/{done.spec.model_id}"

    # After the recovery (TRAINING -> QUEUED), training continued from the checkpoint, not step 1.
    kinds = [event.WhichOneof("event") for event in events]
    states = [(i, e.state_change.state) for i, e in enumerate(events) if kinds[i] == "state_change"]
    requeued = next(
        i
        for (i, state), (_, previous) in zip(states[1:], states, strict=False)
        if state == S.TRAINING_JOB_STATE_QUEUED and previous == S.TRAINING_JOB_STATE_TRAINING
    )
    resumed_steps = [e.progress.step for e in events[requeued:] if e.WhichOneof("event") == "progress"]
    assert resumed_steps, "no progress after the restart"
    assert resumed_steps[0] > before.checkpoint_step >= 10, resumed_steps[:5]
    assert resumed_steps[-1] == 40
