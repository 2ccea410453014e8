"""Receiving a stream of files into a folder, every file checked against the stream's manifest:
an ExportModel stream (a model) or a DownloadTrainingJobLogs stream (a job's TensorBoard run).

    writer = ExportWriter(Path("out/my-model"))
    for response in stub.ExportModel(request):
        writer.add(response)
    model = writer.finish()   # the folder appears only now, complete

Files are written into a hidden sibling folder and renamed into place when every file has
arrived with the size and sha256 the manifest names, so a failed or interrupted download leaves
nothing half-written at the destination (`abort()` removes the partial folder). The destination
must be missing or empty, unless `overwrite` (it is then replaced whole, only once the new folder
is complete). Paths from the server are checked to stay inside the folder.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path
from typing import IO, Any

import grpc
from dreambooth.v1 import common_pb2, inference_pb2, trainer_pb2

from dreambooth_client.errors import DreamBoothError, error_from_code


def _data_loss(message: str) -> DreamBoothError:
    return error_from_code(grpc.StatusCode.DATA_LOSS, message)


def safe_relative_path(path: str) -> Path:
    """A '/'-separated relative path with no empty, '.' or '..' part (ValueError otherwise)."""
    parts = path.split("/")
    if not path or path.startswith("/") or "\\" in path or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"unsafe path in export: {path!r}")
    return Path(*parts)


class VerifiedFolderWriter:
    """The files of one stream (each message of which has a `part`: manifest, file or chunk),
    checked against the manifest's `files` (path, sha256, size_bytes)."""

    what = "the download"  # how errors name the stream

    def __init__(self, out_dir: Path, *, overwrite: bool = False) -> None:
        out_dir = Path(out_dir)
        if out_dir.exists() and not out_dir.is_dir():
            raise ValueError(f"{out_dir} exists and is not a folder")
        if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
            raise ValueError(f"{out_dir} exists and is not an empty folder")
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        self.out_dir = out_dir
        self._partial = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
        self._manifest: Any = None
        self._expected: dict[str, Any] = {}
        self._done: set[str] = set()
        self._current: Any = None
        self._out: IO[bytes] | None = None
        self._digest = hashlib.sha256()
        self._size = 0

    def add(self, response: Any) -> None:
        """One message of the stream."""
        part = response.WhichOneof("part")
        if part == "manifest":
            if self._manifest is not None:
                raise _data_loss(f"{self.what} sent its manifest twice")
            self._manifest = response.manifest
            self._expected = {f.path: f for f in response.manifest.files}
        elif self._manifest is None:
            raise _data_loss(f"{self.what} did not start with its manifest")
        elif part == "file":
            self._start(response.file)
        elif part == "chunk":
            if self._out is None:
                raise _data_loss(f"{self.what} sent bytes before a file header")
            self._out.write(response.chunk)
            self._digest.update(response.chunk)
            self._size += len(response.chunk)
        else:
            raise _data_loss(f"{self.what} sent an empty message")

    def _start(self, exported: Any) -> None:
        self._close_current()
        expected = self._expected.get(exported.path)
        if expected is None or exported.path in self._done or expected != exported:
            raise _data_loss(f"{self.what} sent a file its manifest does not list: {exported.path!r}")
        try:
            target = self._partial / safe_relative_path(exported.path)
        except ValueError as err:
            raise _data_loss(str(err)) from None
        target.parent.mkdir(parents=True, exist_ok=True)
        self._current, self._out = exported, open(target, "wb")  # noqa: SIM115 - closed in _close_current
        self._digest, self._size = hashlib.sha256(), 0

    def _close_current(self) -> None:
        if self._current is None or self._out is None:
            return
        self._out.close()
        exported, self._current, self._out = self._current, None, None
        if (self._digest.hexdigest(), self._size) != (exported.sha256, exported.size_bytes):
            raise _data_loss(
                f"{exported.path}: expected sha256 {exported.sha256} ({exported.size_bytes} bytes), "
                f"got sha256 {self._digest.hexdigest()} ({self._size} bytes)"
            )
        self._done.add(exported.path)

    def finish(self) -> Any:
        """Check that every file arrived whole, then move the folder into place; the manifest."""
        self._close_current()
        if self._manifest is None:
            raise _data_loss(f"{self.what} ended before its manifest")
        missing = sorted(set(self._expected) - self._done)
        if missing:
            raise _data_loss(f"{self.what} ended before these files: {', '.join(missing)}")
        self._partial.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary folder
        if self.out_dir.exists():
            shutil.rmtree(self.out_dir)  # empty, or replaced as asked (overwrite)
        self._partial.rename(self.out_dir)
        return self._manifest

    def abort(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None
        shutil.rmtree(self._partial, ignore_errors=True)


class ExportWriter(VerifiedFolderWriter):
    """An ExportModel stream (inference_pb2.ExportModelResponse): a model's files."""

    what = "the export"

    def finish(self) -> common_pb2.Model:
        manifest: inference_pb2.ExportManifest = super().finish()
        return manifest.model


class TrainingLogsWriter(VerifiedFolderWriter):
    """A DownloadTrainingJobLogs stream (trainer_pb2.DownloadTrainingJobLogsResponse): a job's
    TensorBoard event files, one run's folder."""

    what = "the log download"

    def finish(self) -> trainer_pb2.TrainingJobLogs:
        manifest: trainer_pb2.TrainingJobLogs = super().finish()
        return manifest
