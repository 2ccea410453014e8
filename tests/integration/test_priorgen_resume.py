"""`dreambooth-server priorgen` as a real process: kill -9 mid-set, restart, resume; SIGTERM."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from dreambooth.v1 import priorgen_pb2, priorgen_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.model_store import ModelStore
from services.common.object_store import ObjectStore
from services.common.settings import StoreSettings
from services.priorgen.cache_key import images_prefix, manifest_key
from tests.fixtures.priorgen_server import priors_request
from tests.fixtures.s3 import free_port

DEADLINE_S = 120.0
SET = {"num_images": 10, "steps": 10, "seed": 11}


class PriorGenProcess:
    """One `dreambooth-server priorgen` process on free loopback ports, stopped by its PID."""

    def __init__(self, store: StoreSettings, workdir: Path, batch_size: int = 1) -> None:
        self.port = free_port()
        env = {
            **os.environ,
            "DREAMBOOTH_PRIORGEN_PORT": str(self.port),
            "DREAMBOOTH_PRIORGEN_METRICS_PORT": str(free_port()),
            "DREAMBOOTH_PRIORGEN_BATCH_SIZE": str(batch_size),
            "DREAMBOOTH_PRIORGEN_GRACE_SECONDS": "1",
            "DREAMBOOTH_PRIORGEN_DEFAULT_RESOLUTION": "64",
            "DREAMBOOTH_S3_ENDPOINT": store.s3_endpoint,
            "DREAMBOOTH_S3_ACCESS_KEY": store.s3_access_key,
            "DREAMBOOTH_S3_SECRET_KEY": store.s3_secret_key,
            "DREAMBOOTH_S3_BUCKET": store.s3_bucket,
            "DREAMBOOTH_S3_REGION": store.s3_region,
            "DREAMBOOTH_CACHE_DIR": str(workdir / "cache"),
            "DREAMBOOTH_STORE_DIR": str(workdir / "unused-local-store"),
        }
        command = [str(Path(sys.executable).parent / "dreambooth-server"), "priorgen"]
        self.log_path = workdir / f"priorgen-{self.port}.log"
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.stub = priorgen_pb2_grpc.PriorGenServiceStub(self.channel)
        self._wait_until_serving()

    def _wait_until_serving(self) -> None:
        health = health_pb2_grpc.HealthStub(self.channel)
        deadline = time.monotonic() + DEADLINE_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"priorgen exited early:\n{self.log_path.read_text()}")
            with contextlib.suppress(grpc.RpcError):
                status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            time.sleep(0.05)
        raise AssertionError(f"priorgen not serving after {DEADLINE_S}s:\n{self.log_path.read_text()}")

    def generate(self, **fields: int) -> list[priorgen_pb2.GeneratePriorsResponse]:
        request = priors_request(**{**SET, **fields})
        return list(self.stub.GeneratePriors(request, timeout=DEADLINE_S))

    def stop(self) -> None:
        self.channel.close()
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(30)


@pytest.fixture
def start_process(
    s3_store_settings: StoreSettings, model_store: ModelStore, tmp_path: Path
) -> Iterator[type[PriorGenProcess]]:
    started: list[PriorGenProcess] = []

    def start(batch_size: int = 1) -> PriorGenProcess:
        process = PriorGenProcess(s3_store_settings, tmp_path, batch_size)
        started.append(process)
        return process

    yield start  # type: ignore[misc]
    for process in started:
        process.stop()


def wait_for(condition, what: str, timeout: float = DEADLINE_S) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def snapshot(store: ObjectStore, prefix: str) -> dict[str, bytes]:
    return {info.key: store.get_bytes(info.key) for info in store.list(prefix)}


@pytest.mark.slow  # two process starts and three set generations: ~30 s on 2 busy cores
def test_a_set_killed_mid_way_resumes_with_only_the_missing_images(
    start_process: type[PriorGenProcess], s3_store: ObjectStore
) -> None:
    first = start_process()
    interrupted: list[BaseException] = []
    caller = threading.Thread(
        target=lambda: interrupted.extend([_call_expecting_failure(first)]), name="interrupted-call"
    )
    caller.start()

    # Find the set's key from what appears in the store, then kill -9 after a few images.
    def images_written() -> list[str]:
        return [info.key for info in s3_store.list("priors/") if "/images/" in info.key]

    wait_for(lambda: len(images_written()) >= 3, "the first images of the set")
    os.kill(first.process.pid, signal.SIGKILL)
    first.process.wait(30)
    caller.join(DEADLINE_S)
    assert interrupted and isinstance(interrupted[0], grpc.RpcError)

    key = images_written()[0].split("/")[1]
    present = images_written()
    assert not s3_store.exists(manifest_key(key)), "the set finished before it could be killed"
    assert 3 <= len(present) < SET["num_images"]

    second = start_process()
    responses = second.generate()
    resumed = responses[-1].prior_set
    assert (resumed.key, resumed.cached) == (key, False)
    assert resumed.generated == SET["num_images"] - len(present)  # only the missing ones
    assert responses[0].progress.images_done == len(present)
    resumed_set = snapshot(s3_store, resumed.prefix)
    assert len(resumed_set) == SET["num_images"] + 1

    # The same set made in one go, by the same kind of process, is the same bytes.
    s3_store.delete_prefix(resumed.prefix)
    uninterrupted = second.generate()[-1].prior_set
    assert (uninterrupted.key, uninterrupted.generated) == (key, SET["num_images"])
    assert snapshot(s3_store, uninterrupted.prefix) == resumed_set
    assert images_prefix(key) in next(iter(resumed_set))


def _call_expecting_failure(process: PriorGenProcess, **fields: int) -> BaseException:
    try:
        process.generate(**fields)
    except grpc.RpcError as err:
        return err
    return AssertionError("the call finished although the server was killed")


def test_sigterm_stops_the_process_gracefully_even_mid_set(
    start_process: type[PriorGenProcess], s3_store: ObjectStore
) -> None:
    process = start_process()
    outcome: list[BaseException] = []
    caller = threading.Thread(target=lambda: outcome.append(_call_expecting_failure(process, num_images=500)))
    caller.start()
    wait_for(lambda: any("/images/" in info.key for info in s3_store.list("priors/")), "the first image")

    os.kill(process.process.pid, signal.SIGTERM)
    assert process.process.wait(DEADLINE_S) == 0  # grace (1 s) for the stream, then the set stops
    caller.join(DEADLINE_S)
    assert outcome and isinstance(outcome[0], grpc.RpcError)
    assert outcome[0].code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
    images = [info for info in s3_store.list("priors/") if "/images/" in info.key]
    assert 0 < len(images) < 500 and all(info.size > 0 for info in images)
    assert not any(info.key.endswith("manifest.json") for info in s3_store.list("priors/"))
