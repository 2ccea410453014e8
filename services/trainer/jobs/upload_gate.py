"""Server-wide bounds on UploadImages: how many streams may be open at once, and the pool that
decodes their images apart from the threads that serve RPCs.

The pool is also the server's decoded-pixel budget: at most `decode_workers` images are decoded
at once, each of at most `max_image_pixels`, so uploads can never hold more than
decode_workers x max_image_pixels decoded pixels, however many arrive together; and a burst of
large uploads queues here instead of taking the threads a CancelTrainingJob needs.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

from services.common.errors import ResourceExhausted
from services.trainer.settings import UploadLimits


class UploadGate:
    def __init__(self, limits: UploadLimits) -> None:
        self.limits = limits
        self.decode_executor = ThreadPoolExecutor(limits.decode_workers, thread_name_prefix="upload-decode")
        self._open = 0
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def stream(self) -> Iterator[None]:
        """Holds one of the `max_concurrent_uploads` places while an upload stream is open."""
        with self._lock:
            if self._open >= self.limits.max_concurrent_uploads:
                raise ResourceExhausted(
                    f"uploads: {self._open} upload streams are open, the limit is "
                    f"{self.limits.max_concurrent_uploads}; try again shortly"
                )
            self._open += 1
        try:
            yield
        finally:
            with self._lock:
                self._open -= 1

    @property
    def open_streams(self) -> int:
        return self._open

    def shutdown(self) -> None:
        self.decode_executor.shutdown(wait=False, cancel_futures=True)
