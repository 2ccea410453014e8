"""Training job records: the state machine and their repository in the object store.

A job lives at `jobs/{id}/job.json` in its tenant's view of the store (`tenants/{name}/jobs/...`;
the root for the implicit tenant), written whole, atomically, on every change that matters.
The store is the source of truth; the repository keeps every record in memory as well (one
trainer process owns the jobs), so Get/List never wait on the store and a restarted trainer
rebuilds the memory, the request-id index included, from the records.

Reads made for a tenant see only its jobs: another tenant's job is NotFound with the message of
a missing one, and request ids are per tenant (reusing another tenant's id reveals nothing).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import enum
import hashlib
import json
import logging
import re
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from services.common.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from services.common.namespaced_store import scoped_store
from services.common.object_store import ObjectStore
from services.common.tenancy import namespace_of
from services.trainer.job_spec import JobSpec, derived_model_id

log = logging.getLogger(__name__)

PREFIX = "jobs/"
NAME_PREFIX = "trainingJobs/"
_JOB_ID = re.compile(r"^[0-9a-f]{12}$")
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
MAX_REQUEST_ID_CHARS = 256


class JobState(str, enum.Enum):
    QUEUED = "QUEUED"
    GENERATING_PRIORS = "GENERATING_PRIORS"
    TRAINING = "TRAINING"
    PUBLISHING = "PUBLISHING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def is_final(self) -> bool:
        return self in FINAL_STATES


FINAL_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})
_RUNNING = (JobState.GENERATING_PRIORS, JobState.TRAINING, JobState.PUBLISHING)

# Every move a job may make. Running states go back to QUEUED only when a restarted trainer
# recovers them (they wait for a slot again); final states never change.
TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({*_RUNNING, JobState.FAILED, JobState.CANCELLED}),
    JobState.GENERATING_PRIORS: frozenset(
        {JobState.TRAINING, JobState.QUEUED, *FINAL_STATES} - {JobState.SUCCEEDED}
    ),
    JobState.TRAINING: frozenset({JobState.PUBLISHING, JobState.QUEUED, *FINAL_STATES}),
    JobState.PUBLISHING: frozenset({JobState.QUEUED, *FINAL_STATES}),
    JobState.SUCCEEDED: frozenset(),
    JobState.FAILED: frozenset(),
    JobState.CANCELLED: frozenset(),
}


def check_transition(current: JobState, new: JobState) -> None:
    if new not in TRANSITIONS[current]:
        raise FailedPrecondition(f"a job cannot go from {current.value} to {new.value}")


@dataclass(frozen=True)
class Progress:
    step: int = 0
    total_steps: int = 0
    loss: float = 0.0
    learning_rate: float = 0.0
    eta_seconds: float = 0.0
    samples_per_second: float = 0.0


@dataclass(frozen=True)
class Job:
    job_id: str
    spec: JobSpec
    state: JobState = JobState.QUEUED
    request_id: str = ""
    request_fingerprint: str = ""  # sha256 of the request's spec, to tell a retry from a reuse
    create_time: float = 0.0  # seconds since the epoch
    start_time: float | None = None
    end_time: float | None = None
    update_time: float = 0.0
    progress: Progress = field(default_factory=Progress)
    model: str = ""  # models/{id} once SUCCEEDED
    error_message: str = ""
    checkpoint_step: int = 0
    prior_prefix: str = ""  # where the class images are, once generated
    additional_prior_prefixes: tuple[str, ...] = ()  # those of each additional concept, in order
    runs: int = 0  # times the job was started (more than one after restarts)
    tenant: str = ""  # the owner's name; "" = the implicit tenant (records from before tenants too)
    training_step_seconds: float = 0.0  # worker-seconds spent in training steps (usage)

    @property
    def name(self) -> str:
        return job_name(self.job_id)

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["spec"] = self.spec.to_json()
        data["state"] = self.state.value
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Job:
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["spec"] = JobSpec.from_json(data["spec"])
        values["state"] = JobState(data["state"])
        values["progress"] = Progress(**data.get("progress", {}))
        values["additional_prior_prefixes"] = tuple(data.get("additional_prior_prefixes", ()))
        return cls(**values)


def new_job_id() -> str:
    return uuid.uuid4().hex[:12]


def job_name(job_id: str) -> str:
    return f"{NAME_PREFIX}{job_id}"


def parse_job_name(name: str, field: str = "name") -> str:
    job_id = name.removeprefix(NAME_PREFIX)
    if not name:
        raise InvalidArgument(field, "is required (trainingJobs/{id})")
    if job_id == name or not _JOB_ID.match(job_id):
        raise InvalidArgument(field, f"must be trainingJobs/{{id}} with a 12-character id, got {name!r}")
    return job_id


def job_key(job_id: str) -> str:
    return f"{PREFIX}{job_id}/job.json"


def validate_request_id(request_id: str) -> str:
    if len(request_id) > MAX_REQUEST_ID_CHARS:
        raise InvalidArgument(
            "request_id", f"is {len(request_id)} characters; at most {MAX_REQUEST_ID_CHARS}"
        )
    if request_id != request_id.strip() or any(not ch.isprintable() for ch in request_id):
        raise InvalidArgument("request_id", "must be printable with no leading or trailing spaces")
    return request_id


def fingerprint(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


@dataclass(frozen=True)
class Page:
    jobs: list[Job]
    next_page_token: str


class JobRepository:
    """Every job record, in memory and in the store. Thread-safe; one writer process.

    `on_change(old_state, job)` runs after each saved change (metrics); old_state is None for
    a new job.
    """

    def __init__(
        self,
        store: ObjectStore,
        *,
        clock: Callable[[], float] = time.time,
        on_change: Callable[[JobState | None, Job], None] | None = None,
    ) -> None:
        self.store = store
        self._clock = clock
        self._on_change = on_change
        self._lock = threading.RLock()
        self._jobs: dict[str, Job] = {}
        self._by_request: dict[tuple[str, str], str] = {}  # (tenant, request_id) -> job id

    # Loading

    def load(self, tenants: tuple[str, ...] = ()) -> list[Job]:
        """Read the records of the implicit tenant and of `tenants` (at start-up); oldest first."""
        loaded: dict[str, Job] = {}
        for tenant in ("", *tenants):
            for info in self.store.list(namespace_of(tenant) + PREFIX):
                parts = info.key.removeprefix(namespace_of(tenant)).split("/")
                if len(parts) == 3 and parts[2] == "job.json" and _JOB_ID.match(parts[1]):
                    try:
                        job = Job.from_json(self.store.get_json(info.key))
                    except (ValueError, KeyError, TypeError) as err:  # one bad record must not stop the rest
                        log.error(
                            "skipping an unreadable job record", extra={"key": info.key, "error": str(err)}
                        )
                        continue
                    if job.tenant == tenant:  # a record copied into another tenant's prefix is not its
                        loaded[parts[1]] = job
        with self._lock:
            self._jobs = loaded
            self._by_request = {
                (job.tenant, job.request_id): job.job_id for job in loaded.values() if job.request_id
            }
        return sorted(loaded.values(), key=lambda job: (job.create_time, job.job_id))

    # Creating

    def create(
        self, spec: JobSpec, *, request_id: str, request_fingerprint: str, tenant: str = ""
    ) -> tuple[Job, bool]:
        """A new QUEUED job of `tenant`, or (job, False) when `request_id` already made one with
        this request. A request id the tenant reused with a different request is ALREADY_EXISTS.
        """
        with self._lock:
            existing = self.find_by_request(request_id, request_fingerprint, tenant)
            if existing is not None:
                return existing, False
            job_id = new_job_id()
            while job_id in self._jobs:
                job_id = new_job_id()
            now = self._clock()
            if not spec.model_id:
                spec = dataclasses.replace(spec, model_id=derived_model_id(job_id))
            job = Job(
                job_id=job_id,
                spec=spec,
                request_id=request_id,
                request_fingerprint=request_fingerprint,
                create_time=now,
                update_time=now,
                progress=Progress(total_steps=spec.max_train_steps),
                tenant=tenant,
            )
            self._write(job)
            self._jobs[job_id] = job
            if request_id:
                self._by_request[(tenant, request_id)] = job_id
        self._notify(None, job)
        return job, True

    def find_by_request(self, request_id: str, request_fingerprint: str, tenant: str = "") -> Job | None:
        if not request_id:
            return None
        with self._lock:
            job_id = self._by_request.get((tenant, request_id))
            if job_id is None:
                return None
            job = self._jobs[job_id]
        if job.request_fingerprint != request_fingerprint:
            raise AlreadyExists(
                f"request_id {request_id!r} was already used for {job.name} with a different spec; "
                "use a new request_id for a new job"
            )
        return job

    # Reading

    def get(self, job_id: str, tenant: str | None = None) -> Job:
        """The job; with `tenant`, only if that tenant owns it (else NotFound, as for no job)."""
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None or (tenant is not None and job.tenant != tenant):
            raise NotFound(job_name(job_id), f"training job {job_name(job_id)!r} not found")
        return job

    def all(self, tenant: str | None = None) -> list[Job]:
        """Every job, or only `tenant`'s."""
        with self._lock:
            return [job for job in self._jobs.values() if tenant is None or job.tenant == tenant]

    def count_by_state(self) -> dict[JobState, int]:
        counts = dict.fromkeys(JobState, 0)
        for job in self.all():
            counts[job.state] += 1
        return counts

    def list(
        self,
        *,
        page_size: int = 0,
        page_token: str = "",
        state: JobState | None = None,
        tenant: str | None = None,
    ) -> Page:
        """Newest first (only `tenant`'s jobs when given). The token encodes the last job's
        position and the filter it belongs to."""
        if page_size < 0:
            raise InvalidArgument("page_size", f"must be >= 0, got {page_size}")
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        state_filter = state.value if state else ""
        after = _decode_token(page_token, state_filter) if page_token else None
        jobs = sorted(
            (job for job in self.all(tenant) if state is None or job.state == state),
            key=lambda job: (job.create_time, job.job_id),
            reverse=True,
        )
        if after is not None:
            jobs = [job for job in jobs if (job.create_time, job.job_id) < after]
        page = jobs[:size]
        token = ""
        if len(jobs) > size:
            last = page[-1]
            token = _encode_token(last.create_time, last.job_id, state_filter)
        return Page(jobs=page, next_page_token=token)

    # Changing

    def update(self, job_id: str, *, persist: bool = True, **changes: Any) -> Job:
        """Apply field changes (a state change is checked against TRANSITIONS) and save them.

        `persist=False` keeps the change in memory only (frequent progress); the next persisted
        change writes it too.
        """
        with self._lock:
            old = self.get(job_id)
            new_state = changes.get("state")
            if new_state is not None and new_state != old.state:
                check_transition(old.state, new_state)
            job = dataclasses.replace(old, update_time=self._clock(), **changes)
            if persist:
                self._write(job)
            self._jobs[job_id] = job
        if job.state != old.state:
            self._notify(old.state, job)
        return job

    def transition(self, job_id: str, state: JobState, **changes: Any) -> Job:
        """Move to `state`, stamping start_time (first time out of QUEUED) and end_time."""
        with self._lock:
            old = self.get(job_id)
            now = self._clock()
            if state in _RUNNING and old.start_time is None:
                changes.setdefault("start_time", now)
            if state.is_final:
                changes.setdefault("end_time", now)
            return self.update(job_id, state=state, **changes)

    def delete(self, job_id: str, tenant: str) -> Job:
        """Forget a finished job of `tenant` and remove its record (the job stops existing); its
        other keys are the caller's to remove. Another tenant's job is NotFound, as for no job."""
        with self._lock:
            job = self.get(job_id, tenant)
            if not job.state.is_final:
                raise FailedPrecondition(f"{job.name} is {job.state.value}; only a finished job is deleted")
            scoped_store(self.store, job.tenant).delete(job_key(job_id))
            del self._jobs[job_id]
            if job.request_id and self._by_request.get((job.tenant, job.request_id)) == job_id:
                del self._by_request[(job.tenant, job.request_id)]
        return job

    def _write(self, job: Job) -> None:
        scoped_store(self.store, job.tenant).put_json(job_key(job.job_id), job.to_json())

    def _notify(self, old_state: JobState | None, job: Job) -> None:
        if self._on_change is not None:
            self._on_change(old_state, job)


def _encode_token(create_time: float, job_id: str, state_filter: str) -> str:
    raw = json.dumps({"t": create_time, "id": job_id, "s": state_filter}, separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


MAX_PAGE_TOKEN_CHARS = 512  # the tokens this server issues are ~100 characters


def _decode_token(token: str, state_filter: str) -> tuple[float, str]:
    if len(token) > MAX_PAGE_TOKEN_CHARS:
        raise InvalidArgument("page_token", "is not a token this server returned")
    try:
        padded = token + "=" * (-len(token) % 4)
        data = json.loads(base64.urlsafe_b64decode(padded.encode()))
        create_time, job_id, token_filter = float(data["t"]), str(data["id"]), str(data["s"])
    except (ValueError, KeyError, TypeError, binascii.Error, UnicodeDecodeError, RecursionError):
        # RecursionError: JSON nested thousands deep (a hostile token), not a server fault
        raise InvalidArgument("page_token", "is not a token this server returned") from None
    if token_filter != state_filter:
        raise InvalidArgument("page_token", "belongs to a listing with a different state filter")
    return create_time, job_id
