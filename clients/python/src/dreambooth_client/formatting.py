"""Human-readable one-line renderings of jobs, events and models (the CLI's and the demo's output)."""

from __future__ import annotations

from collections.abc import Sequence

from dreambooth.v1 import common_pb2, trainer_pb2

from dreambooth_client.messages import model_kind_label, state_label

BAR_WIDTH = 20


def progress_bar(done: int, total: int, width: int = BAR_WIDTH) -> str:
    """`[#####---------------]  25%` (an empty bar when the total is unknown)."""
    if total <= 0:
        return "[" + "-" * width + "]    "
    fraction = min(1.0, max(0.0, done / total))
    filled = round(fraction * width)
    return f"[{'#' * filled}{'-' * (width - filled)}] {fraction * 100:3.0f}%"


def duration(seconds: float) -> str:
    """`0:01:05`."""
    seconds = max(0, round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def size(num_bytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if num_bytes < 1024 or unit == "GB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024
    raise AssertionError("unreachable")


def timestamp(value: object) -> str:
    """A google.protobuf.Timestamp as `2024-05-01 12:00:03Z`; empty when unset."""
    seconds = getattr(value, "seconds", 0)
    if not seconds and not getattr(value, "nanos", 0):
        return ""
    return value.ToDatetime().strftime("%Y-%m-%d %H:%M:%SZ")  # type: ignore[attr-defined]


def training_progress(progress: trainer_pb2.TrainingProgress) -> str:
    parts = [
        f"step {progress.step:>{len(str(progress.total_steps))}}/{progress.total_steps}",
        progress_bar(progress.step, progress.total_steps),
        f"loss {progress.loss:.4f}",
        f"lr {progress.learning_rate:.2e}",
    ]
    if progress.samples_per_second > 0:
        parts.append(f"{progress.samples_per_second:.1f} samples/s")
    if progress.step < progress.total_steps:
        parts.append(f"ETA {duration(progress.eta_seconds)}")
    return "  ".join(parts)


def job_summary(job: trainer_pb2.TrainingJob) -> str:
    """`trainingJobs/abc SUCCEEDED model models/x` (plus step or error when it tells something)."""
    parts = [job.name, state_label(job.state)]
    if job.state == trainer_pb2.TRAINING_JOB_STATE_TRAINING and job.progress.total_steps:
        parts.append(f"step {job.progress.step}/{job.progress.total_steps}")
    if job.model:
        parts.append(f"model {job.model}")
    if job.error_message:
        parts.append(f"error: {job.error_message}")
    return "  ".join(parts)


def event_line(event: trainer_pb2.WatchTrainingJobResponse) -> str:
    """One line per WatchTrainingJob event."""
    kind = event.WhichOneof("event")
    prefix = f"#{event.sequence:<4}"
    if kind == "state_change":
        return f"{prefix} state     {job_summary(event.state_change)}"
    if kind == "progress":
        return f"{prefix} training  {training_progress(event.progress)}"
    if kind == "prior_progress":
        done, total = event.prior_progress.images_done, event.prior_progress.images_total
        return f"{prefix} priors    {done}/{total} class images  {progress_bar(done, total)}"
    if kind == "preview":
        preview = event.preview
        image = preview.image
        return (
            f"{prefix} preview   step {preview.step} {preview.prompt!r} "
            f"({image.width}x{image.height}, {size(len(image.data))})"
        )
    return f"{prefix} (unknown event)"


def job_details(job: trainer_pb2.TrainingJob) -> list[str]:
    """`key: value` lines describing a job (the spec's non-default fields included)."""
    lines = [
        f"name:            {job.name}",
        f"state:           {state_label(job.state)}",
        f"base model:      {job.spec.base_model}",
        f"dataset:         {job.spec.dataset}",
        f"instance prompt: {job.spec.instance_prompt}",
    ]
    if job.spec.with_prior_preservation:
        lines.append(f"class prompt:    {job.spec.class_prompt} ({job.spec.num_class_images} images)")
    for concept in job.spec.additional_concepts:
        text = f"{concept.dataset}  {concept.instance_prompt!r}"
        if job.spec.with_prior_preservation:
            text += f"  class {concept.class_prompt!r}"
        lines.append(f"also subject:    {text}")
    if job.progress.total_steps:
        lines.append(f"progress:        {training_progress(job.progress)}")
    if job.checkpoint_step:
        lines.append(f"checkpoint:      step {job.checkpoint_step}")
    if job.model:
        lines.append(f"model:           {job.model}")
    if job.error_message:
        lines.append(f"error:           {job.error_message}")
    for label, value in (
        ("created", job.create_time),
        ("started", job.start_time),
        ("ended", job.end_time),
    ):
        if text := timestamp(value):
            lines.append(f"{label + ':':<17}{text}")
    return lines


def model_details(model: common_pb2.Model) -> list[str]:
    lines = [
        f"name:     {model.name}",
        f"kind:     {model_kind_label(model.kind)}",
        f"size:     {size(model.size_bytes)} in {model.file_count} files",
        f"digest:   {model.manifest_digest}",
        f"created:  {timestamp(model.create_time)}",
    ]
    if model.base_model:
        lines.append(f"base:     {model.base_model}")
    if model.training_job:
        lines.append(f"job:      {model.training_job}")
    lines += [f"label:    {key}={value}" for key, value in sorted(model.labels.items())]
    return lines


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Left-aligned columns separated by two spaces."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=False)]
    return [
        "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=False)).rstrip()
        for row in (headers, *rows)
    ]


def usage_details(usage: trainer_pb2.GetUsageResponse) -> list[str]:
    quotas = usage.quotas
    streams = f"limit {quotas.max_generate_streams}" if quotas.max_generate_streams else "no limit"

    def limit(value: int, shown: str) -> str:
        return f" (limit {shown})" if value else ""

    return [
        f"tenant                 {usage.tenant}",
        f"training step-seconds  {usage.training_step_seconds:.1f}",
        f"images generated       {usage.images_generated}",
        f"stored                 {size(usage.stored_bytes)}"
        + limit(quotas.max_stored_bytes, size(quotas.max_stored_bytes)),
        f"active training jobs   {usage.active_training_jobs}"
        + limit(quotas.max_concurrent_jobs, str(quotas.max_concurrent_jobs)),
        f"generate streams       {streams}",
    ]
