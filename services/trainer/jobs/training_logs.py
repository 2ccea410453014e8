"""A job's training logs (TensorBoard event files) read out of the store for DownloadTrainingJobLogs.

    for part in log_parts(store, job):
        ...  # LogsPlan once, then per file: FileStart, then Chunk ... Chunk

Rank 0 re-uploads a growing event file at every checkpoint, so the files are copied out of the
store first: the plan's sizes and digests then describe exactly the bytes that follow, even while
the job trains. The copy is streamed and removed when the stream ends, however it ends.
"""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
import tempfile
from collections.abc import Generator
from pathlib import Path

from services.common.errors import FailedPrecondition
from services.common.object_store import ObjectStore
from services.trainer.jobs.records import Job
from services.trainer.training_logs_layout import is_event_file_name, tensorboard_prefix

CHUNK_BYTES = 1024 * 1024  # the proto's limit per chunk message


@dataclasses.dataclass(frozen=True)
class LogFile:
    path: str  # a file name in the run's folder
    sha256: str
    size: int


@dataclasses.dataclass(frozen=True)
class LogsPlan:
    """The first part: the job and every file that follows, in order."""

    job_name: str
    files: tuple[LogFile, ...]


@dataclasses.dataclass(frozen=True)
class FileStart:
    file: LogFile


@dataclasses.dataclass(frozen=True)
class Chunk:
    data: bytes


LogsPart = LogsPlan | FileStart | Chunk


def log_parts(
    store: ObjectStore, job: Job, chunk_bytes: int = CHUNK_BYTES
) -> Generator[LogsPart, None, None]:
    """The parts of one download, lazily (blocking I/O: iterate it off the event loop). `store`
    is the job's tenant's view. FailedPrecondition, before any part, while the job has no logs."""
    prefix = tensorboard_prefix(job.job_id)
    keys = [info.key for info in store.list(prefix) if is_event_file_name(info.key.removeprefix(prefix))]
    if not keys:
        raise FailedPrecondition(
            f"{job.name} has no training logs yet ({job.state.value}): they are uploaded at each "
            "checkpoint and when training ends"
        )
    folder = Path(tempfile.mkdtemp(prefix="dreambooth-logs-"))
    try:
        files = tuple(_copy(store, key, folder / key.removeprefix(prefix)) for key in keys)
        yield LogsPlan(job.name, files)
        for log_file in files:
            yield FileStart(log_file)
            with open(folder / log_file.path, "rb") as source:
                while data := source.read(chunk_bytes):
                    yield Chunk(data)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _copy(store: ObjectStore, key: str, path: Path) -> LogFile:
    store.get_file(key, path)
    digest = hashlib.sha256()
    with open(path, "rb") as source:
        while data := source.read(CHUNK_BYTES):
            digest.update(data)
    return LogFile(path.name, digest.hexdigest(), path.stat().st_size)
