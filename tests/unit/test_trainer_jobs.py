"""Job records: the state machine, persistence, idempotency by request id, and paging."""

from __future__ import annotations

import base64
import itertools
from pathlib import Path

import pytest

from services.common.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from services.common.local_store import LocalObjectStore
from services.trainer.job_spec import JobSpec
from services.trainer.jobs.records import (
    FINAL_STATES,
    TRANSITIONS,
    JobRepository,
    JobState,
    Progress,
    check_transition,
    job_key,
    parse_job_name,
    validate_request_id,
)

SPEC = JobSpec(
    base_model="tiny-sd", dataset="a" * 64, instance_prompt="a photo of sks dog", max_train_steps=10
)


class Clock:
    def __init__(self) -> None:
        self._ticks = itertools.count(1_700_000_000)

    def __call__(self) -> float:
        return float(next(self._ticks))


@pytest.fixture
def store(tmp_path: Path) -> LocalObjectStore:
    return LocalObjectStore(tmp_path / "store")


@pytest.fixture
def repo(store: LocalObjectStore) -> JobRepository:
    return JobRepository(store, clock=Clock())


def test_the_happy_path_and_every_final_state_is_final() -> None:
    path = [
        JobState.QUEUED,
        JobState.GENERATING_PRIORS,
        JobState.TRAINING,
        JobState.PUBLISHING,
        JobState.SUCCEEDED,
    ]
    for current, new in itertools.pairwise(path):
        check_transition(current, new)
    check_transition(JobState.QUEUED, JobState.TRAINING)  # no priors without prior preservation
    for final in FINAL_STATES:
        assert final.is_final and TRANSITIONS[final] == frozenset()
        for other in JobState:
            with pytest.raises(FailedPrecondition):
                check_transition(final, other)


@pytest.mark.parametrize(
    ("current", "new"),
    [
        (JobState.QUEUED, JobState.SUCCEEDED),
        (JobState.GENERATING_PRIORS, JobState.SUCCEEDED),
        (JobState.GENERATING_PRIORS, JobState.PUBLISHING),
        (JobState.PUBLISHING, JobState.TRAINING),
        (JobState.TRAINING, JobState.GENERATING_PRIORS),
    ],
)
def test_impossible_moves_are_refused(current: JobState, new: JobState) -> None:
    with pytest.raises(FailedPrecondition):
        check_transition(current, new)


def test_running_states_return_to_queued_for_recovery() -> None:
    for state in (JobState.GENERATING_PRIORS, JobState.TRAINING, JobState.PUBLISHING):
        check_transition(state, JobState.QUEUED)


def test_create_persists_a_queued_job_with_defaults(repo: JobRepository, store: LocalObjectStore) -> None:
    job, created = repo.create(SPEC, request_id="", request_fingerprint="f")
    assert created and job.state == JobState.QUEUED
    assert len(job.job_id) == 12 and job.name == f"trainingJobs/{job.job_id}"
    assert job.spec.model_id == f"job-{job.job_id}"
    assert job.progress == Progress(total_steps=10)
    assert store.get_json(job_key(job.job_id))["state"] == "QUEUED"
    assert parse_job_name(job.name) == job.job_id


def test_transitions_stamp_times_and_persist(repo: JobRepository, store: LocalObjectStore) -> None:
    job, _ = repo.create(SPEC, request_id="", request_fingerprint="f")
    training = repo.transition(job.job_id, JobState.TRAINING)
    assert training.start_time is not None and training.end_time is None
    done = repo.transition(job.job_id, JobState.SUCCEEDED, model="models/x")
    assert done.end_time is not None and done.start_time == training.start_time
    with pytest.raises(FailedPrecondition):
        repo.transition(job.job_id, JobState.TRAINING)
    reloaded = JobRepository(store)
    reloaded.load()
    assert reloaded.get(job.job_id) == done


def test_progress_can_stay_in_memory_until_the_next_persisted_change(
    repo: JobRepository, store: LocalObjectStore
) -> None:
    job, _ = repo.create(SPEC, request_id="", request_fingerprint="f")
    repo.update(job.job_id, progress=Progress(step=3, total_steps=10), persist=False)
    assert repo.get(job.job_id).progress.step == 3
    assert store.get_json(job_key(job.job_id))["progress"]["step"] == 0
    repo.update(job.job_id, checkpoint_step=2)
    assert store.get_json(job_key(job.job_id))["progress"]["step"] == 3


def test_request_id_is_idempotent_even_after_a_restart(repo: JobRepository, store: LocalObjectStore) -> None:
    first, created = repo.create(SPEC, request_id="req-1", request_fingerprint="f1")
    again, created_again = repo.create(SPEC, request_id="req-1", request_fingerprint="f1")
    assert created and not created_again and again == first
    restarted = JobRepository(store)
    restarted.load()
    assert restarted.find_by_request("req-1", "f1") == first
    with pytest.raises(AlreadyExists) as info:
        restarted.create(SPEC, request_id="req-1", request_fingerprint="other")
    assert "req-1" in str(info.value) and first.name in str(info.value)
    other, created_other = restarted.create(SPEC, request_id="", request_fingerprint="f1")
    assert created_other and other.job_id != first.job_id


@pytest.mark.parametrize("request_id", ["x" * 257, " padded", "tab\there"])
def test_bad_request_ids(request_id: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        validate_request_id(request_id)
    assert info.value.field == "request_id"


@pytest.mark.parametrize("name", ["", "abc", "trainingJobs/", "trainingJobs/xyz", "jobs/0123456789ab"])
def test_bad_job_names(name: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        parse_job_name(name)
    assert info.value.field == "name"


def test_unknown_job_is_not_found(repo: JobRepository) -> None:
    with pytest.raises(NotFound):
        repo.get("0123456789ab")


def test_list_pages_newest_first_with_a_state_filter(repo: JobRepository) -> None:
    jobs = [repo.create(SPEC, request_id="", request_fingerprint="f")[0] for _ in range(7)]
    for job in jobs[::2]:
        repo.transition(job.job_id, JobState.CANCELLED)
    newest_first = [job.job_id for job in reversed(jobs)]

    seen, token = [], ""
    while True:
        page = repo.list(page_size=3, page_token=token)
        seen += [job.job_id for job in page.jobs]
        assert len(page.jobs) <= 3
        token = page.next_page_token
        if not token:
            break
    assert seen == newest_first

    cancelled = repo.list(page_size=2, state=JobState.CANCELLED)
    assert [j.job_id for j in cancelled.jobs] == newest_first[0:4:2][:2]
    rest = repo.list(page_size=2, state=JobState.CANCELLED, page_token=cancelled.next_page_token)
    assert [j.job_id for j in rest.jobs] == [jobs[2].job_id, jobs[0].job_id]
    assert rest.next_page_token == ""
    assert repo.list().jobs[0].job_id == newest_first[0]
    assert [j.job_id for j in repo.list(state=JobState.QUEUED).jobs] == [
        j.job_id for j in reversed(jobs[1::2])
    ]


def test_page_token_errors(repo: JobRepository) -> None:
    for _ in range(3):
        repo.create(SPEC, request_id="", request_fingerprint="f")
    token = repo.list(page_size=1).next_page_token
    nested = base64.urlsafe_b64encode(b"[" * 100_000 + b"]" * 100_000).decode()  # RecursionError once
    for bad in ("garbage!", "e30", token[:-3], nested[:500], nested):
        with pytest.raises(InvalidArgument) as info:
            repo.list(page_token=bad)
        assert info.value.field == "page_token"
    with pytest.raises(InvalidArgument) as other_filter:
        repo.list(page_token=token, state=JobState.QUEUED)
    assert other_filter.value.field == "page_token"
    with pytest.raises(InvalidArgument) as negative:
        repo.list(page_size=-1)
    assert negative.value.field == "page_size"


def test_on_change_sees_creations_and_state_changes(store: LocalObjectStore) -> None:
    seen: list[tuple[JobState | None, JobState]] = []
    repo = JobRepository(store, on_change=lambda old, job: seen.append((old, job.state)))
    job, _ = repo.create(SPEC, request_id="", request_fingerprint="f")
    repo.update(job.job_id, progress=Progress(step=1), persist=False)
    repo.transition(job.job_id, JobState.TRAINING)
    assert seen == [(None, JobState.QUEUED), (JobState.QUEUED, JobState.TRAINING)]


def test_an_unreadable_record_is_skipped_at_load(repo: JobRepository, store: LocalObjectStore) -> None:
    good, _ = repo.create(SPEC, request_id="", request_fingerprint="f")
    store.put_bytes(job_key("0123456789ab"), b"{not json")
    store.put_json(job_key("ba9876543210"), {"job_id": "ba9876543210"})
    reloaded = JobRepository(store)
    assert [job.job_id for job in reloaded.load()] == [good.job_id]
