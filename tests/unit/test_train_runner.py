"""The driver side of a training run, without Ray running: the channel, the event pump's
translation, and the messages a user reads when a run fails."""

from __future__ import annotations

import threading

import pytest
from ray.train import ControllerError, WorkerGroupError

from services.common.errors import NotFound
from services.trainer.driver.channel import JobChannel, Pump
from services.trainer.driver.failures import describe_failure
from services.trainer.training_events import (
    CheckpointEvent,
    PreviewEvent,
    ProgressEvent,
    PublishedEvent,
    PublishingEvent,
    StartedEvent,
)


def _progress(step: int) -> ProgressEvent:
    return ProgressEvent(
        step=step,
        total_steps=10,
        loss=0.5,
        learning_rate=1e-4,
        samples_per_second=3.0,
        time=1700000000.0 + step,
    )


def test_the_channel_hands_over_events_once_and_carries_the_cancel() -> None:
    channel = JobChannel()
    channel.push_many([_progress(1), CheckpointEvent(step=1, duration_seconds=0.1)])
    assert [type(event) for event in channel.take()] == [ProgressEvent, CheckpointEvent]
    assert channel.take() == []
    assert not channel.cancelled()
    channel.cancel()
    assert channel.cancelled()


def test_the_pump_forwards_events_and_hides_repeated_steps() -> None:
    events: list[object] = []
    pump = Pump(channel=None, on_event=events.append, cancel=threading.Event())
    pump._deliver(
        [
            StartedEvent(step=0, world_size=2),
            _progress(1),
            _progress(2),
            CheckpointEvent(step=2, duration_seconds=0.2),
            _progress(3),
            StartedEvent(step=2, world_size=2),  # Ray restarted the workers from step 2
            _progress(3),
            _progress(4),
            PreviewEvent(step=4, prompt="a sks dog", jpeg=b"\xff\xd8"),
            PublishingEvent(step=4),
            PublishedEvent(step=4, model_id="m"),
        ]
    )
    assert [type(event) for event in events] == [
        ProgressEvent,
        ProgressEvent,
        CheckpointEvent,
        ProgressEvent,
        ProgressEvent,
        PreviewEvent,
        PublishingEvent,
    ]
    assert [event.step for event in events if isinstance(event, ProgressEvent)] == [1, 2, 3, 4]
    assert pump.starts == [0, 2]
    assert pump.published_step == 4


def test_a_failing_listener_does_not_stop_the_pump() -> None:
    delivered: list[object] = []

    def listener(event: object) -> None:
        delivered.append(event)
        raise ValueError("listener bug")

    pump = Pump(channel=None, on_event=listener, cancel=threading.Event())
    pump._deliver([_progress(1), _progress(2)])
    assert len(delivered) == 2


def test_a_worker_error_is_described_by_its_own_exception() -> None:
    err = WorkerGroupError("snippet", {1: RuntimeError("something broke\nat step 3")})
    assert describe_failure(err) == "training failed on worker 1: RuntimeError: at step 3"


def test_a_domain_error_from_a_worker_keeps_its_message() -> None:
    err = WorkerGroupError("snippet", {0: NotFound("dataset", "dataset 'datasets/x' not found")})
    assert describe_failure(err) == "dataset 'datasets/x' not found"


def test_running_out_of_gpu_memory_says_what_to_change() -> None:
    err = WorkerGroupError("snippet", {0: RuntimeError("CUDA out of memory. Tried to allocate 2 GiB")})
    message = describe_failure(err)
    assert "out of memory" in message
    for knob in ("train_batch_size", "resolution", "gradient_checkpointing", "use_lora"):
        assert knob in message


def test_a_controller_error_is_described() -> None:
    assert "controller" in describe_failure(ControllerError(RuntimeError("placement failed")))


@pytest.mark.parametrize("error", [ValueError("plain"), KeyError("key")])
def test_any_other_error_is_described(error: Exception) -> None:
    assert describe_failure(error).startswith(f"training failed: {type(error).__name__}")
