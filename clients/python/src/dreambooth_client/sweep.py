"""`dreambooth train --sweep NAME=V1,V2 ...`: one ordinary training job per point of a grid.

The grid is the cartesian product of the axes, in the order given; each value is parsed and
checked as its flag's would be (spec_values), before any job is created. Every point is created
first (the trainer queues and runs them as it runs any job), then each is waited for in turn and,
when asked, its model scored; the result is one row per point.

Why a grid of jobs on the client and not Ray Tune: the job is the trainer service's unit of
scheduling, checkpointing, resume after a restart, quotas and tenancy; a trial that Tune ran on
the cluster itself would go around the service API (no job record, no tenant, no resume, no
published model) and need cluster access the client does not have. A point is an idempotent
create with its own request id (`--request-id R` gives R-0, R-1, ...), so a sweep that was
interrupted is picked up again by running the same command. What a grid lacks is Tune's early
stopping and adaptive search: over a handful of DreamBooth runs a grid is what people run.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from dreambooth.v1 import trainer_pb2

from dreambooth_client import formatting, messages
from dreambooth_client.client import DreamBoothClient
from dreambooth_client.errors import DreamBoothError
from dreambooth_client.spec_values import SpecValueError, parse_text
from dreambooth_client.training_spec import FIELDS_BY_NAME

SUCCEEDED = trainer_pb2.TRAINING_JOB_STATE_SUCCEEDED
Scorer = Callable[[trainer_pb2.TrainingJob], Mapping[str, float]]


class SweepError(ValueError):
    """A --sweep that cannot be run as given (reported as usage, before any job exists)."""


@dataclass(frozen=True)
class Axis:
    name: str  # the spec-table name
    values: tuple[Any, ...]


@dataclass
class PointRun:
    """One point of the grid: its values, its job once created, what went wrong, its scores."""

    values: dict[str, Any]
    job: trainer_pb2.TrainingJob | None = None
    error: str = ""
    scores: dict[str, float] = field(default_factory=dict)

    @property
    def succeeded(self) -> bool:
        return self.job is not None and self.job.state == SUCCEEDED and not self.error


# ---------------------------------------------------------------- the grid


def parse_axis(text: str) -> Axis:
    """`learning_rate=1e-4,2e-4` -> Axis("learning_rate", (1e-4, 2e-4))."""
    name, equals, listed = text.partition("=")
    name = name.strip()
    if not equals or not name:
        raise SweepError(f"--sweep {text!r}: expected NAME=VALUE,VALUE,...")
    row = FIELDS_BY_NAME.get(name)
    if row is None:
        hint = messages.SPEC_ALIASES.get(name)
        known = f" (the spec calls it {hint})" if hint else ""
        raise SweepError(f"--sweep {name}: not a training spec field{known}")
    if row.type not in (int, float, bool, str):
        raise SweepError(f"--sweep {name}: a list field cannot be swept")
    texts = [part.strip() for part in listed.split(",")]
    if not any(texts) or not all(texts):
        raise SweepError(f"--sweep {name}: expected NAME=VALUE,VALUE,... without empty values")
    values = []
    for value_text in texts:
        try:
            value = parse_text(row, value_text)
        except SpecValueError as err:
            raise SweepError(f"--sweep {name}={value_text}: {err}") from None
        if value in values:
            raise SweepError(f"--sweep {name}: {value_text} is given twice")
        values.append(value)
    return Axis(name, tuple(values))


def parse_axes(texts: Sequence[str]) -> list[Axis]:
    axes = [parse_axis(text) for text in texts]
    names = [axis.name for axis in axes]
    for name in names:
        if names.count(name) > 1:
            raise SweepError(f"--sweep {name}: given twice; list every value in one --sweep")
    return axes


def grid(axes: Sequence[Axis]) -> list[dict[str, Any]]:
    """Every combination, the first axis slowest; no axes: one point, the spec as it is."""
    names = [axis.name for axis in axes]
    return [dict(zip(names, combo, strict=True)) for combo in itertools.product(*(a.values for a in axes))]


def value_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


# ---------------------------------------------------------------- running it


def run(
    client: DreamBoothClient,
    specs: Sequence[tuple[dict[str, Any], trainer_pb2.TrainingJobSpec]],
    *,
    request_id: str | None,
    note: Callable[[str], None],
    scorer: Scorer | None = None,
) -> list[PointRun]:
    """Create a job per (point values, spec), then wait for each in turn and score it.

    A point the trainer refuses (or whose scoring fails) gets its error in its row; the others go on.
    """
    runs: list[PointRun] = []
    total = len(specs)
    for index, (values, spec) in enumerate(specs):
        point = PointRun(values)
        runs.append(point)
        label = _label(index, total, values)
        try:
            point.job = client.create_training_job(
                spec, request_id=f"{request_id}-{index}" if request_id else None
            )
        except DreamBoothError as err:
            point.error = str(err)
            note(f"{label}  refused: {err}")
            continue
        note(f"{label}  created {point.job.name}")
    for index, point in enumerate(runs):
        if point.job is None:
            continue
        label = _label(index, total, point.values)

        def on_event(event: trainer_pb2.WatchTrainingJobResponse, label: str = label) -> None:
            if event.WhichOneof("event") == "state_change":
                note(f"{label}  {formatting.job_summary(event.state_change)}")

        point.job = client.wait(point.job.name, on_event=on_event)
        if point.job.state != SUCCEEDED or scorer is None:
            continue
        try:
            point.scores = dict(scorer(point.job))
        except (DreamBoothError, OSError, ValueError) as err:  # the export, or a model it cannot load
            point.error = f"scoring: {err}"
            note(f"{label}  {point.error}")
            continue
        note(f"{label}  scored: " + "  ".join(f"{k} {v:.3f}" for k, v in point.scores.items()))
    return runs


def _label(index: int, total: int, values: Mapping[str, Any]) -> str:
    point = " ".join(f"{name}={value_text(value)}" for name, value in values.items())
    return f"[{index + 1}/{total}]" + (f" {point}" if point else "")


# ---------------------------------------------------------------- the result


def table_rows(
    runs: Sequence[PointRun], names: Sequence[str], score_columns: Sequence[str]
) -> tuple[list[str], list[list[str]]]:
    """Headers and rows: the swept values, job, state, final loss, model, then the scores."""
    headers = [*names, "JOB", "STATE", "LOSS", "MODEL", *(c.upper() for c in score_columns)]
    rows = []
    for point in runs:
        job = point.job
        row = [value_text(point.values[name]) for name in names]
        if job is None:
            row += ["", "REFUSED", "", ""]
        else:
            loss = f"{job.progress.loss:.4f}" if job.progress.step else ""
            row += [job.name, messages.state_label(job.state), loss, job.model]
        row += [f"{point.scores[c]:.3f}" if c in point.scores else "" for c in score_columns]
        rows.append(row)
    return headers, rows


def errors(runs: Sequence[PointRun]) -> list[str]:
    """One line per point that did not succeed, saying why."""
    lines = []
    for index, point in enumerate(runs):
        label = _label(index, len(runs), point.values)
        if point.error:
            lines.append(f"{label}: {point.error}")
        elif point.job is not None and point.job.state != SUCCEEDED:
            lines.append(f"{label}: {formatting.job_summary(point.job)}")
    return lines


def records(runs: Sequence[PointRun]) -> list[dict[str, Any]]:
    """The rows for --json: plain values (the job as its resource name)."""
    return [
        {
            "values": point.values,
            "job": point.job.name if point.job else "",
            "state": messages.state_label(point.job.state) if point.job else "REFUSED",
            "loss": point.job.progress.loss if point.job and point.job.progress.step else None,
            "model": point.job.model if point.job else "",
            "scores": point.scores,
            "error": point.error,
        }
        for point in runs
    ]
