"""The one storage interface. Two backends implement it: a local directory and MinIO/S3.

Same semantics everywhere: writes are atomic (a reader sees the old object or the whole new
one), reading a missing key raises NotFound, keys are validated before any I/O.
"""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.common.errors import InvalidArgument

_SEGMENT = re.compile(r"^[A-Za-z0-9._=+@-]+$")


def validate_key(key: str, field: str = "key") -> str:
    """Return `key` if it is a safe relative object key, else raise InvalidArgument.

    Refused: empty keys, absolute paths, empty segments (`a//b`, trailing `/`), `.` and `..`
    segments, backslashes and characters outside [A-Za-z0-9._=+@-].
    """
    if not key:
        raise InvalidArgument(field, "must not be empty")
    if key.startswith("/"):
        raise InvalidArgument(field, f"must be relative, got {key!r}")
    for segment in key.split("/"):
        if segment == "":
            raise InvalidArgument(field, f"has an empty path segment: {key!r}")
        if segment in (".", ".."):
            raise InvalidArgument(field, f"must not contain '.' or '..' segments: {key!r}")
        if not _SEGMENT.match(segment):
            raise InvalidArgument(field, f"has characters outside [A-Za-z0-9._=+@-]: {key!r}")
    return key


def validate_prefix(prefix: str, field: str = "prefix") -> str:
    """A prefix is '' (everything) or a valid key, optionally ending in '/'."""
    if prefix == "":
        return prefix
    validate_key(prefix.removesuffix("/"), field)
    return prefix


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int


class ObjectStore(ABC):
    """Key/value blob storage. Implementations must be safe to share between threads."""

    @abstractmethod
    def put_bytes(self, key: str, data: bytes) -> None:
        """Atomically write `data` at `key`, replacing any previous object."""

    @abstractmethod
    def put_file(self, key: str, path: Path) -> None:
        """Atomically upload a local file, streaming (never the whole file in memory)."""

    @abstractmethod
    def get_bytes(self, key: str) -> bytes:
        """Read a whole object. Raises NotFound."""

    @abstractmethod
    def get_file(self, key: str, path: Path) -> None:
        """Stream an object to a local file (written atomically). Raises NotFound."""

    @abstractmethod
    def stat(self, key: str) -> ObjectInfo:
        """Size of an object. Raises NotFound."""

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Every object whose key starts with `prefix`, recursively, sorted by key."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove an object; deleting a missing key is not an error."""

    # Conveniences shared by every backend.

    def exists(self, key: str) -> bool:
        from services.common.errors import NotFound

        try:
            self.stat(key)
        except NotFound:
            return False
        return True

    def put_json(self, key: str, value: Any) -> None:
        self.put_bytes(key, json.dumps(value, indent=2, sort_keys=True).encode())

    def get_json(self, key: str) -> Any:
        return json.loads(self.get_bytes(key))

    def delete_prefix(self, prefix: str) -> int:
        """Delete everything under `prefix`; returns how many objects went."""
        keys = [info.key for info in self.list(validate_prefix(prefix))]
        for key in keys:
            self.delete(key)
        return len(keys)
