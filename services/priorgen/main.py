"""`dreambooth-server priorgen`: the prior-generation gRPC service.

Start-up: settings from the environment (DREAMBOOTH_PRIORGEN_*, store DREAMBOOTH_S3_*), JSON logs,
the store checked, then health SERVING. SIGTERM/SIGINT: NOT_SERVING, in-flight streams get their
grace, then running sets stop at the next denoising step (their images so far stay in the store
and the next request resumes them).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from pathlib import Path

from dreambooth.v1 import priorgen_pb2_grpc

from services.common.auth import Authenticator, open_authenticator
from services.common.logging_setup import configure_logging
from services.common.model_store import ModelStore
from services.common.object_store import ObjectStore
from services.common.server import GrpcServerApp
from services.common.store_factory import open_store
from services.priorgen.cache_key import PRIORS_ROOT
from services.priorgen.generate import PriorGenerator
from services.priorgen.metrics import PriorGenMetrics
from services.priorgen.servicer import SERVICE_NAME, PriorGenServicer
from services.priorgen.settings import ENV_PREFIX, PriorGenSettings, load_settings

log = logging.getLogger(__name__)


class PriorGenServer:
    """The gRPC app and the core wired together; used by main() and by the test fixtures."""

    def __init__(
        self, settings: PriorGenSettings, store: ObjectStore | None = None, auth: Authenticator | None = None
    ) -> None:
        self.settings = settings
        auth = auth or open_authenticator("priorgen", settings.auth, settings.server)
        self.store = store if store is not None else open_store(settings.store)
        self.app = GrpcServerApp("priorgen", settings.server, auth=auth)
        self.core = PriorGenerator(
            self.store,
            ModelStore(self.store, Path(settings.store.cache_dir)),
            settings,
            PriorGenMetrics.create(self.app.registry, self.app.metrics_namespace),
        )
        self.app.add_service(
            priorgen_pb2_grpc.add_PriorGenServiceServicer_to_server, PriorGenServicer(self.core), SERVICE_NAME
        )

    @property
    def address(self) -> str:
        return self.app.address

    async def start(self) -> None:
        """Listen (NOT_SERVING), check the store answers, then report SERVING."""
        await self.app.start()
        await asyncio.to_thread(_probe_store, self.store)  # Unavailable after retries when it is down
        await self.app.set_serving(True)
        log.info("priorgen ready", extra={"address": self.address, "batch_size": self.settings.batch_size})

    async def stop(self, grace: float | None = None) -> None:
        await self.app.stop(grace)
        await asyncio.to_thread(self.core.close)

    async def serve(self) -> None:
        """Start, serve until SIGTERM/SIGINT, stop gracefully."""
        await self.start()
        try:
            await self.app.run_until_signal()
        finally:
            await asyncio.to_thread(self.core.close)


def _probe_store(store: ObjectStore) -> None:
    next(iter(store.list(f"{PRIORS_ROOT}/")), None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dreambooth-server priorgen",
        description=f"Run the prior-generation gRPC service. Configured by {ENV_PREFIX}* variables "
        "(PORT, METRICS_PORT, BATCH_SIZE, DEVICE, ...) and the store's DREAMBOOTH_S3_* variables.",
    )
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv or [])
    configure_logging(args.log_level)
    settings = load_settings()
    asyncio.run(PriorGenServer(settings).serve())
    return 0
