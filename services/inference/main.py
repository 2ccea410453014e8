"""`dreambooth-server inference`: the inference gRPC service (127.0.0.1:50053, metrics :9183).

Health stays NOT_SERVING until the default model is loaded and one tiny sampling run went
through the whole path (warm-up); SIGTERM flips it back, then the server stops with grace.
Configured by DREAMBOOTH_INFERENCE_* and DREAMBOOTH_S3_* variables (see settings.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
from pathlib import Path

from dreambooth.v1 import inference_pb2_grpc

from services.common.auth import Authenticator, open_authenticator
from services.common.logging_setup import configure_logging
from services.common.model_store import ModelStore
from services.common.server import GrpcServerApp
from services.common.settings import from_env
from services.common.store_factory import open_store
from services.common.usage import UsageLedger
from services.inference.core import InferenceCore
from services.inference.metrics import InferenceMetrics
from services.inference.servicer import SERVICE_NAME, InferenceServicer
from services.inference.settings import ENV_PREFIX, InferenceSettings

log = logging.getLogger(__name__)


class InferenceServer:
    """The gRPC app and the core wired together; used by main(), the test fixtures and the bench."""

    def __init__(
        self, settings: InferenceSettings, models: ModelStore | None = None, auth: Authenticator | None = None
    ) -> None:
        self.settings = settings
        auth = auth or open_authenticator("inference", settings.auth, settings.server)
        self.app = GrpcServerApp("inference", settings.server, auth=auth)
        if models is None:
            models = ModelStore(open_store(settings.store), Path(settings.store.cache_dir))
        metrics = InferenceMetrics.create(self.app.registry, self.app.metrics_namespace)
        self.usage = UsageLedger(models.store, "inference", flush_seconds=settings.usage_flush_seconds)
        self.core = InferenceCore(settings, models, metrics, self.usage)
        self.app.add_service(
            inference_pb2_grpc.add_InferenceServiceServicer_to_server,
            InferenceServicer(self.core),
            SERVICE_NAME,
        )
        self._readiness: asyncio.Task[None] | None = None

    @property
    def address(self) -> str:
        return self.app.address

    async def start(self) -> None:
        """Serve at once (NOT_SERVING); SERVING once the default model is warm."""
        self.core.start()
        self.usage.start()
        await self.app.start()
        self._readiness = asyncio.ensure_future(self._become_ready())

    async def wait_ready(self) -> None:
        if self._readiness is None:
            raise RuntimeError("server not started")
        await asyncio.shield(self._readiness)

    async def _become_ready(self) -> None:
        while True:
            try:
                await self.core.warm_up()
                break
            except Exception as err:  # the store or the model is not there yet: keep trying
                log.warning(
                    "default model not ready; retrying",
                    extra={"model_id": self.settings.default_model, "error": str(err)},
                )
                await asyncio.sleep(self.settings.warmup_retry_seconds)
        await self.app.set_serving(True)
        log.info("serving", extra={"address": self.address})

    async def stop(self, grace: float | None = None) -> None:
        if self._readiness is not None and not self._readiness.done():
            self._readiness.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._readiness
        await self.app.stop(grace)
        await asyncio.to_thread(self.core.close)
        await asyncio.to_thread(self.usage.close)  # the last counts reach the store

    async def run_until_signal(self) -> None:
        await self.start()
        try:
            await self.app.run_until_signal()
        finally:
            await self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dreambooth-server inference",
        description="Run the inference gRPC service. Configured by DREAMBOOTH_INFERENCE_* and "
        "DREAMBOOTH_S3_* environment variables (see services/inference/settings.py).",
    )
    parser.parse_args(argv or [])
    settings = from_env(InferenceSettings, ENV_PREFIX)
    configure_logging(settings.log_level)
    if settings.torch_threads > 0:
        import torch

        torch.set_num_threads(settings.torch_threads)
    asyncio.run(InferenceServer(settings).run_until_signal())
    return 0
