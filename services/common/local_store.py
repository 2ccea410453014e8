"""ObjectStore over a local directory: the embedded default when no S3 endpoint is configured.

Atomicity comes from the filesystem: every write goes to a temp file in the destination's
directory, is fsynced, then `os.replace`d over the key, so a reader opens either the old file or
the whole new one. Temp file names contain '~', which no valid key segment may contain, so a temp
file can never be mistaken for (or collide with) an object.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from services.common.errors import NotFound
from services.common.object_store import ObjectInfo, ObjectStore, validate_key, validate_prefix

_TEMP_MARK = "~tmp~"  # '~' is outside the key alphabet: temp names never look like keys
_CHUNK = 1024 * 1024

_Writer = Callable[[BinaryIO], object]


class LocalObjectStore(ObjectStore):
    """Objects are files under `root`; the key is the relative path (always '/'-separated)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"LocalObjectStore({str(self.root)!r})"

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*validate_key(key).split("/"))

    def put_bytes(self, key: str, data: bytes) -> None:
        path = self._path(key)
        self._write_atomically(path, lambda out: out.write(data))

    def put_file(self, key: str, path: Path) -> None:
        target = self._path(key)
        with open(path, "rb") as source:
            self._write_atomically(target, lambda out: shutil.copyfileobj(source, out, _CHUNK))

    def get_bytes(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return path.read_bytes()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as err:
            raise NotFound(f"object {key!r}") from err

    def get_file(self, key: str, path: Path) -> None:
        source_path = self._path(key)
        try:
            source = open(source_path, "rb")  # noqa: SIM115 - closed below, before the rename
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as err:
            raise NotFound(f"object {key!r}") from err
        with source:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            write_file_atomically(Path(path), lambda out: shutil.copyfileobj(source, out, _CHUNK))

    def stat(self, key: str) -> ObjectInfo:
        path = self._path(key)
        try:
            st = path.stat()
        except (FileNotFoundError, NotADirectoryError) as err:
            raise NotFound(f"object {key!r}") from err
        if not path.is_file():
            raise NotFound(f"object {key!r}")
        return ObjectInfo(key=key, size=st.st_size)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        validate_prefix(prefix)
        # Walk only the deepest directory the prefix pins down, then filter by string prefix:
        # "models/a" must match "models/a/x" and "models/ab" alike, as in S3.
        directory = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        start = self.root.joinpath(*directory.split("/")) if directory else self.root
        found: list[ObjectInfo] = []
        for dirpath, _dirnames, filenames in os.walk(start):
            rel_dir = Path(dirpath).relative_to(self.root).as_posix()
            for name in filenames:
                if _TEMP_MARK in name:
                    continue
                key = name if rel_dir == "." else f"{rel_dir}/{name}"
                if not key.startswith(prefix):
                    continue
                try:
                    size = os.stat(os.path.join(dirpath, name)).st_size
                except FileNotFoundError:  # deleted while we walked
                    continue
                found.append(ObjectInfo(key=key, size=size))
        found.sort(key=lambda info: info.key)
        return iter(found)

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            path.unlink()
        except (FileNotFoundError, NotADirectoryError):
            return
        self._prune_empty_dirs(path.parent)

    def _prune_empty_dirs(self, directory: Path) -> None:
        """Remove now-empty parents so deleted prefixes leave no directory litter."""
        while directory != self.root and self.root in directory.parents:
            try:
                directory.rmdir()
            except OSError:  # not empty, or a concurrent writer just used it
                return
            directory = directory.parent

    def _write_atomically(self, path: Path, write: _Writer) -> None:
        # A concurrent delete may prune the empty parent between mkdir and mkstemp: retry.
        for attempt in range(3):
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                write_file_atomically(path, write)
                return
            except FileNotFoundError:
                if attempt == 2:
                    raise


def write_file_atomically(path: Path, write: _Writer) -> None:
    """Write through `write(fileobj)` into a temp file next to `path`, fsync, then rename over it."""
    fd, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}{_TEMP_MARK}")
    try:
        with os.fdopen(fd, "wb") as out:
            write(out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp_name)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable (POSIX); best effort where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)
