"""What the sync and asyncio clients share about streams: callbacks, results, watch retries."""

from __future__ import annotations

from collections.abc import Callable

from dreambooth.v1 import inference_pb2, trainer_pb2

from dreambooth_client import messages
from dreambooth_client.errors import DreamBoothError
from dreambooth_client.messages import GeneratedImage
from dreambooth_client.retry import RetryPolicy

ProgressCallback = Callable[[int, int], None]  # (step, total_steps)
PreviewCallback = Callable[[int, int, bytes], None]  # (step, image index, JPEG bytes)
EventCallback = Callable[[trainer_pb2.WatchTrainingJobResponse], None]

# A watch outlives server restarts (the trainer resumes its jobs), so it waits longer to reconnect.
WATCH_RETRY = RetryPolicy(max_attempts=30, initial_backoff=0.5, max_backoff=5.0, max_total=180.0)


class GenerateCollector:
    """Dispatches one Generate stream's events to the callbacks and keeps the final images."""

    def __init__(self, on_progress: ProgressCallback | None, on_preview: PreviewCallback | None) -> None:
        self._on_progress = on_progress
        self._on_preview = on_preview
        self._images: dict[int, GeneratedImage] = {}
        self.received = False

    def add(self, response: inference_pb2.GenerateResponse) -> None:
        self.received = True
        kind = response.WhichOneof("event")
        if kind == "progress" and self._on_progress is not None:
            self._on_progress(response.progress.step, response.progress.total_steps)
        elif kind == "preview" and self._on_preview is not None:
            preview = response.preview
            self._on_preview(preview.step, preview.index, preview.image.data)
        elif kind == "image":
            image = response.image
            self._images[image.index] = GeneratedImage(image.image.data, image.seed)

    def images(self) -> list[GeneratedImage]:
        if not self._images:
            raise DreamBoothError("the server ended the stream without an image")
        return [self._images[index] for index in sorted(self._images)]


def job_failure_message(job: trainer_pb2.TrainingJob) -> str:
    state = messages.state_label(job.state)
    detail = f": {job.error_message}" if job.error_message else ""
    return f"{job.name} ended {state}{detail}"
