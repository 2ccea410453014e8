"""`dreambooth-server trainer`: the trainer gRPC service.

Start-up: settings from the environment, JSON logs, Ray (local unless DREAMBOOTH_TRAINER_RAY_ADDRESS
or RAY_ADDRESS names a cluster), the job records read back and unfinished jobs resumed, then
health SERVING. SIGTERM: NOT_SERVING, in-flight RPCs get their grace, running jobs are stopped
without being ended (the next start resumes them from their newest checkpoint).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import logging
import os
from pathlib import Path
from typing import Any

from dreambooth.v1 import trainer_pb2_grpc
from dreambooth_client.channels import ChannelConfig

from services.common.auth import Authenticator, open_authenticator
from services.common.logging_setup import configure_logging
from services.common.model_store import ModelStore
from services.common.server import GrpcServerApp
from services.common.settings import ConfigError
from services.common.store_factory import open_store
from services.trainer.api.priors_client import PriorsClient
from services.trainer.api.servicer import TrainerServicer
from services.trainer.driver.cluster import connect_ray, disconnect_ray
from services.trainer.jobs.core import TrainerCore
from services.trainer.jobs.metrics import TrainerMetrics
from services.trainer.jobs.runner import RunnerSettings, TrainFn
from services.trainer.settings import TrainerSettings, load_settings

log = logging.getLogger(__name__)

SERVICE_NAME = "dreambooth.v1.TrainerService"


def ray_gpu_count() -> int | None:
    """GPUs in the connected Ray cluster, or None when that cannot be known (no Ray yet)."""
    import ray

    if not ray.is_initialized():
        return None
    return int(ray.cluster_resources().get("GPU", 0))


def run_training(*args: Any, **kwargs: Any) -> Any:
    """The Ray Train core, imported on first use: Ray is heavy and not needed to serve requests."""
    from services.trainer.driver.run import run_training as ray_run_training

    return ray_run_training(*args, **kwargs)


class TrainerServer:
    """The gRPC app and the core wired together; used by main() and by the test fixtures."""

    def __init__(
        self, settings: TrainerSettings, *, train: TrainFn | None = None, auth: Authenticator | None = None
    ) -> None:
        self.settings = settings
        auth = auth or open_authenticator("trainer", settings.auth, settings.server)
        self.app = GrpcServerApp("trainer", settings.server, auth=auth)
        store = open_store(settings.store)
        self.priors = PriorsClient(
            settings.priorgen_address,
            attempts=settings.priorgen_attempts,
            retry_seconds=settings.priorgen_retry_seconds,
            channel=ChannelConfig.create(
                tls=settings.priorgen_tls,
                ca_cert=settings.priorgen_ca_cert_file or None,
                client_cert=settings.priorgen_client_cert_file or None,
                client_key=settings.priorgen_client_key_file or None,
            ),
            api_key=settings.priorgen_api_key,
        )
        self.core = TrainerCore(
            store=store,
            models=ModelStore(store, Path(settings.store.cache_dir)),
            priors=self.priors,
            train=train or run_training,
            runner_settings=RunnerSettings(
                max_concurrent_jobs=settings.max_concurrent_jobs,
                store_settings=settings.store,
                storage_path=settings.ray_storage_path or None,
                max_failures=settings.max_failures,
                progress_persist_seconds=settings.progress_persist_seconds,
                tracking=settings.tracking,
            ),
            spec_limits=settings.spec_limits,
            upload_limits=settings.upload_limits,
            metrics=TrainerMetrics(self.app.registry, self.app.metrics_namespace),
            gpu_count=ray_gpu_count,
            persist_seconds=settings.progress_persist_seconds,
            tenants=auth.tenant_names,
        )
        self.app.add_service(
            trainer_pb2_grpc.add_TrainerServiceServicer_to_server, TrainerServicer(self.core), SERVICE_NAME
        )

    @property
    def address(self) -> str:
        return self.app.address

    async def start(self) -> None:
        """Serve (NOT_SERVING), recover the jobs, then report SERVING."""
        await self.app.start()
        await asyncio.to_thread(self.core.start)
        await self.app.set_serving(True)

    async def stop(self, grace: float | None = None) -> None:
        await self.app.stop(grace)
        await asyncio.to_thread(self.core.shutdown)
        self.priors.close()

    async def run_until_signal(self) -> None:
        await self.start()
        try:
            await self.app.run_until_signal()
        finally:
            await self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dreambooth-server trainer",
        description="Run the trainer gRPC service. Configured by DREAMBOOTH_TRAINER_* and DREAMBOOTH_S3_* "
        "environment variables (see services/trainer/settings.py).",
    )
    parser.parse_args(argv or [])
    settings = load_settings()
    configure_logging(settings.log_level)
    if settings.tracking.mlflow_tracking_uri and importlib.util.find_spec("mlflow") is None:
        raise ConfigError(
            "DREAMBOOTH_TRAINER_MLFLOW_TRACKING_URI is set but mlflow is not installed: "
            "pip install 'dreambooth-service[mlflow]' (here and in the Ray workers' image)"
        )
    auth = open_authenticator("trainer", settings.auth, settings.server)  # before Ray: fail fast
    connect_ray(settings.ray_address or os.environ.get("RAY_ADDRESS") or None)
    try:
        asyncio.run(TrainerServer(settings, auth=auth).run_until_signal())
    finally:
        disconnect_ray()
    return 0
