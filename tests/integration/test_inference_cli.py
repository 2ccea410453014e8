"""`dreambooth-server inference` as a real process: it reports SERVING, serves, and stops on SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
from dreambooth.v1 import inference_pb2, inference_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.model_store import ModelStore
from services.common.settings import StoreSettings

DEADLINE_S = 120.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_serving(channel: grpc.Channel, process: subprocess.Popen[bytes]) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    request = health_pb2.HealthCheckRequest(service="dreambooth.v1.InferenceService")
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        assert process.poll() is None, f"server exited with {process.returncode}"
        try:
            if health.Check(request, timeout=2).status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError:
            pass  # not listening yet
        time.sleep(0.05)
    raise AssertionError("the server never reported SERVING")


def test_cli_serves_and_stops_on_sigterm(
    s3_store_settings: StoreSettings, model_store: ModelStore, tmp_path: Path
) -> None:
    port, metrics_port = free_port(), free_port()
    env = {
        **os.environ,
        "DREAMBOOTH_INFERENCE_PORT": str(port),
        "DREAMBOOTH_INFERENCE_METRICS_PORT": str(metrics_port),
        "DREAMBOOTH_INFERENCE_DEFAULT_MODEL": "tiny-sd",
        "DREAMBOOTH_S3_ENDPOINT": s3_store_settings.s3_endpoint,
        "DREAMBOOTH_S3_ACCESS_KEY": s3_store_settings.s3_access_key,
        "DREAMBOOTH_S3_SECRET_KEY": s3_store_settings.s3_secret_key,
        "DREAMBOOTH_S3_BUCKET": s3_store_settings.s3_bucket,
        "DREAMBOOTH_CACHE_DIR": str(tmp_path / "cli-cache"),
    }
    command = [str(Path(sys.executable).parent / "dreambooth-server"), "inference"]
    log_path = tmp_path / "server.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(command, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            wait_serving(channel, process)
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            request = inference_pb2.GenerateRequest(model="models/tiny-sd", prompt="a photo", steps=2, seed=1)
            kinds = [r.WhichOneof("event") for r in stub.Generate(request, timeout=DEADLINE_S)]
            assert kinds == ["progress", "progress", "image"]
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=DEADLINE_S) == 0, log_path.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(30)
    assert '"msg": "serving"' in log_path.read_text()
