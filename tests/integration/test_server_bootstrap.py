"""GrpcServerApp on real loopback servers: health, reflection, error mapping, metrics, shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from dreambooth.v1 import inference_pb2, inference_pb2_grpc, trainer_pb2, trainer_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2
from prometheus_client.parser import text_string_to_metric_families

from services.common import errors
from services.common.server import GrpcServerApp
from services.common.settings import ServerSettings
from tests.integration.bootstrap_servicers import (
    DOMAIN_ERRORS,
    SECRET,
    Behaviours,
    InferenceTestServicer,
    TrainerTestServicer,
)

INFERENCE = "dreambooth.v1.InferenceService"
TRAINER = "dreambooth.v1.TrainerService"
DEADLINE_S = 20.0


def run(coro: Awaitable[None]) -> None:
    asyncio.run(asyncio.wait_for(coro, timeout=60))


async def wait_until(condition: Callable[[], object], what: str, timeout: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def add_test_services(app: GrpcServerApp, behaviours: Behaviours) -> None:
    inference, trainer = InferenceTestServicer(behaviours), TrainerTestServicer(behaviours)
    app.add_service(inference_pb2_grpc.add_InferenceServiceServicer_to_server, inference, INFERENCE)
    app.add_service(trainer_pb2_grpc.add_TrainerServiceServicer_to_server, trainer, TRAINER)


@contextlib.asynccontextmanager
async def serving_app(
    settings: ServerSettings | None = None,
) -> AsyncIterator[tuple[GrpcServerApp, Behaviours, grpc.aio.Channel]]:
    behaviours = Behaviours()
    app = GrpcServerApp("inference", settings or ServerSettings(grace_seconds=5))
    add_test_services(app, behaviours)
    await app.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            yield app, behaviours, channel
    finally:
        behaviours.gate.set()
        await app.stop(grace=0)


def scrape(app: GrpcServerApp) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{app.metrics_port}/metrics", timeout=10) as response:
        return response.read().decode()


def sample(text: str, name: str, **labels: str) -> float | None:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return None


async def health_status(channel: grpc.aio.Channel, service: str) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    response = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=DEADLINE_S)
    return response.status


async def rpc_error(call: Awaitable[object]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


async def stream_error(call: grpc.aio.UnaryStreamCall) -> tuple[int, grpc.aio.AioRpcError]:
    received = 0
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in call:
            received += 1
    return received, info.value


# ---- health and reflection ----------------------------------------------------------------------


def test_health_is_not_serving_until_ready_then_serving() -> None:
    async def scenario() -> None:
        async with serving_app() as (app, _, channel):
            for service in ("", INFERENCE, TRAINER):
                assert await health_status(channel, service) == health_pb2.HealthCheckResponse.NOT_SERVING
            await app.set_serving(True)
            for service in ("", INFERENCE, TRAINER):
                assert await health_status(channel, service) == health_pb2.HealthCheckResponse.SERVING
            await app.set_serving(False)
            assert await health_status(channel, INFERENCE) == health_pb2.HealthCheckResponse.NOT_SERVING

    run(scenario())


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
def test_reflection_v1_and_v1alpha_list_services_and_describe_them(version: str) -> None:
    """Current grpcurl/Postman ask v1 first; older tools v1alpha. The v1 frames are read with the
    v1alpha classes here: the two protocols are the same bytes under another package name."""
    method = f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo"

    async def scenario() -> None:
        async with serving_app() as (_, _, channel):
            call = channel.stream_stream(
                method,
                request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
            )
            requests = [
                reflection_pb2.ServerReflectionRequest(list_services=""),
                reflection_pb2.ServerReflectionRequest(file_containing_symbol=INFERENCE),
            ]
            responses = [r async for r in call(iter(requests), timeout=DEADLINE_S)]
            names = {s.name for s in responses[0].list_services_response.service}
            assert names == {
                INFERENCE,
                TRAINER,
                "grpc.health.v1.Health",
                "grpc.reflection.v1alpha.ServerReflection",
                "grpc.reflection.v1.ServerReflection",
            }
            assert responses[1].file_descriptor_response.file_descriptor_proto

    run(scenario())


# ---- error mapping --------------------------------------------------------------------------------

CORRUPT_FRAME = b"\x0a\xff\xff\xff\xff\x0f"  # field 1, length-delimited, with an impossible length


def _raw(channel: grpc.aio.Channel, kind: str, method: str) -> Any:
    return getattr(channel, kind)(method, request_serializer=None, response_deserializer=None)


def test_a_corrupt_frame_is_invalid_argument_for_every_rpc_shape() -> None:
    """Not INTERNAL or UNKNOWN with protobuf class names: the client sent bad bytes."""
    header = trainer_pb2.UploadImagesRequest(
        image_header=trainer_pb2.ImageHeader(filename="ok")
    ).SerializeToString()

    async def scenario() -> None:
        async with serving_app() as (app, _, channel):
            await app.set_serving(True)
            calls = {
                "unary": _raw(channel, "unary_unary", f"/{INFERENCE}/GetModel")(CORRUPT_FRAME),
                "server streaming": _raw(channel, "unary_stream", f"/{INFERENCE}/Generate")(CORRUPT_FRAME),
                "client streaming": _raw(channel, "stream_unary", f"/{TRAINER}/UploadImages")(
                    iter([header, CORRUPT_FRAME])
                ),
            }
            for shape, call in calls.items():
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    if shape == "server streaming":
                        async for _ in call:
                            pass
                    else:
                        await call
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, shape
                assert info.value.details().startswith("request: is not a valid dreambooth.v1."), shape
            assert await health_status(channel, "") == health_pb2.HealthCheckResponse.SERVING

    run(scenario())


def test_messages_are_bounded_and_carry_no_object_reprs() -> None:
    """A 20 KB name echoed into an error would outgrow gRPC's metadata limit and surface as
    RESOURCE_EXHAUSTED; it is cut instead, and heap addresses never reach a client."""

    async def scenario() -> None:
        async with serving_app() as (_, _, channel):
            inference = inference_pb2_grpc.InferenceServiceStub(channel)
            err = await rpc_error(inference.GetModel(inference_pb2.GetModelRequest(name="long")))
            assert err.code() == grpc.StatusCode.NOT_FOUND
            assert len(err.details()) <= 1000 and "0x" not in err.details() and "BytesIO" not in err.details()

    run(scenario())


@pytest.mark.parametrize("error_name", sorted(DOMAIN_ERRORS))
def test_domain_error_maps_to_status_unary_streaming_and_client_streaming(error_name: str) -> None:
    _, code, message_start = DOMAIN_ERRORS[error_name]

    async def scenario() -> None:
        async with serving_app() as (_, _, channel):
            inference = inference_pb2_grpc.InferenceServiceStub(channel)
            unary = await rpc_error(
                inference.GetModel(inference_pb2.GetModelRequest(name=f"raise:{error_name}"))
            )
            assert unary.code().name == code
            assert unary.details().startswith(message_start)

            call = inference.Generate(inference_pb2.GenerateRequest(prompt=f"raise:{error_name}"))
            received, streamed = await stream_error(call)
            assert received == 2  # raised mid-stream, after two messages went out
            assert streamed.code().name == code
            assert streamed.details() == unary.details()

            trainer = trainer_pb2_grpc.TrainerServiceStub(channel)
            parts = [
                trainer_pb2.UploadImagesRequest(image_header=trainer_pb2.ImageHeader(filename="ok")),
                trainer_pb2.UploadImagesRequest(chunk=b"x"),
                trainer_pb2.UploadImagesRequest(
                    image_header=trainer_pb2.ImageHeader(filename=f"raise:{error_name}")
                ),
            ]
            client_streamed = await rpc_error(trainer.UploadImages(iter(parts), timeout=DEADLINE_S))
            assert client_streamed.code().name == code
            assert client_streamed.details() == unary.details()

    run(scenario())


def test_invalid_argument_names_the_field() -> None:
    async def scenario() -> None:
        async with serving_app() as (_, _, channel):
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            err = await rpc_error(stub.GetModel(inference_pb2.GetModelRequest(name="raise:InvalidArgument")))
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert err.details() == "prompt: must not be empty"

    run(scenario())


def test_unexpected_exception_is_internal_without_detail(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        async with serving_app() as (_, _, channel):
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            unary = await rpc_error(stub.GetModel(inference_pb2.GetModelRequest(name="crash")))
            received, streamed = await stream_error(
                stub.Generate(inference_pb2.GenerateRequest(prompt="crash"))
            )
            assert received == 1
            for err in (unary, streamed):
                assert err.code() == grpc.StatusCode.INTERNAL
                assert err.details().startswith("internal error; see server logs (ref ")
                assert SECRET not in err.details() and "RuntimeError" not in err.details()
                # The reference points at the logged traceback.
                ref = err.details().removesuffix(")").rsplit(" ", 1)[-1]
                logged = [r for r in caplog.records if getattr(r, "ref", None) == ref]
                assert logged and logged[0].exc_info and SECRET in str(logged[0].exc_info[1])

    with caplog.at_level("INFO"):
        run(scenario())


def test_normal_calls_still_work_through_the_interceptor() -> None:
    async def scenario() -> None:
        async with serving_app() as (_, _, channel):
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            listed = await stub.ListModels(
                inference_pb2.ListModelsRequest(page_token="t"), timeout=DEADLINE_S
            )
            assert listed.next_page_token == "t"
            steps = [m.progress.step async for m in stub.Generate(inference_pb2.GenerateRequest(prompt="ok"))]
            assert steps == [1, 2, 3]
            trainer = trainer_pb2_grpc.TrainerServiceStub(channel)
            headers = [
                trainer_pb2.UploadImagesRequest(image_header=trainer_pb2.ImageHeader(filename="ok"))
            ] * 3
            uploaded = await trainer.UploadImages(iter(headers), timeout=DEADLINE_S)
            assert uploaded.dataset.image_count == 3

    run(scenario())


def test_status_set_by_the_servicer_itself_is_kept_and_counted() -> None:
    async def scenario() -> None:
        async with serving_app() as (app, _, channel):
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            aborted = await rpc_error(stub.GetModel(inference_pb2.GetModelRequest(name="abort")))
            assert (aborted.code(), aborted.details()) == (grpc.StatusCode.OUT_OF_RANGE, "page out of range")
            set_code = await rpc_error(stub.GetModel(inference_pb2.GetModelRequest(name="set_code")))
            assert (set_code.code(), set_code.details()) == (grpc.StatusCode.ABORTED, "conflict, retry")
            for code in ("OUT_OF_RANGE", "ABORTED"):
                labels = {"method": "GetModel", "code": code}
                assert app.registry.get_sample_value("dreambooth_inference_requests_total", labels) == 1

    run(scenario())


class RequireApiKey(grpc.aio.ServerInterceptor):
    """Stands in for an auth interceptor: refuses calls without metadata `x-api-key`."""

    async def intercept_service(self, continuation, handler_call_details):  # type: ignore[no-untyped-def]
        if not any(key == "x-api-key" for key, _ in handler_call_details.invocation_metadata or ()):
            raise errors.Unauthenticated("missing x-api-key")
        return await continuation(handler_call_details)


def test_domain_error_from_an_inner_interceptor_is_mapped_and_counted() -> None:
    async def scenario() -> None:
        app = GrpcServerApp("inference", ServerSettings(), interceptors=[RequireApiKey()])
        behaviours = Behaviours()
        add_test_services(app, behaviours)
        await app.start()
        try:
            async with grpc.aio.insecure_channel(app.address) as channel:
                stub = inference_pb2_grpc.InferenceServiceStub(channel)
                key = (("x-api-key", "k"),)
                assert await stub.GetModel(inference_pb2.GetModelRequest(name="ok"), metadata=key, timeout=10)
                upload = trainer_pb2_grpc.TrainerServiceStub(channel).UploadImages
                refusals = [
                    await rpc_error(
                        stub.GetModel(inference_pb2.GetModelRequest(name="ok"), timeout=DEADLINE_S)
                    ),
                    (await stream_error(stub.Generate(inference_pb2.GenerateRequest(prompt="ok"))))[1],
                    await rpc_error(upload(iter([trainer_pb2.UploadImagesRequest(chunk=b"x")] * 3))),
                ]
                for refused in refusals:
                    assert refused.code() == grpc.StatusCode.UNAUTHENTICATED
                    assert refused.details() == "missing x-api-key"
            for method in ("GetModel", "Generate", "UploadImages"):
                labels = {"method": method, "code": "UNAUTHENTICATED"}
                assert app.registry.get_sample_value("dreambooth_inference_requests_total", labels) == 1
        finally:
            await app.stop(grace=0)

    run(scenario())


# ---- metrics --------------------------------------------------------------------------------------


def test_metrics_scrape_has_counts_by_method_and_code() -> None:
    async def scenario() -> None:
        async with serving_app() as (app, _, channel):
            await app.set_serving(True)
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            await stub.GetModel(inference_pb2.GetModelRequest(name="ok"), timeout=DEADLINE_S)
            await stub.GetModel(inference_pb2.GetModelRequest(name="ok"), timeout=DEADLINE_S)
            await rpc_error(stub.GetModel(inference_pb2.GetModelRequest(name="raise:NotFound")))
            await rpc_error(stub.GetModel(inference_pb2.GetModelRequest(name="crash")))
            _ = [m async for m in stub.Generate(inference_pb2.GenerateRequest(prompt="ok"))]
            await health_status(channel, "")

            text = await asyncio.to_thread(scrape, app)
            total = "dreambooth_inference_requests_total"
            assert sample(text, total, method="GetModel", code="OK") == 2
            assert sample(text, total, method="GetModel", code="NOT_FOUND") == 1
            assert sample(text, total, method="GetModel", code="INTERNAL") == 1
            assert sample(text, total, method="Generate", code="OK") == 1
            assert sample(text, "dreambooth_inference_request_duration_seconds_count", method="GetModel") == 4
            assert sample(text, "dreambooth_inference_in_flight_requests", method="GetModel") == 0
            assert "Health" not in text and "Check" not in text  # probes are not counted

    run(scenario())


def test_stream_is_timed_over_the_whole_stream() -> None:
    async def scenario() -> None:
        async with serving_app() as (app, behaviours, channel):
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            call = stub.Generate(inference_pb2.GenerateRequest(prompt="gate"), timeout=DEADLINE_S)
            first = await call.read()
            first_seen = time.perf_counter()
            assert first.progress.step == 1
            await behaviours.started.wait()

            # The handler has long returned its generator, yet the stream is still in flight.
            during = await asyncio.to_thread(scrape, app)
            assert sample(during, "dreambooth_inference_in_flight_requests", method="Generate") == 1
            assert sample(during, "dreambooth_inference_requests_total", method="Generate", code="OK") is None

            released = time.perf_counter()
            behaviours.gate.set()
            second = await call.read()
            assert second.progress.step == 2
            assert await call.read() is grpc.aio.EOF
            assert await call.code() == grpc.StatusCode.OK

            after = await asyncio.to_thread(scrape, app)
            assert sample(after, "dreambooth_inference_requests_total", method="Generate", code="OK") == 1
            assert sample(after, "dreambooth_inference_in_flight_requests", method="Generate") == 0
            # The server's clock started before the first message and stopped after the release.
            duration = sample(after, "dreambooth_inference_request_duration_seconds_sum", method="Generate")
            assert duration is not None and duration >= released - first_seen

    run(scenario())


@pytest.mark.parametrize("rpc", ["unary", "stream"])
def test_client_cancellation_is_recorded_as_cancelled(rpc: str) -> None:
    async def scenario() -> None:
        async with serving_app() as (app, behaviours, channel):
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            method = "GetModel" if rpc == "unary" else "Generate"
            if rpc == "unary":
                call = stub.GetModel(inference_pb2.GetModelRequest(name="block"))
            else:
                call = stub.Generate(inference_pb2.GenerateRequest(prompt="block"))
            await behaviours.started.wait()
            call.cancel()
            await behaviours.cancelled.wait()

            def recorded() -> float | None:
                return app.registry.get_sample_value(
                    "dreambooth_inference_requests_total", {"method": method, "code": "CANCELLED"}
                )

            await wait_until(lambda: recorded() == 1, "the cancelled request to be counted")
            in_flight = app.registry.get_sample_value(
                "dreambooth_inference_in_flight_requests", {"method": method}
            )
            assert in_flight == 0

    run(scenario())


def test_expired_deadline_is_recorded_as_deadline_exceeded() -> None:
    async def scenario() -> None:
        async with serving_app() as (app, behaviours, channel):
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            err = await rpc_error(stub.GetModel(inference_pb2.GetModelRequest(name="block"), timeout=0.5))
            assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            await behaviours.cancelled.wait()
            labels = {"method": "GetModel", "code": "DEADLINE_EXCEEDED"}
            await wait_until(
                lambda: app.registry.get_sample_value("dreambooth_inference_requests_total", labels) == 1,
                "the expired request to be counted",
            )

    run(scenario())


def test_promtool_accepts_the_scrape(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not on PATH (apt-get install prometheus provides it)")

    async def scenario() -> str:
        async with serving_app() as (app, _, channel):
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            await stub.GetModel(inference_pb2.GetModelRequest(name="ok"), timeout=DEADLINE_S)
            await rpc_error(stub.GetModel(inference_pb2.GetModelRequest(name="raise:Unavailable")))
            _ = [m async for m in stub.Generate(inference_pb2.GenerateRequest(prompt="ok"))]
            return await asyncio.to_thread(scrape, app)

    text = asyncio.run(asyncio.wait_for(scenario(), timeout=60))
    checked = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60, check=False
    )
    assert checked.returncode == 0 and not checked.stdout.strip() and not checked.stderr.strip(), (
        checked.stdout + checked.stderr
    )


# ---- shutdown -------------------------------------------------------------------------------------


def test_graceful_stop_finishes_in_flight_rpc_and_refuses_new_ones() -> None:
    async def scenario() -> None:
        async with serving_app(ServerSettings(grace_seconds=30)) as (app, behaviours, channel):
            await app.set_serving(True)
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING

            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            slow = stub.GetModel(inference_pb2.GetModelRequest(name="gate"), timeout=DEADLINE_S)
            await behaviours.started.wait()
            metrics_port = app.metrics_port
            stopping = asyncio.ensure_future(app.stop())

            # Health flips first, so load balancers drain the pod before the listener closes.
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
            watch.cancel()

            async def refused() -> bool:
                try:
                    await stub.GetModel(inference_pb2.GetModelRequest(name="ok"), timeout=DEADLINE_S)
                except grpc.aio.AioRpcError as err:
                    assert err.code() == grpc.StatusCode.UNAVAILABLE, err
                    return True
                return False

            deadline = time.monotonic() + DEADLINE_S
            while not await refused():
                assert time.monotonic() < deadline, "new RPCs were never refused"
                await asyncio.sleep(0.01)
            assert not stopping.done()  # the slow RPC still holds the server open

            behaviours.gate.set()
            await slow  # completes with OK inside the grace
            assert await slow.code() == grpc.StatusCode.OK
            await asyncio.wait_for(stopping, timeout=DEADLINE_S)

            with pytest.raises(urllib.error.URLError):
                urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5)

    run(scenario())


def test_grace_expiry_cancels_a_stuck_rpc() -> None:
    async def scenario() -> None:
        async with serving_app() as (app, behaviours, channel):
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            stuck = stub.Generate(inference_pb2.GenerateRequest(prompt="block"), timeout=DEADLINE_S)
            await behaviours.started.wait()
            await app.stop(grace=0.1)
            await behaviours.cancelled.wait()
            await stream_error(stuck)  # the client sees the stream end with an error
            counted = app.registry.get_sample_value(
                "dreambooth_inference_requests_total", {"method": "Generate", "code": "CANCELLED"}
            )
            assert counted == 1

    run(scenario())


def test_stop_is_idempotent_and_start_twice_is_refused() -> None:
    async def scenario() -> None:
        async with serving_app() as (app, _, _):
            with pytest.raises(RuntimeError, match="already started"):
                await app.start()
            with pytest.raises(RuntimeError, match="before start"):
                app.add_service(lambda servicer, server: None, object(), "x.Y")
            await asyncio.gather(app.stop(grace=0), app.stop(grace=0))
            await app.stop()

    run(scenario())


def write_self_signed_cert(directory: Path) -> tuple[Path, Path]:
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "tls.crt", directory / "tls.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_file, key_file


def test_tls_when_cert_and_key_are_set(tmp_path: Path) -> None:
    cert_file, key_file = write_self_signed_cert(tmp_path)

    async def scenario() -> None:
        settings = ServerSettings(tls_cert_file=str(cert_file), tls_key_file=str(key_file))
        app = GrpcServerApp("inference", settings)
        add_test_services(app, Behaviours())
        await app.start()
        try:
            credentials = grpc.ssl_channel_credentials(root_certificates=cert_file.read_bytes())
            options = [("grpc.ssl_target_name_override", "localhost")]
            async with grpc.aio.secure_channel(app.address, credentials, options=options) as channel:
                stub = inference_pb2_grpc.InferenceServiceStub(channel)
                await stub.GetModel(inference_pb2.GetModelRequest(name="ok"), timeout=DEADLINE_S)
            async with grpc.aio.insecure_channel(app.address) as plaintext:
                err = await rpc_error(
                    inference_pb2_grpc.InferenceServiceStub(plaintext).GetModel(
                        inference_pb2.GetModelRequest(name="ok"), timeout=DEADLINE_S
                    )
                )
                assert err.code() == grpc.StatusCode.UNAVAILABLE
        finally:
            await app.stop(grace=0)

    run(scenario())


def test_tls_needs_both_cert_and_key() -> None:
    async def scenario() -> None:
        app = GrpcServerApp("inference", ServerSettings(tls_cert_file="/nonexistent/cert.pem"))
        with pytest.raises(ValueError, match="tls_cert_file and tls_key_file"):
            await app.start()
        with pytest.raises(RuntimeError):
            _ = app.metrics_port  # the metrics server was not left running

    run(scenario())


def test_port_in_use_is_a_clear_error() -> None:
    async def scenario() -> None:
        async with serving_app() as (app, _, _):
            clash = GrpcServerApp("priorgen", ServerSettings(port=app.port))
            with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{app.port}"):
                await clash.start()

    run(scenario())


def test_run_until_signal_returns_when_stopped_elsewhere() -> None:
    async def scenario() -> None:
        app = GrpcServerApp("inference", ServerSettings())
        add_test_services(app, Behaviours())
        serving = asyncio.ensure_future(app.run_until_signal())  # starts the server itself
        await wait_until(lambda: app.started or serving.done(), "the server to start")
        await app.stop(grace=0)
        await asyncio.wait_for(serving, timeout=DEADLINE_S)

    run(scenario())


SERVE_UNTIL_SIGNAL = textwrap.dedent(
    """
    import asyncio
    from services.common.logging_setup import configure_logging
    from services.common.server import GrpcServerApp
    from services.common.settings import ServerSettings

    async def main() -> None:
        configure_logging("INFO")
        app = GrpcServerApp("sigtest", ServerSettings(grace_seconds=5))
        await app.start()
        await app.set_serving(True)
        print(f"READY {app.port} {app.metrics_port}", flush=True)
        await app.run_until_signal()
        print("STOPPED", flush=True)

    asyncio.run(main())
    """
)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=lambda sig: sig.name)
def test_signal_stops_a_real_process_gracefully(sig: signal.Signals) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVE_UNTIL_SIGNAL],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stdout is not None
        ready = proc.stdout.readline()  # blocks until the server is up (or the process died)
        assert ready.startswith("READY"), ready + proc.stderr.read() if proc.stderr else ready
        port = int(ready.split()[1])

        async def is_serving() -> int:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                return await health_status(channel, "")

        assert asyncio.run(is_serving()) == health_pb2.HealthCheckResponse.SERVING

        proc.send_signal(sig)
        out, err = proc.communicate(timeout=DEADLINE_S)
        assert proc.returncode == 0, err
        assert "STOPPED" in out
        assert '"msg": "signal received"' in err and f'"signal": "{sig.name}"' in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
