"""Training jobs end to end over gRPC: local Ray (2 CPU workers), the tiny model, the S3 store,
the real prior-generation server. Watch, cancel, idempotency and listing."""

from __future__ import annotations

import grpc
import pytest
from dreambooth.v1 import trainer_pb2

from services.common.model_store import ModelStore
from tests.fixtures.trainer_server import RunningTrainer, make_png, tiny_spec

S = trainer_pb2  # states and messages
FINAL = (S.TRAINING_JOB_STATE_SUCCEEDED, S.TRAINING_JOB_STATE_FAILED, S.TRAINING_JOB_STATE_CANCELLED)


def states_of(events: list[trainer_pb2.WatchTrainingJobResponse]) -> list[int]:
    return [event.state_change.state for event in events if event.WhichOneof("event") == "state_change"]


@pytest.mark.slow
def test_a_job_with_priors_runs_to_succeeded_and_can_be_watched(
    trainer_server: RunningTrainer, model_store: ModelStore
) -> None:
    trainer = trainer_server
    dataset = trainer.upload([make_png(seed) for seed in range(3)]).name
    spec = tiny_spec(
        dataset,
        with_prior_preservation=True,
        class_prompt="a photo of dog",
        num_class_images=2,
        prior_steps=4,
        validation_prompts=["a photo of sks dog"],
        validation_steps=3,
    )
    job = trainer.create(spec, request_id="lifecycle-1")
    assert job.state == S.TRAINING_JOB_STATE_QUEUED
    assert job.name.startswith("trainingJobs/") and job.spec.model_id == f"job-{job.name.split('/')[1]}"

    events = trainer.watch(job.name)  # ends when the job is final

    assert states_of(events) == [
        S.TRAINING_JOB_STATE_QUEUED,
        S.TRAINING_JOB_STATE_GENERATING_PRIORS,
        S.TRAINING_JOB_STATE_TRAINING,
        S.TRAINING_JOB_STATE_PUBLISHING,
        S.TRAINING_JOB_STATE_SUCCEEDED,
    ], events[-1].state_change.error_message
    sequences = [event.sequence for event in events]
    assert sequences == sorted(set(sequences)) and sequences[0] == 1
    kinds = [event.WhichOneof("event") for event in events]
    priors = [e.prior_progress for e in events if e.WhichOneof("event") == "prior_progress"]
    assert priors and priors[-1].images_done == priors[-1].images_total == 2
    steps = [e.progress.step for e in events if e.WhichOneof("event") == "progress"]
    assert steps == sorted(steps) and steps[-1] == 6
    progress = [e.progress for e in events if e.WhichOneof("event") == "progress"][-1]
    assert progress.total_steps == 6 and progress.loss > 0 and progress.learning_rate > 0
    assert "preview" in kinds
    preview = next(e.preview for e in events if e.WhichOneof("event") == "preview")
    assert preview.prompt == "a photo of sks dog" and preview.image.data[:2] == b"\xff\xd8"

    done = events[-1].state_change
    assert done.model == f"models/{done.spec.model_id}"
    assert done.progress.step == 6 and done.end_time.seconds >= done.start_time.seconds > 0
    assert trainer.get(job.name) == done
    manifest = model_store.get(done.spec.model_id)
    assert manifest.base_model == "tiny-sd" and manifest.training_job in (job.name, job.name.split("/")[1])

    # Resume from the last event seen: only what came after it, and nothing after the end.
    middle = events[len(events) // 2].sequence
    assert [e.sequence for e in trainer.watch(job.name, after_sequence=middle)] == [
        s for s in sequences if s > middle
    ]
    assert trainer.watch(job.name, after_sequence=sequences[-1]) == []
    # The same request again is the same job, even finished.
    assert trainer.create(spec, request_id="lifecycle-1") == done


def test_jobs_share_the_slots_succeed_cancel_and_list(start_trainer, ray_local: None) -> None:
    """Two slots: a short job succeeds while a long one trains; a third waits QUEUED."""
    trainer: RunningTrainer = start_trainer(max_concurrent_jobs=2)
    dataset = trainer.upload([make_png(0), make_png(1)]).name
    short_spec = tiny_spec(dataset, num_workers=1, max_train_steps=4, checkpointing_steps=2)
    long_spec = tiny_spec(dataset, num_workers=1, max_train_steps=5000, checkpointing_steps=1000)

    short = trainer.create(short_spec, request_id="req-a")
    assert trainer.create(short_spec, request_id="req-a").name == short.name  # a retry: the same job
    with pytest.raises(grpc.RpcError) as reused:
        trainer.create(long_spec, "req-a")
    assert reused.value.code() == grpc.StatusCode.ALREADY_EXISTS and "req-a" in reused.value.details()
    long = trainer.create(long_spec)
    waiting = trainer.create(long_spec)
    assert trainer.get(waiting.name).state == S.TRAINING_JOB_STATE_QUEUED  # both slots are taken

    # Cancelling a queued job is immediate.
    cancelled = trainer.cancel(waiting.name)
    assert cancelled.state == S.TRAINING_JOB_STATE_CANCELLED and cancelled.end_time.seconds > 0

    # The short job runs to the end and publishes its model.
    events = trainer.watch(short.name)
    assert states_of(events) == [
        S.TRAINING_JOB_STATE_QUEUED,
        S.TRAINING_JOB_STATE_TRAINING,
        S.TRAINING_JOB_STATE_PUBLISHING,
        S.TRAINING_JOB_STATE_SUCCEEDED,
    ], events[-1].state_change.error_message
    done = events[-1].state_change
    assert done.model == f"models/job-{short.name.split('/')[1]}" and done.progress.step == 4
    assert done.checkpoint_step == 2

    # Listing: newest first, paged, filtered by state.
    page = trainer.stub.ListTrainingJobs(S.ListTrainingJobsRequest(page_size=2))
    assert [j.name for j in page.training_jobs] == [waiting.name, long.name] and page.next_page_token
    rest = trainer.stub.ListTrainingJobs(
        S.ListTrainingJobsRequest(page_size=2, page_token=page.next_page_token)
    )
    assert [j.name for j in rest.training_jobs] == [short.name] and not rest.next_page_token
    succeeded = trainer.stub.ListTrainingJobs(S.ListTrainingJobsRequest(state=S.TRAINING_JOB_STATE_SUCCEEDED))
    assert [j.name for j in succeeded.training_jobs] == [short.name]

    # Cancelling a training job stops the Ray run within seconds.
    trainer.wait_for(long.name, lambda job: job.progress.step >= 2, "Ray workers training", timeout=180)
    trainer.cancel(long.name)
    stopped = trainer.wait_for_state(long.name, *FINAL, timeout=60)
    assert stopped.state == S.TRAINING_JOB_STATE_CANCELLED, stopped.error_message
    assert stopped.progress.step < 5000 and stopped.model == ""
    assert states_of(trainer.watch(long.name))[-1] == S.TRAINING_JOB_STATE_CANCELLED
    # A finished job is returned unchanged.
    assert trainer.cancel(long.name) == trainer.get(long.name)


def test_priorgen_down_fails_the_job_with_an_actionable_message(start_trainer, ray_local: None) -> None:
    trainer: RunningTrainer = start_trainer()  # priorgen_address points at a closed port
    dataset = trainer.upload([make_png(0)]).name
    job = trainer.create(tiny_spec(dataset, with_prior_preservation=True, class_prompt="a photo of dog"))
    failed = trainer.wait_for_state(job.name, *FINAL, timeout=60)
    assert failed.state == S.TRAINING_JOB_STATE_FAILED
    assert "prior-generation service" in failed.error_message and "127.0.0.1:1" in failed.error_message
