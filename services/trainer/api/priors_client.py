"""Client of PriorGenService: asks for a job's class-prior images and forwards their progress.

Blocking (it runs in the job's thread). While the service is unavailable it retries a few times
with back-off; then it fails with a message that says what to check. A cancel stops the stream
at once (the call is cancelled from a small watcher thread, not at the next message).

The trainer calls as a service identity (an internal tenant's key, or its client certificate
under mTLS) and names the job's tenant, so the set is made from that tenant's models and kept
in its prefix.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import grpc
from dreambooth.v1 import priorgen_pb2, priorgen_pb2_grpc
from dreambooth_client.channels import ChannelConfig, call_metadata, sync_channel

from services.common.errors import FailedPrecondition, Unavailable
from services.common.model_store import model_name
from services.trainer.job_spec import JobSpec
from services.trainer.jobs.priors import PriorsCancelled, PriorSetInfo

log = logging.getLogger(__name__)

_RETRYABLE = (
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
)


def priors_request(spec: JobSpec, tenant: str = "") -> priorgen_pb2.GeneratePriorsRequest:
    return priorgen_pb2.GeneratePriorsRequest(
        tenant=tenant,
        base_model=model_name(spec.base_model),
        class_prompt=spec.class_prompt,
        negative_prompt=spec.class_negative_prompt,
        num_images=spec.num_class_images,
        resolution=spec.resolution,
        steps=spec.prior_steps,
        seed=spec.seed,
    )


class PriorsClient:
    def __init__(
        self,
        address: str,
        *,
        attempts: int = 3,
        retry_seconds: float = 2.0,
        channel: ChannelConfig | None = None,
        api_key: str = "",
    ) -> None:
        self.address = address
        self.attempts = attempts
        self.retry_seconds = retry_seconds
        self._channel = sync_channel(address, channel or ChannelConfig())
        self._stub = priorgen_pb2_grpc.PriorGenServiceStub(self._channel)
        self._metadata = call_metadata(api_key or None)

    def close(self) -> None:
        self._channel.close()

    def generate(
        self,
        spec: JobSpec,
        *,
        tenant: str = "",
        on_progress: Callable[[int, int], None],
        cancel: threading.Event,
    ) -> PriorSetInfo:
        """The job's prior set, generated or from priorgen's cache. Raises PriorsCancelled,
        Unavailable (service down after retries) or FailedPrecondition (it refused the request)."""
        request = priors_request(spec, tenant)
        delay = self.retry_seconds
        for attempt in range(1, self.attempts + 1):
            try:
                return self._stream(request, on_progress, cancel)
            except grpc.RpcError as err:
                code = err.code() if isinstance(err, grpc.Call) else grpc.StatusCode.UNKNOWN
                if cancel.is_set():
                    raise PriorsCancelled() from None
                details = err.details() if isinstance(err, grpc.Call) else str(err)
                if code not in _RETRYABLE:
                    raise FailedPrecondition(
                        f"the prior-generation service refused the job's class images: {code.name}: {details}"
                    ) from None
                log.warning(
                    "prior generation unavailable",
                    extra={
                        "address": self.address,
                        "attempt": attempt,
                        "code": code.name,
                        "details": details,
                    },
                )
                if attempt == self.attempts:
                    raise Unavailable(
                        f"the prior-generation service at {self.address} is unavailable ({details}); "
                        "check that it is running and reachable from the trainer, then create the job again"
                    ) from None
                if cancel.wait(delay):
                    raise PriorsCancelled() from None
                delay *= 2
        raise AssertionError("unreachable")

    def _stream(
        self,
        request: priorgen_pb2.GeneratePriorsRequest,
        on_progress: Callable[[int, int], None],
        cancel: threading.Event,
    ) -> PriorSetInfo:
        call = self._stub.GeneratePriors(request, metadata=self._metadata, wait_for_ready=False)
        finished = threading.Event()

        def cancel_when_asked() -> None:
            while not finished.wait(0.1):
                if cancel.is_set():
                    call.cancel()
                    return

        watcher = threading.Thread(target=cancel_when_asked, name="priors-cancel", daemon=True)
        watcher.start()
        try:
            for response in call:
                if response.HasField("progress"):
                    on_progress(response.progress.images_done, response.progress.images_total)
                elif response.HasField("prior_set"):
                    prior_set = response.prior_set
                    return PriorSetInfo(
                        prefix=prior_set.prefix, count=prior_set.count, cached=prior_set.cached
                    )
        finally:
            finished.set()
            watcher.join()
        if cancel.is_set():
            raise PriorsCancelled()
        raise FailedPrecondition("the prior-generation service ended its stream without a prior set")
