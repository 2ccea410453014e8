"""PriorGenService end to end on loopback: real gRPC server, real S3 server, tiny model."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from typing import Any

import grpc
import pytest
from dreambooth.v1 import common_pb2, priorgen_pb2

from services.common.object_store import ObjectStore
from tests.fixtures.priorgen_server import RunningPriorGen, priors_request


def prior_set(responses: list[priorgen_pb2.GeneratePriorsResponse]) -> priorgen_pb2.PriorSet:
    assert responses and responses[-1].HasField("prior_set"), responses
    assert all(r.HasField("progress") for r in responses[:-1])
    return responses[-1].prior_set


def set_bytes(store: ObjectStore, result: priorgen_pb2.PriorSet) -> dict[str, bytes]:
    return {
        info.key.removeprefix(result.prefix): store.get_bytes(info.key) for info in store.list(result.prefix)
    }


def test_generates_a_set_then_serves_it_from_cache(
    priorgen_server: RunningPriorGen, s3_store: ObjectStore
) -> None:
    first = priorgen_server.generate(num_images=3)
    result = prior_set(first)
    assert (result.count, result.cached, result.generated) == (3, False, 3)
    assert result.prefix == f"priors/{result.key}/"
    progress = [(r.progress.images_done, r.progress.images_total) for r in first[:-1]]
    assert progress[0] == (0, 3) and progress[-1] == (3, 3)
    assert [done for done, _ in progress] == sorted(done for done, _ in progress)

    objects = set_bytes(s3_store, result)
    assert sorted(objects) == ["images/00000.png", "images/00001.png", "images/00002.png", "manifest.json"]
    manifest = json.loads(objects["manifest.json"])
    assert manifest["count"] == 3 and manifest["key"] == result.key
    for entry in manifest["images"]:
        data = objects[entry["key"].removeprefix(result.prefix)]
        assert entry["sha256"] == hashlib.sha256(data).hexdigest() and entry["size"] == len(data)
        assert data.startswith(b"\x89PNG")
    assert priorgen_server.metric("dreambooth_priorgen_images_generated_total") == 3

    again = prior_set(priorgen_server.generate(num_images=3))
    assert (again.key, again.cached, again.generated, again.count) == (result.key, True, 0, 3)
    assert priorgen_server.metric("dreambooth_priorgen_images_generated_total") == 3
    assert priorgen_server.metric("dreambooth_priorgen_cache_hits_total") == 1
    assert set_bytes(s3_store, again) == objects


def test_defaults_and_their_explicit_values_share_one_set(priorgen_server: RunningPriorGen) -> None:
    implicit = prior_set(priorgen_server.generate(num_images=1, resolution=0, steps=0, guidance_scale=0))
    settings = priorgen_server.settings
    explicit = prior_set(
        priorgen_server.generate(
            num_images=1,
            resolution=settings.default_resolution,
            steps=settings.default_steps,
            guidance_scale=settings.default_guidance_scale,
            scheduler=common_pb2.SCHEDULER_DDIM,
        )
    )
    assert explicit.key == implicit.key and explicit.cached


def test_concurrent_identical_requests_generate_once(priorgen_server: RunningPriorGen) -> None:
    callers = 4
    results: list[priorgen_pb2.PriorSet] = []
    errors: list[BaseException] = []
    first_progress = threading.Event()

    def call(signal_progress: bool) -> None:
        try:
            stream = priorgen_server.stub.GeneratePriors(priors_request(num_images=6, steps=8), timeout=300)
            responses = []
            for response in stream:
                responses.append(response)
                if signal_progress:
                    first_progress.set()
            results.append(prior_set(responses))
        except BaseException as err:
            errors.append(err)
            first_progress.set()

    leader = threading.Thread(target=call, args=(True,))
    leader.start()
    assert first_progress.wait(60), "the first request never reported progress"
    others = [threading.Thread(target=call, args=(False,)) for _ in range(callers - 1)]
    for thread in others:
        thread.start()
    for thread in [leader, *others]:
        thread.join(300)
    assert not errors, errors
    assert len(results) == callers
    assert len({r.key for r in results}) == 1 and all(r.count == 6 for r in results)
    # One generation: 6 images made in all, credited to one caller; the others joined it (or, had
    # they come after it finished, were answered from the cache).
    assert priorgen_server.metric("dreambooth_priorgen_images_generated_total") == 6
    assert sorted(r.generated for r in results) == [0] * (callers - 1) + [6]
    joined = priorgen_server.metric("dreambooth_priorgen_single_flight_joins_total")
    hits = priorgen_server.metric("dreambooth_priorgen_cache_hits_total")
    assert joined + hits == callers - 1
    assert sum(r.cached for r in results) == hits


def test_the_batch_size_does_not_change_the_images(start_priorgen: Any, s3_store: ObjectStore) -> None:
    one = start_priorgen(batch_size=1, compute_width=3)
    by_one = prior_set(one.generate(num_images=5, steps=6))
    images_by_one = set_bytes(s3_store, by_one)
    one.stop()
    assert s3_store.delete_prefix(by_one.prefix) == 6

    three = start_priorgen(batch_size=3, compute_width=3)
    by_three = prior_set(three.generate(num_images=5, steps=6))
    assert (by_three.key, by_three.cached, by_three.generated) == (by_one.key, False, 5)
    assert set_bytes(s3_store, by_three) == images_by_one


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"class_prompt": ""}, "class_prompt"),
        ({"num_images": 0}, "num_images"),
        ({"num_images": 1001}, "num_images"),
        ({"resolution": 65}, "resolution"),
        ({"resolution": 4096}, "resolution"),
        ({"steps": 151}, "steps"),
        ({"guidance_scale": 31.0}, "guidance_scale"),
        ({"scheduler": 99}, "scheduler"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**32}, "seed"),  # uint32 seeds in every service
        ({"base_model": "tiny-sd"}, "base_model"),
    ],
)
def test_bad_input_is_invalid_argument_naming_the_field(
    priorgen_server: RunningPriorGen, fields: dict[str, Any], field: str
) -> None:
    with pytest.raises(grpc.RpcError) as info:
        priorgen_server.generate(**fields)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in info.value.details()
    assert priorgen_server.core._pipelines.loaded() == 0  # refused before any model load


def test_unknown_base_model_is_not_found(priorgen_server: RunningPriorGen) -> None:
    with pytest.raises(grpc.RpcError) as info:
        priorgen_server.generate(base_model="models/no-such-model")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert "no-such-model" in info.value.details()
    assert priorgen_server.core._pipelines.loaded() == 0


def test_health_reports_serving(priorgen_server: RunningPriorGen) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    health = health_pb2_grpc.HealthStub(priorgen_server.channel)
    for service in ("", "dreambooth.v1.PriorGenService"):
        response = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_metrics_are_exported(priorgen_server: RunningPriorGen) -> None:
    import urllib.request

    prior_set(priorgen_server.generate(num_images=2))
    prior_set(priorgen_server.generate(num_images=2))
    url = f"http://127.0.0.1:{priorgen_server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    samples = {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in text.splitlines()
        if line.startswith("dreambooth_priorgen_")
    }
    assert samples["dreambooth_priorgen_images_generated_total"] == 2
    assert samples["dreambooth_priorgen_cache_hits_total"] == 1
    assert samples["dreambooth_priorgen_sets_generated_total"] == 1
    assert samples["dreambooth_priorgen_set_generation_duration_seconds_count"] == 1
    assert samples["dreambooth_priorgen_batch_duration_seconds_count"] == 1
    assert samples["dreambooth_priorgen_sets_in_progress"] == 0
    assert any(name.startswith("dreambooth_priorgen_requests_total{") for name in samples)


def test_a_cancelled_call_stops_the_set_nobody_else_waits_for(priorgen_server: RunningPriorGen) -> None:
    """The trainer cancels its GeneratePriors call when a job is cancelled during priors; the set
    it was waiting for then stops instead of rendering to the end (create-and-cancel used to
    multiply priorgen's load)."""
    call = priorgen_server.stub.GeneratePriors(priors_request(num_images=40, steps=20), timeout=300)
    for response in call:
        if response.HasField("progress") and response.progress.images_done >= 2:
            break
    call.cancel()
    flights = priorgen_server.core._flights
    deadline = time.monotonic() + 60
    while flights.in_flight() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert flights.in_flight() == 0, "the set goes on rendering for nobody"
    assert priorgen_server.metric("dreambooth_priorgen_images_generated_total") < 40
