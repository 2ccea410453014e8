"""The inference service over gRPC on loopback, with the tiny model in the S3-backed store."""

from __future__ import annotations

import io
import shutil
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
from dreambooth.v1 import common_pb2, inference_pb2
from grpc_health.v1 import health_pb2
from PIL import Image

from services.common.model_store import ModelStore
from tests.fixtures.inference_server import RunningInference, final_images

DEADLINE_S = 120.0
STEP_COUNT = "dreambooth_inference_denoising_step_duration_seconds_count"
LOADS = "dreambooth_inference_model_loads_total"


def wait_for(condition: Callable[[], bool], what: str, timeout: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def events(responses: list[inference_pb2.GenerateResponse]) -> list[tuple[str, int, int]]:
    """(kind, step, index) of each response."""
    out = []
    for response in responses:
        kind = response.WhichOneof("event")
        if kind == "progress":
            out.append((kind, response.progress.step, -1))
        elif kind == "preview":
            out.append((kind, response.preview.step, response.preview.index))
        else:
            out.append((kind, -1, response.image.index))
    return out


def image_bytes(responses: list[inference_pb2.GenerateResponse]) -> list[bytes]:
    return [image.image.data for image in final_images(responses)]


def test_generate_streams_progress_previews_then_images(inference_server: RunningInference) -> None:
    responses = inference_server.generate(num_images=2, steps=4, preview_interval=2, seed=42)
    assert events(responses) == [
        ("progress", 1, -1),
        ("progress", 2, -1),
        ("preview", 2, 0),
        ("preview", 2, 1),
        ("progress", 3, -1),
        ("progress", 4, -1),
        ("image", -1, 0),
        ("image", -1, 1),
    ]
    assert {r.progress.total_steps for r in responses if r.WhichOneof("event") == "progress"} == {4}
    images = final_images(responses)
    assert [image.seed for image in images] == [42, 43]
    for image in images:
        decoded = Image.open(io.BytesIO(image.image.data))
        assert decoded.format == "PNG" and decoded.size == (64, 64)
        assert (image.image.format, image.image.width, image.image.height) == (
            common_pb2.IMAGE_FORMAT_PNG,
            64,
            64,
        )
    preview = next(r.preview for r in responses if r.WhichOneof("event") == "preview")
    assert Image.open(io.BytesIO(preview.image.data)).format == "JPEG"


def test_same_request_and_seed_give_identical_bytes(inference_server: RunningInference) -> None:
    fields = {"seed": 7, "num_images": 2, "scheduler": common_pb2.SCHEDULER_EULER_ANCESTRAL}
    first, second = inference_server.generate(**fields), inference_server.generate(**fields)
    assert image_bytes(first) == image_bytes(second)
    assert image_bytes(first)[0] != image_bytes(first)[1]
    other = inference_server.generate(**{**fields, "seed": 8})
    assert image_bytes(other)[0] == image_bytes(first)[1]  # image 1 of seed 7 is image 0 of seed 8


def test_the_last_seed_takes_several_images_whose_seeds_wrap(inference_server: RunningInference) -> None:
    last = inference_server.generate(seed=2**32 - 1, num_images=3, steps=2)
    assert [image.seed for image in final_images(last)] == [2**32 - 1, 0, 1]
    assert image_bytes(inference_server.generate(seed=0, steps=2)) == image_bytes(last)[1:2]


def test_a_missing_seed_is_drawn_returned_and_reproduces_the_image(
    inference_server: RunningInference,
) -> None:
    [drawn] = final_images(inference_server.generate(output_format=common_pb2.IMAGE_FORMAT_WEBP))
    again = inference_server.generate(seed=drawn.seed, output_format=common_pb2.IMAGE_FORMAT_WEBP)
    assert image_bytes(again) == [drawn.image.data]
    assert Image.open(io.BytesIO(drawn.image.data)).format == "WEBP"


def test_concurrent_requests_share_a_batch_and_get_their_solo_bytes(
    start_inference: Callable[..., RunningInference],
) -> None:
    # A batching window far longer than the test: the batch runs because it is full (8 images).
    batching = start_inference(max_wait_ms=600_000, max_batch=8)
    solo = start_inference(max_wait_ms=0)
    requests = [
        {"prompt": "a photo of a dog", "seed": 1, "num_images": 1},
        {"prompt": "a red car", "seed": 20, "num_images": 3, "negative_prompt": "blurry"},
        {"prompt": "a castle", "seed": 300, "num_images": 4},
    ]
    batches_before = batching.metric("dreambooth_inference_batch_size_images_count")
    with ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(lambda fields: batching.generate(**fields), requests))
    assert batching.metric("dreambooth_inference_batch_size_images_count") - batches_before == 1
    assert batching.metric("dreambooth_inference_batch_size_images_bucket", {"le": "8.0"}) >= 1
    alone = [solo.generate(**fields) for fields in requests]
    for fields, batched, single in zip(requests, together, alone, strict=True):
        assert image_bytes(batched) == image_bytes(single), fields


def test_a_cancelled_stream_stops_sampling_and_the_server_carries_on(
    inference_server: RunningInference,
) -> None:
    steps_before = inference_server.metric(STEP_COUNT)
    call = inference_server.stub.Generate(inference_server.request(steps=150, seed=1), timeout=DEADLINE_S)
    first = next(call)
    assert first.progress.step == 1
    call.cancel()
    wait_for(
        lambda: inference_server.metric("dreambooth_inference_generate_cancelled_total") == 1, "cancel seen"
    )
    wait_for(lambda: inference_server.core.batcher.running() == 0, "the batch to stop")
    stopped_at = inference_server.metric(STEP_COUNT)
    assert stopped_at - steps_before < 150
    assert len(final_images(inference_server.generate(steps=2))) == 1  # the server still serves
    assert inference_server.metric(STEP_COUNT) - stopped_at == 2
    core = inference_server.core
    assert (core.queue_depth, core.batcher.waiting(), core.batcher.running()) == (0, 0, 0)  # nothing held


def test_a_passed_deadline_stops_sampling(inference_server: RunningInference) -> None:
    steps_before = inference_server.metric(STEP_COUNT)
    slow = inference_server.request(steps=150, width=256, height=256)
    with pytest.raises(grpc.RpcError) as caught:
        list(inference_server.stub.Generate(slow, timeout=1.0))
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_for(
        lambda: inference_server.metric("dreambooth_inference_generate_cancelled_total") == 1, "cancel seen"
    )
    wait_for(lambda: inference_server.core.batcher.running() == 0, "the batch to stop")
    assert inference_server.metric(STEP_COUNT) - steps_before < 150


def test_past_the_queue_bound_requests_are_refused_at_once(
    start_inference: Callable[..., RunningInference],
) -> None:
    server = start_inference(max_queue=1, max_wait_ms=0, workers=1)
    slow = server.request(steps=150, width=256, height=256, seed=1)
    running = server.stub.Generate(slow, timeout=DEADLINE_S)
    assert next(running).progress.step == 1  # sampling: no longer waiting
    waiting = server.stub.Generate(slow, timeout=DEADLINE_S)
    consumer = threading.Thread(target=lambda: list(_quietly(waiting)), daemon=True)
    consumer.start()
    wait_for(lambda: server.core.queue_depth == 1, "the second request to wait")
    with pytest.raises(grpc.RpcError) as caught:
        server.generate(steps=2)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert (
        server.metric(
            "dreambooth_inference_requests_total", {"method": "Generate", "code": "RESOURCE_EXHAUSTED"}
        )
        == 1
    )
    running.cancel()
    waiting.cancel()
    consumer.join(DEADLINE_S)
    wait_for(
        lambda: server.core.queue_depth == 0 and server.core.batcher.running() == 0, "the queue to drain"
    )
    assert len(final_images(server.generate(steps=2))) == 1


def test_the_queue_is_bounded_by_the_cost_it_holds(start_inference: Callable[..., RunningInference]) -> None:
    """Two cheap requests may wait where one expensive one may not: the bound is the work."""
    server = start_inference(max_queue=64, max_queued_cost=25.0, max_wait_ms=0, workers=1)
    slow = server.request(steps=150, width=256, height=256, seed=1)  # 19.7 megapixel-steps
    running = server.stub.Generate(slow, timeout=DEADLINE_S)
    assert next(running).progress.step == 1  # sampling: no longer in the queue
    waiting = server.stub.Generate(slow, timeout=DEADLINE_S)
    consumer = threading.Thread(target=lambda: list(_quietly(waiting)), daemon=True)
    consumer.start()
    wait_for(lambda: server.core.queue_depth == 1, "the second request to wait")
    with pytest.raises(grpc.RpcError) as caught:
        server.generate(steps=150, width=256, height=256)  # 19.7 more: over 25
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "megapixel-steps" in (caught.value.details() or "")
    running.cancel()
    waiting.cancel()
    consumer.join(DEADLINE_S)
    wait_for(lambda: server.core.queue_depth == 0, "the queue to drain")


def _quietly(call: Any) -> list[Any]:
    try:
        return list(call)
    except grpc.RpcError:
        return []


BAD_INPUTS: list[tuple[dict[str, Any], grpc.StatusCode, str]] = [
    ({"num_images": 9}, grpc.StatusCode.INVALID_ARGUMENT, "num_images"),
    ({"num_images": -1}, grpc.StatusCode.INVALID_ARGUMENT, "num_images"),
    ({"width": 100}, grpc.StatusCode.INVALID_ARGUMENT, "width"),
    ({"width": 4096}, grpc.StatusCode.INVALID_ARGUMENT, "width"),
    ({"height": 32}, grpc.StatusCode.INVALID_ARGUMENT, "height"),
    ({"steps": 151}, grpc.StatusCode.INVALID_ARGUMENT, "steps"),
    ({"steps": -1}, grpc.StatusCode.INVALID_ARGUMENT, "steps"),
    ({"guidance_scale": 0.5}, grpc.StatusCode.INVALID_ARGUMENT, "guidance_scale"),
    ({"guidance_scale": 31.0}, grpc.StatusCode.INVALID_ARGUMENT, "guidance_scale"),
    ({"guidance_scale": float("nan")}, grpc.StatusCode.INVALID_ARGUMENT, "guidance_scale"),
    ({"scheduler": 99}, grpc.StatusCode.INVALID_ARGUMENT, "scheduler"),
    ({"output_format": 42}, grpc.StatusCode.INVALID_ARGUMENT, "output_format"),
    ({"preview_interval": -2}, grpc.StatusCode.INVALID_ARGUMENT, "preview_interval"),
    ({"seed": -5}, grpc.StatusCode.INVALID_ARGUMENT, "seed"),
    ({"seed": 2**32}, grpc.StatusCode.INVALID_ARGUMENT, "seed"),  # uint32 seeds in every service
    ({"prompt": ""}, grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
    ({"prompt": "   "}, grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
    ({"prompt": " ".join(["dog"] * 100)}, grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
    ({"negative_prompt": " ".join(["cat"] * 100)}, grpc.StatusCode.INVALID_ARGUMENT, "negative_prompt"),
    # One request may not hold the worker for hours: 8 x 150 steps x 1024^2 with guidance.
    (
        {"num_images": 8, "steps": 150, "width": 1024, "height": 1024},
        grpc.StatusCode.INVALID_ARGUMENT,
        "megapixel-steps; the limit per request is 210",
    ),
    ({"model": "tiny-sd"}, grpc.StatusCode.INVALID_ARGUMENT, "model"),
    ({"model": ""}, grpc.StatusCode.INVALID_ARGUMENT, "model"),
    ({"model": "models/Not Valid"}, grpc.StatusCode.INVALID_ARGUMENT, "model"),
    ({"model": "models/no-such-model"}, grpc.StatusCode.NOT_FOUND, "no-such-model"),
    # Checks that need the model's spec, on a model that is in the store but not loaded:
    (
        {"model": "models/unloaded", "prompt": " ".join(["dog"] * 100)},
        grpc.StatusCode.INVALID_ARGUMENT,
        "prompt",
    ),
    (
        {"model": "models/unloaded", "negative_prompt": " ".join(["cat"] * 100)},
        grpc.StatusCode.INVALID_ARGUMENT,
        "negative_prompt",
    ),
]


def test_bad_inputs_are_refused_naming_the_field_without_loading_a_model(
    inference_server: RunningInference, model_store: ModelStore, tiny_model_dir: Path
) -> None:
    model_store.import_folder(tiny_model_dir, "unloaded")
    loads_before = inference_server.metric(LOADS)
    failures = []
    for fields, code, named in BAD_INPUTS:
        try:
            inference_server.generate(**fields)
        except grpc.RpcError as err:
            if err.code() != code or named not in (err.details() or ""):
                failures.append(
                    f"{fields}: got {err.code()} {err.details()!r}, wanted {code} naming {named!r}"
                )
        else:
            failures.append(f"{fields}: accepted")
    assert not failures, "\n".join(failures)
    assert inference_server.metric(LOADS) == loads_before
    assert "unloaded" not in inference_server.core.cache.loaded_model_ids()
    details = _details(lambda: inference_server.generate(steps=151))
    assert details.startswith("steps: ")


def _details(call: Callable[[], Any]) -> str:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value.details() or ""


def test_truncate_prompt_accepts_a_long_prompt(inference_server: RunningInference) -> None:
    long_prompt = " ".join(["dog"] * 100)
    responses = inference_server.generate(prompt=long_prompt, truncate_prompt=True, steps=2, seed=3)
    # Cut at 77 tokens: the same image as the prompt cut by hand.
    cut = inference_server.generate(prompt=" ".join(["dog"] * 75), steps=2, seed=3)
    assert image_bytes(responses) == image_bytes(cut)


def test_concurrent_requests_for_an_unloaded_model_load_it_once(
    inference_server: RunningInference, model_store: ModelStore, tiny_model_dir: Path
) -> None:
    model_store.import_folder(tiny_model_dir, "fresh", kind="fine_tuned", base_model="tiny-sd")
    loads_before = inference_server.metric(LOADS)
    with ThreadPoolExecutor(4) as pool:
        results = list(
            pool.map(lambda seed: inference_server.generate(model="models/fresh", seed=seed), range(4))
        )
    assert all(len(final_images(r)) == 1 for r in results)
    assert inference_server.metric(LOADS) - loads_before == 1
    base_seed_0 = inference_server.generate(seed=0)
    assert image_bytes(results[0]) == image_bytes(base_seed_0)  # same weights, same image


def test_list_and_get_models(
    inference_server: RunningInference, model_store: ModelStore, tiny_model_dir: Path
) -> None:
    model_store.import_folder(
        tiny_model_dir,
        "tuned",
        kind="fine_tuned",
        base_model="tiny-sd",
        training_job="job-1",
        labels={"a": "b"},
    )
    stub = inference_server.stub
    first = stub.ListModels(inference_pb2.ListModelsRequest(page_size=1), timeout=30)
    assert [m.name for m in first.models] == ["models/tiny-sd"] and first.next_page_token
    second = stub.ListModels(
        inference_pb2.ListModelsRequest(page_size=1, page_token=first.next_page_token), timeout=30
    )
    assert [m.name for m in second.models] == ["models/tuned"] and not second.next_page_token
    everything = stub.ListModels(inference_pb2.ListModelsRequest(), timeout=30)
    assert [m.name for m in everything.models] == ["models/tiny-sd", "models/tuned"]

    model = stub.GetModel(inference_pb2.GetModelRequest(name="models/tuned"), timeout=30).model
    manifest = model_store.get("tuned")
    assert model.kind == common_pb2.MODEL_KIND_FINE_TUNED
    assert (model.base_model, model.training_job) == ("models/tiny-sd", "trainingJobs/job-1")
    assert (model.size_bytes, model.file_count) == (manifest.size_bytes, len(manifest.files))
    assert model.manifest_digest == manifest.digest and dict(model.labels) == {"a": "b"}
    assert model.create_time.seconds > 0

    for call, code, named in [
        (
            lambda: stub.GetModel(inference_pb2.GetModelRequest(name="models/nope"), timeout=30),
            "NOT_FOUND",
            "nope",
        ),
        (
            lambda: stub.GetModel(inference_pb2.GetModelRequest(name="tuned"), timeout=30),
            "INVALID_ARGUMENT",
            "name",
        ),
        (
            lambda: stub.ListModels(inference_pb2.ListModelsRequest(page_token="garbage!"), timeout=30),
            "INVALID_ARGUMENT",
            "page_token",
        ),
        (
            lambda: stub.ListModels(inference_pb2.ListModelsRequest(page_size=-1), timeout=30),
            "INVALID_ARGUMENT",
            "page_size",
        ),
    ]:
        with pytest.raises(grpc.RpcError) as caught:
            call()
        assert caught.value.code().name == code and named in (caught.value.details() or "")


def test_not_serving_until_the_default_model_is_loaded_and_warm(
    start_inference: Callable[..., RunningInference], model_store: ModelStore, tiny_model_dir: Path
) -> None:
    server = start_inference(wait_ready=False, default_model="arrives-later")
    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
    assert server.serving_status() == not_serving
    assert server.serving_status("dreambooth.v1.InferenceService") == not_serving
    model_store.import_folder(tiny_model_dir, "arrives-later")
    server.wait_ready()
    assert server.serving_status("dreambooth.v1.InferenceService") == health_pb2.HealthCheckResponse.SERVING
    assert "arrives-later" in server.core.cache.loaded_model_ids()


def test_metrics_are_exported_and_promtool_clean(inference_server: RunningInference) -> None:
    inference_server.generate(steps=2, preview_interval=1)
    with urllib.request.urlopen(
        f"http://127.0.0.1:{inference_server.metrics_port}/metrics", timeout=30
    ) as reply:
        scrape = reply.read().decode()
    for name in [
        'dreambooth_inference_requests_total{code="OK",method="Generate"}',
        'dreambooth_inference_request_duration_seconds_bucket{le="0.005",method="Generate"}',
        'dreambooth_inference_in_flight_requests{method="Generate"}',
        "dreambooth_inference_time_to_first_image_seconds_bucket",
        "dreambooth_inference_queue_depth",
        "dreambooth_inference_batch_size_images_bucket",
        "dreambooth_inference_denoising_step_duration_seconds_bucket",
        "dreambooth_inference_images_generated_total",
        "dreambooth_inference_model_cache_hits_total",
        "dreambooth_inference_model_cache_misses_total",
        "dreambooth_inference_model_loads_total",
        "dreambooth_inference_model_cache_evictions_total",
        "dreambooth_inference_model_load_duration_seconds_bucket",
    ]:
        assert name in scrape, name
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed")
    result = subprocess.run(
        [promtool, "check", "metrics"], input=scrape, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def _rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def test_four_times_the_queue_capacity_is_refused_at_once_and_the_server_stays_healthy(
    start_inference: Callable[..., RunningInference],
) -> None:
    """16 concurrent requests on a queue of 4 (one worker): those past the bound get an instant
    RESOURCE_EXHAUSTED, every admitted one finishes, health stays SERVING, memory stays bounded."""
    server = start_inference(max_queue=4, workers=1, max_wait_ms=0, max_batch=1)
    rss_before = _rss_mb()
    request = server.request(steps=30, seed=5)

    def one() -> tuple[str, float]:
        started = time.monotonic()
        try:
            list(server.stub.Generate(request, timeout=DEADLINE_S))
            return "OK", time.monotonic() - started
        except grpc.RpcError as err:
            return err.code().name, time.monotonic() - started

    with ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(one) for _ in range(16)]
        serving_under_load = server.serving_status() == health_pb2.HealthCheckResponse.SERVING
        outcomes = [future.result() for future in futures]
    refused = [seconds for code, seconds in outcomes if code == "RESOURCE_EXHAUSTED"]
    done = [code for code, _ in outcomes if code == "OK"]
    assert refused and len(refused) + len(done) == 16, outcomes
    assert max(refused) < 2.0, refused  # refused at once, not after waiting
    assert serving_under_load and server.serving_status() == health_pb2.HealthCheckResponse.SERVING
    assert _rss_mb() - rss_before < 300
    assert len(final_images(server.generate(steps=2))) == 1
