"""The S3 server stops in the middle of publishing a model (SIGSTOP: it hangs, as a crashed or
partitioned MinIO does). The model is never half-visible: either the publish retries with back-off
and succeeds once the store is back, or it fails with Unavailable naming the store, the model does
not exist, and publishing again later succeeds."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.common.errors import NotFound, Unavailable
from services.common.model_store import ModelStore
from services.common.retry import RetryPolicy
from services.common.s3_store import S3ObjectStore
from tests.fixtures.s3 import S3Server, run_weed

PAUSE_AT_BLOB = 2  # the store stops while the 2nd file of the model is being uploaded


@pytest.fixture(scope="module")
def private_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A server of these tests' own: it is stopped and continued, so no other test shares it."""
    with run_weed(tmp_path_factory.mktemp("weed")) as server:
        try:
            yield server
        finally:
            os.kill(server.pid, signal.SIGCONT)  # never leave it stopped


def _store(server: S3Server, max_total: float, bucket: str) -> S3ObjectStore:
    """Each test its own bucket: blobs are content-addressed, so a second publish of the same
    model into one bucket would upload nothing."""
    return S3ObjectStore(
        server.endpoint,
        server.access_key,
        server.secret_key,
        bucket,
        retry=RetryPolicy(max_attempts=20, initial_backoff=0.2, max_backoff=1.0, max_total=max_total),
        connect_timeout=1.0,
        read_timeout=1.5,
    )


class PausingStore:
    """Stops the server (SIGSTOP) on the n-th blob upload; continues it after `pause_s`."""

    def __init__(self, store: S3ObjectStore, pid: int, pause_s: float) -> None:
        self.store, self.pid, self.pause_s = store, pid, pause_s
        self.uploads = 0
        self.resumed = threading.Event()

    def __getattr__(self, name: str) -> object:
        return getattr(self.store, name)

    def put_file(self, key: str, path: Path) -> None:
        self.uploads += 1
        if self.uploads == PAUSE_AT_BLOB:
            os.kill(self.pid, signal.SIGSTOP)
            threading.Timer(self.pause_s, self._resume).start()
        self.store.put_file(key, path)

    def _resume(self) -> None:
        os.kill(self.pid, signal.SIGCONT)
        self.resumed.set()


def test_a_short_outage_mid_publish_is_retried_and_the_model_appears_whole(
    private_s3: S3Server, tiny_model_dir: Path, tmp_path: Path
) -> None:
    store = PausingStore(_store(private_s3, 60.0, "short"), private_s3.pid, pause_s=4.0)
    models = ModelStore(store, tmp_path / "cache")  # type: ignore[arg-type]
    models.import_folder(tiny_model_dir, "survivor")
    assert store.resumed.is_set()  # the outage really happened during the publish
    folder = ModelStore(_store(private_s3, 10.0, "short"), tmp_path / "cache-2").materialize("survivor")
    assert (folder / "model_index.json").is_file()  # every digest verified on the way


def test_a_long_outage_fails_clearly_and_leaves_no_model(
    private_s3: S3Server, tiny_model_dir: Path, tmp_path: Path
) -> None:
    store = PausingStore(_store(private_s3, 3.0, "long"), private_s3.pid, pause_s=12.0)
    models = ModelStore(store, tmp_path / "cache")  # type: ignore[arg-type]
    with pytest.raises(Unavailable) as info:
        models.import_folder(tiny_model_dir, "casualty")
    assert private_s3.endpoint in str(info.value)
    assert store.resumed.wait(30)
    healthy = ModelStore(_store(private_s3, 30.0, "long"), tmp_path / "cache-2")
    assert not healthy.exists("casualty")  # never half-visible: no manifest, no model
    with pytest.raises(NotFound):
        healthy.get("casualty")
    healthy.import_folder(tiny_model_dir, "casualty")  # publishing again, once the store is back
    assert healthy.get("casualty").files
