"""Where a job's training logs live in the store: the one definition that the worker (rank 0
writes them) and the job core (DownloadTrainingJobLogs reads them) share.

    jobs/{id}/tensorboard/events.out.tfevents.{time}.{host}.{pid}.{n}   one file per run attempt

A flat folder of TensorBoard event files, so a copy of it is one TensorBoard run. Every attempt
of a job (the first run, a Ray retry, a restarted trainer) adds its own file; each is uploaded
whole, again and again as it grows, and deleted with the job (everything under `jobs/{id}/` is).
"""

from __future__ import annotations

import re

_EVENT_FILE = re.compile(r"^events\.out\.tfevents\.[A-Za-z0-9._-]+$")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def tensorboard_prefix(job_id: str) -> str:
    return f"jobs/{job_id}/tensorboard/"


def event_file_key(job_id: str, local_name: str) -> str:
    """The store key of a writer's event file (TensorBoard names it after the host, whose name
    may hold characters a key should not)."""
    return tensorboard_prefix(job_id) + _UNSAFE.sub("_", local_name)


def is_event_file_name(name: str) -> bool:
    """A TensorBoard event file's name, safe as one path component anywhere."""
    return bool(_EVENT_FILE.match(name)) and ".." not in name
