"""The domain error -> status code table, metric naming and the JSON log line (no server)."""

from __future__ import annotations

import io
import json
import logging

import grpc
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from services.common import errors
from services.common.interceptors import STATUS_BY_ERROR, short_method_name, status_for
from services.common.logging_setup import configure_logging
from services.common.metrics import MetricFactory, RequestMetrics, metric_namespace


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (errors.InvalidArgument("prompt", "empty"), grpc.StatusCode.INVALID_ARGUMENT),
        (errors.NotFound("model"), grpc.StatusCode.NOT_FOUND),
        (errors.AlreadyExists("x"), grpc.StatusCode.ALREADY_EXISTS),
        (errors.FailedPrecondition("x"), grpc.StatusCode.FAILED_PRECONDITION),
        (errors.ResourceExhausted("x"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (errors.Unavailable("x"), grpc.StatusCode.UNAVAILABLE),
        (errors.Unauthenticated("x"), grpc.StatusCode.UNAUTHENTICATED),
        (errors.PermissionDenied("x"), grpc.StatusCode.PERMISSION_DENIED),
        (errors.DataCorruption("x"), grpc.StatusCode.DATA_LOSS),
        (errors.DomainError("unclassified"), grpc.StatusCode.INTERNAL),
    ],
)
def test_status_for_each_domain_error(error: errors.DomainError, code: grpc.StatusCode) -> None:
    assert status_for(error) is code


def test_every_domain_error_in_errors_py_is_mapped() -> None:
    subclasses = {
        obj
        for obj in vars(errors).values()
        if isinstance(obj, type) and issubclass(obj, errors.DomainError) and obj is not errors.DomainError
    }
    assert subclasses == set(STATUS_BY_ERROR)


def test_a_subclass_maps_like_its_parent() -> None:
    class ModelNotFound(errors.NotFound):
        pass

    assert status_for(ModelNotFound("model")) is grpc.StatusCode.NOT_FOUND


def test_messages_clients_see() -> None:
    assert str(errors.InvalidArgument("steps", "must be 1..150")) == "steps: must be 1..150"
    assert str(errors.NotFound("models/x")) == "models/x not found"


def test_short_method_name() -> None:
    assert short_method_name("/dreambooth.v1.InferenceService/Generate") == "Generate"
    assert short_method_name("Generate") == "Generate"


def test_metric_namespace() -> None:
    assert metric_namespace("inference") == "dreambooth_inference"
    assert metric_namespace("Prior-Gen") == "dreambooth_prior_gen"
    with pytest.raises(ValueError):
        metric_namespace("--")


def test_request_metrics_live_in_their_own_registry() -> None:
    first, second = CollectorRegistry(), CollectorRegistry()
    for registry in (first, second):  # no "Duplicated timeseries" across registries
        metrics = RequestMetrics.create(registry, "dreambooth_inference")
    metrics.record("Generate", "OK", 0.5)
    assert (
        second.get_sample_value("dreambooth_inference_requests_total", {"method": "Generate", "code": "OK"})
        == 1
    )
    assert (
        first.get_sample_value("dreambooth_inference_requests_total", {"method": "Generate", "code": "OK"})
        is None
    )
    assert (
        second.get_sample_value("dreambooth_inference_request_duration_seconds_sum", {"method": "Generate"})
        == 0.5
    )


def test_metric_factory_prefixes_names() -> None:
    registry = CollectorRegistry()
    factory = MetricFactory(registry, "dreambooth_inference")
    factory.gauge("queue_depth", "Requests waiting.").set(3)
    factory.counter("model_cache_hits", "Cache hits.").inc()
    factory.histogram("batch_size", "Batch size.", buckets=(1, 2, 4, 8)).observe(2)
    text = generate_latest(registry).decode()
    assert "dreambooth_inference_queue_depth 3.0" in text
    assert "dreambooth_inference_model_cache_hits_total 1.0" in text
    assert 'dreambooth_inference_batch_size_bucket{le="2.0"} 1.0' in text


def test_log_lines_are_json_with_extra_fields() -> None:
    stream = io.StringIO()
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    try:
        configure_logging("debug", stream=stream)
        configure_logging("INFO", stream=stream)  # idempotent: still one handler
        log = logging.getLogger("test.component")
        log.info("job started", extra={"job_id": "j1"})
        log.debug("hidden")
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            log.exception("job failed\nwith two lines", extra={"job_id": "j1"})
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)

    lines = stream.getvalue().splitlines()
    assert len(lines) == 2  # one line per event, tracebacks included
    started, failed = (json.loads(line) for line in lines)
    assert started["msg"] == "job started" and started["job_id"] == "j1"
    assert started["level"] == "INFO" and started["logger"] == "test.component" and started["ts"]
    assert failed["level"] == "ERROR" and "RuntimeError: boom" in failed["exc"]
