"""Every RPC of every service, driven by requests derived from the proto descriptors and by raw
corrupt frames: the answer is OK or a specific client error, never INTERNAL or UNKNOWN, messages
stay bounded, and every server is still SERVING at the end.

Each server runs with small cost ceilings so that the requests the fuzzer happens to make valid
finish in a moment. The number of examples per RPC is bounded (FUZZ_EXAMPLES); the codes seen
are printed per RPC, the table in docs/reliability.md comes from that output.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from dreambooth.v1 import inference_pb2, priorgen_pb2, trainer_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fixtures.inference_server import RunningInference
from tests.fixtures.priorgen_server import RunningPriorGen
from tests.fixtures.proto_strategies import message_strategy
from tests.fixtures.trainer_server import RunningTrainer, make_png

FUZZ_EXAMPLES = int(os.environ.get("DREAMBOOTH_FUZZ_EXAMPLES", "25"))
CALL_TIMEOUT_S = 20.0
# What a client may be told. INTERNAL, UNKNOWN, UNIMPLEMENTED and DATA_LOSS mean a server bug.
ALLOWED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.PERMISSION_DENIED,  # e.g. GeneratePriors naming another tenant
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.DEADLINE_EXCEEDED,  # the test's own deadline on a long valid stream
}
SERVICES = {
    "trainer": trainer_pb2.DESCRIPTOR.services_by_name["TrainerService"],
    "priorgen": priorgen_pb2.DESCRIPTOR.services_by_name["PriorGenService"],
    "inference": inference_pb2.DESCRIPTOR.services_by_name["InferenceService"],
}


def _fail_fast(*_: Any, **__: Any) -> Any:
    raise RuntimeError("fuzzed jobs are not trained")


@pytest.fixture
def servers(
    start_trainer: Callable[..., RunningTrainer],
    start_priorgen: Callable[..., RunningPriorGen],
    start_inference: Callable[..., RunningInference],
) -> dict[str, Any]:
    priorgen = start_priorgen(max_images=4, max_request_cost=1.0)
    trainer = start_trainer(train=_fail_fast, priorgen_address=priorgen.address)
    inference = start_inference(max_request_cost=1.0, max_width=128, max_height=128)
    return {"trainer": trainer, "priorgen": priorgen, "inference": inference}


def _call(channel: grpc.Channel, method: Any, requests: list[bytes]) -> grpc.StatusCode:
    path = f"/{method.containing_service.full_name}/{method.name}"
    shape = (
        ("stream" if method.client_streaming else "unary")
        + "_"
        + ("stream" if method.server_streaming else "unary")
    )
    call = getattr(channel, shape)(path, request_serializer=None, response_deserializer=None)
    argument: Any = iter(requests) if method.client_streaming else requests[0]
    try:
        if method.server_streaming:
            stream = call(argument, timeout=CALL_TIMEOUT_S)
            for _ in stream:
                pass
        else:
            call(argument, timeout=CALL_TIMEOUT_S)
    except grpc.RpcError as err:
        details = err.details() or ""
        assert len(details) <= 1000, f"{method.name}: a {len(details)}-character message"
        assert " at 0x" not in details, f"{method.name}: {details!r}"
        return err.code()
    return grpc.StatusCode.OK


def _healthy(address: str) -> bool:
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        response = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        return response.status == health_pb2.HealthCheckResponse.SERVING


def _methods() -> Iterator[tuple[str, Any]]:
    for name, service in SERVICES.items():
        for method in service.methods:
            yield name, method


def test_fuzzed_requests_get_a_client_error_or_ok_never_internal(servers: dict[str, Any]) -> None:
    """One server of each kind for all RPCs (starting them per RPC would cost more than the fuzzing)."""
    dataset = servers["trainer"].upload([make_png(0)]).name
    known = ["models/tiny-sd", dataset, "trainingJobs/000000000000"]
    for service, method in _methods():
        _fuzz(servers[service].address, method, known)
    for server in servers.values():
        assert _healthy(server.address)


def _fuzz(address: str, method: Any, known: list[str]) -> None:
    requests = st.lists(message_strategy(method.input_type, known), min_size=1, max_size=3)
    raw_frames = st.lists(st.binary(max_size=200), min_size=1, max_size=3)
    seen: collections.Counter[str] = collections.Counter()
    channel = grpc.insecure_channel(address)

    @settings(
        max_examples=FUZZ_EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    @given(messages=requests, frames=raw_frames, raw=st.booleans())
    def fuzz(messages: list[Any], frames: list[bytes], raw: bool) -> None:
        payload = frames if raw else [message.SerializeToString() for message in messages]
        code = _call(channel, method, payload)
        seen[code.name] += 1
        assert code in ALLOWED, f"{method.name} answered {code.name} to {payload[:1]!r}"

    try:
        fuzz()
    finally:
        channel.close()
        print(f"fuzz {method.containing_service.name}.{method.name}: {dict(sorted(seen.items()))}")
