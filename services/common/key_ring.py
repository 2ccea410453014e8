"""The live keys file: loaded at start (a bad file stops the service), re-read when it changes.

`current()` looks at the file at most every `poll_seconds` (0.5 s: a revoked key is refused well
within 2 s of the change, with no restart and no watcher thread). The bytes are compared, not the
mtime, so two edits within one mtime tick are still seen. A change that cannot be read or parsed
keeps the last good keys and logs one error per bad version of the file.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from services.common.api_keys import KeysFile, KeysFileError, parse_keys_file

log = logging.getLogger(__name__)


class KeyRing:
    def __init__(
        self, path: Path, *, poll_seconds: float = 0.5, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.path = Path(path)
        self.poll_seconds = poll_seconds
        self._clock = clock
        self._lock = threading.Lock()
        raw = self._read_or_raise()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise KeysFileError(f"keys file {self.path}: is not UTF-8 text") from None
        self._keys = parse_keys_file(text, str(self.path))
        self._digest = hashlib.sha256(raw).hexdigest()
        self._checked = clock()
        self._reported = ""  # the last bad version logged, so one bad edit is one error line
        log.info("keys file loaded", extra=self._counts(self._keys))

    def current(self) -> KeysFile:
        with self._lock:
            if self._clock() - self._checked >= self.poll_seconds:
                self._checked = self._clock()
                self._reload()
            return self._keys

    def _reload(self) -> None:
        try:
            raw = self.path.read_bytes()
        except OSError as err:
            self._report(f"unreadable:{err}", f"cannot be read: {err}")
            return
        digest = hashlib.sha256(raw).hexdigest()
        if digest == self._digest:
            return
        try:
            keys = parse_keys_file(raw.decode("utf-8"), str(self.path))
        except (KeysFileError, UnicodeDecodeError) as err:
            self._report(digest, str(err))
            return
        self._keys, self._digest, self._reported = keys, digest, ""
        log.info("keys file reloaded", extra=self._counts(keys))

    def _report(self, version: str, problem: str) -> None:
        if version != self._reported:
            self._reported = version
            log.error(
                "keys file change ignored; the last good keys stay in use",
                extra={"path": str(self.path), "error": problem},
            )

    def _read_or_raise(self) -> bytes:
        try:
            return self.path.read_bytes()
        except OSError as err:
            raise KeysFileError(f"keys file {self.path}: cannot be read: {err.strerror or err}") from None

    def _counts(self, keys: KeysFile) -> dict[str, object]:
        active = sum(1 for entry in keys.keys.values() if entry.revoked is None)
        return {"path": str(self.path), "keys": active, "revoked": len(keys.keys) - active}
