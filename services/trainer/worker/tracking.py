"""Experiment tracking from rank 0: TensorBoard event files in the store, MLflow when configured.

The loop calls it at four points:

    tracker = open_tracker(job, store, runtime, start_step, group_names)    # after resuming
    tracker.step(step, loss, learning_rates, grad_norm, samples_per_second)  # every step
    tracker.previews(step, previews)                                        # validation images
    tracker.upload()  at checkpoints,  tracker.finish(step)  at the end

What TensorBoard gets: the loss (one point per step), each parameter group's learning rate,
samples/s, the gradient norm (before clipping), the validation previews, and the resolved spec as
hparams with the final loss as their metric. The writer writes to a local folder whose files are
uploaded whole to `jobs/{id}/tensorboard/` at each checkpoint and preview, at the end, and when
the run stops otherwise (a cancel or a failure: `close`, called by the runtime). A resumed run
writes a new file in the same folder whose first record purges what an earlier attempt logged
past the checkpoint, so TensorBoard shows one curve. Tracking never fails a run: an upload that
fails is logged and made again at the next point. Every rank but 0 gets a `Tracker`, which does
nothing.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from services.common.object_store import ObjectStore
from services.trainer.training_events import PreviewEvent
from services.trainer.training_logs_layout import event_file_key
from services.trainer.worker.mlflow_run import MlflowRun
from services.trainer.worker.runtime import Runtime, WorkerJob

log = logging.getLogger(__name__)

LOSS = "train/loss"
LEARNING_RATE = "train/learning_rate/"  # + the parameter group's module: unet, text_encoder
SAMPLES_PER_SECOND = "train/samples_per_second"
GRAD_NORM = "train/grad_norm"
PREVIEW = "validation/"  # + the prompt's index in the spec
FINAL_LOSS = "hparams/final_loss"
FLUSH_SECONDS = 30  # the writer's own flushes to its local file; uploads flush first anyway


class Tracker:
    """The tracker of ranks that do not track: every call does nothing."""

    def step(
        self,
        step: int,
        loss: float,
        learning_rates: Sequence[float],
        grad_norm: torch.Tensor | float | None,
        samples_per_second: float,
    ) -> None:
        """One optimizer step: `learning_rates` as the step used them, one per parameter group."""

    def previews(self, step: int, previews: Sequence[PreviewEvent]) -> None:
        """The validation previews sampled after `step`."""

    def upload(self) -> None:
        """Put what was written so far into the store (at a checkpoint)."""

    def finish(self, step: int) -> None:
        """The run trained to its last step: record the final loss, upload, close."""

    def close(self, error: BaseException | None = None) -> None:
        """The run ends however it ends (after `finish`: nothing left to do)."""


def open_tracker(
    job: WorkerJob, store: ObjectStore, runtime: Runtime, start_step: int, group_names: Sequence[str]
) -> Tracker:
    """Rank 0's tracker (closed by the runtime when the run ends); a no-op tracker elsewhere."""
    if not runtime.is_chief:
        return Tracker()
    tracker = RankZeroTracker(job, store, start_step, group_names)
    runtime.on_close(tracker.close)
    return tracker


def gradient_norm(params: Sequence[torch.nn.Parameter]) -> torch.Tensor:
    """The total L2 norm of the gradients, as `clip_grad_norm_` computes it (runs without clipping)."""
    norms = [torch.linalg.vector_norm(p.grad.detach()) for p in params if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())


def spec_hparams(job: WorkerJob) -> dict[str, Any]:
    """The resolved spec as hparams values (TensorBoard takes numbers, strings and booleans)."""
    values: dict[str, Any] = {}
    for name, value in job.spec.to_json().items():
        if isinstance(value, list | tuple):  # prompts, or the additional concepts (as JSON objects)
            value = " | ".join(
                item if isinstance(item, str) else json.dumps(item, sort_keys=True) for item in value
            )
        values[name] = value
    return values


class RankZeroTracker(Tracker):
    def __init__(
        self, job: WorkerJob, store: ObjectStore, start_step: int, group_names: Sequence[str]
    ) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.job = job
        self.store = store
        self.group_names = list(group_names)
        self._folder = Path(tempfile.mkdtemp(prefix="dreambooth-tensorboard-"))
        # A resumed run (start_step > 0) begins with TensorBoard's purge marker at its first step:
        # what a failed attempt logged after the checkpoint is hidden, the new points replace it.
        self._writer = SummaryWriter(
            str(self._folder), purge_step=start_step + 1 if start_step else None, flush_secs=FLUSH_SECONDS
        )
        self._events: Any = self._writer.file_writer  # for summaries torch's writer has no call for
        self._last_loss: float | None = None
        self._closed = False
        hparams = spec_hparams(job)
        self._write_hparams(hparams)
        self._mlflow = (
            MlflowRun.open(job.tracking, job.job_id, hparams) if job.tracking.mlflow_tracking_uri else None
        )

    def _write_hparams(self, hparams: dict[str, Any]) -> None:
        """The hparams plugin's experiment and session start; the session's end comes with `finish`."""
        from torch.utils.tensorboard.summary import hparams as hparams_summaries

        experiment, session_start, _ = hparams_summaries(hparams, {FINAL_LOSS: 0.0})
        self._events.add_summary(experiment)
        self._events.add_summary(session_start)

    def step(
        self,
        step: int,
        loss: float,
        learning_rates: Sequence[float],
        grad_norm: torch.Tensor | float | None,
        samples_per_second: float,
    ) -> None:
        metrics = {LOSS: loss, SAMPLES_PER_SECOND: samples_per_second}
        for index, rate in enumerate(learning_rates):
            name = self.group_names[index] if index < len(self.group_names) else f"group{index}"
            metrics[LEARNING_RATE + name] = rate
        if grad_norm is not None:
            metrics[GRAD_NORM] = float(grad_norm)
        for tag, value in metrics.items():
            self._writer.add_scalar(tag, value, step)
        self._last_loss = loss
        if self._mlflow is not None:
            self._mlflow.log(step, metrics)

    def previews(self, step: int, previews: Sequence[PreviewEvent]) -> None:
        """The JPEGs as sampled (TensorBoard shows encoded images as they are: no re-encoding)."""
        from tensorboard.compat.proto.summary_pb2 import Summary

        size = self.job.spec.resolution
        for index, preview in enumerate(previews):
            image = Summary.Image(height=size, width=size, colorspace=3, encoded_image_string=preview.jpeg)
            value = Summary.Value(tag=f"{PREVIEW}{index}", image=image)
            value.metadata.summary_description = preview.prompt  # shown on the image's card
            value.metadata.plugin_data.plugin_name = "images"
            self._events.add_summary(Summary(value=[value]), step)
        self.upload()  # a preview can be the last thing a failed attempt shows

    def upload(self) -> None:
        self._writer.flush()
        try:
            for path in sorted(self._folder.iterdir()):
                self.store.put_file(event_file_key(self.job.job_id, path.name), path)
        except Exception:  # the store is down: the next checkpoint or the end uploads again
            log.warning("cannot upload the training logs", exc_info=True, extra={"job_id": self.job.job_id})
        if self._mlflow is not None:
            self._mlflow.flush()

    def finish(self, step: int) -> None:
        if self._last_loss is not None:
            self._writer.add_scalar(FINAL_LOSS, self._last_loss, step)
        self._end("STATUS_SUCCESS", "FINISHED")

    def close(self, error: BaseException | None = None) -> None:
        """A failure ends the hparams session as failed; a cancel leaves it open (TensorBoard has no
        status for it, and a trainer's shutdown cancels runs that a later attempt finishes)."""
        if not self._closed:
            self._end("STATUS_FAILURE" if error else None, "FAILED" if error else "KILLED")

    def _end(self, tensorboard_status: str | None, mlflow_status: str) -> None:
        self._closed = True
        if tensorboard_status is not None:
            self._events.add_summary(session_end(tensorboard_status))
        self.upload()
        self._writer.close()
        shutil.rmtree(self._folder, ignore_errors=True)
        if self._mlflow is not None:
            self._mlflow.end(mlflow_status)


def session_end(status: str) -> Any:
    """The hparams plugin's session end with `status` (torch's helper only writes success)."""
    from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

    content = plugin_data_pb2.HParamsPluginData(
        session_end_info=plugin_data_pb2.SessionEndInfo(status=api_pb2.Status.Value(status)),
        version=metadata.PLUGIN_DATA_VERSION,
    )
    plugin = SummaryMetadata.PluginData(plugin_name=metadata.PLUGIN_NAME, content=content.SerializeToString())
    value = Summary.Value(tag=metadata.SESSION_END_INFO_TAG, metadata=SummaryMetadata(plugin_data=plugin))
    return Summary(value=[value])
