"""One contract, two backends: every test here runs against the local directory store and against
the S3 store talking to a real S3 server on loopback (tests/fixtures/s3.py)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from services.common.errors import InvalidArgument, NotFound, Unavailable
from services.common.local_store import LocalObjectStore
from services.common.object_store import ObjectInfo, ObjectStore
from services.common.retry import Backoff, RetryPolicy
from services.common.s3_store import S3ObjectStore
from services.common.settings import StoreSettings
from services.common.store_factory import open_store
from tests.fixtures.s3 import LOOPBACK, S3Server, free_port

FAST_RETRY = RetryPolicy(max_attempts=3, initial_backoff=0.01, max_backoff=0.05, max_total=5.0)


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest) -> ObjectStore:
    return request.getfixturevalue(f"{request.param}_store")


def keys_of(infos: Iterator[ObjectInfo]) -> list[str]:
    return [info.key for info in infos]


# Round trips


def test_bytes_round_trip_and_overwrite(store: ObjectStore) -> None:
    store.put_bytes("a/b/c.bin", b"first")
    assert store.get_bytes("a/b/c.bin") == b"first"
    store.put_bytes("a/b/c.bin", b"second, longer")
    assert store.get_bytes("a/b/c.bin") == b"second, longer"
    assert store.stat("a/b/c.bin") == ObjectInfo("a/b/c.bin", len(b"second, longer"))
    store.put_bytes("a/b/c.bin", b"3")  # shorter: no stale tail from the longer version
    assert store.get_bytes("a/b/c.bin") == b"3"


def test_empty_object(store: ObjectStore) -> None:
    store.put_bytes("empty", b"")
    assert store.get_bytes("empty") == b""
    assert store.stat("empty").size == 0
    assert keys_of(store.list()) == ["empty"]


def test_binary_bytes_survive(store: ObjectStore) -> None:
    data = bytes(range(256)) * 1000
    store.put_bytes("bin", data)
    assert store.get_bytes("bin") == data


def test_file_round_trip(store: ObjectStore, tmp_path: Path) -> None:
    source = tmp_path / "source.bin"
    source.write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    store.put_file("files/source.bin", source)
    target = tmp_path / "out" / "nested" / "copy.bin"  # parents are created
    store.get_file("files/source.bin", target)
    assert target.read_bytes() == source.read_bytes()
    assert store.stat("files/source.bin").size == source.stat().st_size
    assert sorted(p.name for p in target.parent.iterdir()) == ["copy.bin"]  # no temp left over


def test_get_file_replaces_an_existing_file(store: ObjectStore, tmp_path: Path) -> None:
    store.put_bytes("k", b"new")
    target = tmp_path / "target"
    target.write_bytes(b"old content that is longer")
    store.get_file("k", target)
    assert target.read_bytes() == b"new"


def test_json_round_trip(store: ObjectStore) -> None:
    value = {"b": [1, 2.5, None, True], "a": {"nested": "ü"}}
    store.put_json("jobs/j1/job.json", value)
    assert store.get_json("jobs/j1/job.json") == value
    assert json.loads(store.get_bytes("jobs/j1/job.json")) == value


# Missing keys


def test_missing_key_is_not_found_everywhere(store: ObjectStore, tmp_path: Path) -> None:
    store.put_bytes("present/x", b"x")
    for key in ("missing", "present/missing", "present", "present/x/deeper"):
        with pytest.raises(NotFound, match="not found"):
            store.get_bytes(key)
        with pytest.raises(NotFound):
            store.stat(key)
        with pytest.raises(NotFound):
            store.get_file(key, tmp_path / "never")
        with pytest.raises(NotFound):
            store.get_json(key)
        assert not store.exists(key)
    assert not (tmp_path / "never").exists()
    assert store.exists("present/x")


def test_not_found_names_the_key(store: ObjectStore) -> None:
    with pytest.raises(NotFound) as caught:
        store.get_bytes("models/nope/manifest.json")
    assert "models/nope/manifest.json" in str(caught.value)


# Listing


TRICKY_KEYS = ["a/b", "a/b+", "a/b-", "a/b.", "a/b2/c/d", "a/bz", "a+d", "a-c", "a.e", "ab/c", "b"]


def test_list_is_recursive_and_sorted_by_key(store: ObjectStore) -> None:
    for key in reversed(TRICKY_KEYS):
        store.put_bytes(key, key.encode())
    listed = list(store.list())
    assert keys_of(iter(listed)) == sorted(TRICKY_KEYS)  # byte order, '+-.' sort before '/'
    assert all(info.size == len(info.key) for info in listed)


def test_list_prefix_boundaries(store: ObjectStore) -> None:
    for key in TRICKY_KEYS:
        store.put_bytes(key, b"")
    assert keys_of(store.list("a/")) == ["a/b", "a/b+", "a/b-", "a/b.", "a/b2/c/d", "a/bz"]
    # A prefix is a string prefix, as in S3: "a/b" also matches "a/b2/..." and "a/bz".
    assert keys_of(store.list("a/b")) == ["a/b", "a/b+", "a/b-", "a/b.", "a/b2/c/d", "a/bz"]
    assert keys_of(store.list("a/b2/")) == ["a/b2/c/d"]
    assert keys_of(store.list("a")) == sorted(k for k in TRICKY_KEYS if k.startswith("a"))
    assert keys_of(store.list("ab/")) == ["ab/c"]
    assert keys_of(store.list("nothing/")) == []
    assert keys_of(store.list("a/b2/c/d")) == ["a/b2/c/d"]


def test_list_of_an_empty_store(store: ObjectStore) -> None:
    assert list(store.list()) == []
    assert list(store.list("models/")) == []


# Delete


def test_delete_is_idempotent(store: ObjectStore) -> None:
    store.put_bytes("d/x", b"1")
    store.put_bytes("d/y", b"2")
    store.delete("d/x")
    store.delete("d/x")
    store.delete("never/existed")
    with pytest.raises(NotFound):
        store.get_bytes("d/x")
    assert keys_of(store.list()) == ["d/y"]
    store.put_bytes("d/x", b"again")  # a deleted key can be written again
    assert store.get_bytes("d/x") == b"again"


def test_delete_prefix(store: ObjectStore) -> None:
    for key in ("models/m1/a", "models/m1/sub/b", "models/m10/a", "models/m2/a"):
        store.put_bytes(key, b"x")
    assert store.delete_prefix("models/m1/") == 2
    assert keys_of(store.list()) == ["models/m10/a", "models/m2/a"]
    assert store.delete_prefix("models/m1/") == 0
    assert store.delete_prefix("") == 2
    assert list(store.list()) == []


# Keys are validated before any I/O


BAD_KEYS = ["", "/abs", "a//b", "a/", "..", "../escape", "a/../b", "./a", "a\\b", "a b"]


def _operations(tmp_path: Path) -> dict[str, Callable[[ObjectStore, str], object]]:
    source = tmp_path / "source"
    source.write_bytes(b"data")
    return {
        "put_bytes": lambda s, k: s.put_bytes(k, b"x"),
        "put_file": lambda s, k: s.put_file(k, source),
        "put_json": lambda s, k: s.put_json(k, {}),
        "get_bytes": lambda s, k: s.get_bytes(k),
        "get_file": lambda s, k: s.get_file(k, tmp_path / "target"),
        "get_json": lambda s, k: s.get_json(k),
        "stat": lambda s, k: s.stat(k),
        "exists": lambda s, k: s.exists(k),
        "delete": lambda s, k: s.delete(k),
    }


@pytest.mark.parametrize("key", BAD_KEYS)
def test_invalid_keys_are_refused_by_every_method(store: ObjectStore, key: str, tmp_path: Path) -> None:
    for name, operation in _operations(tmp_path).items():
        with pytest.raises(InvalidArgument, match=r"^key: "):
            operation(store, key)
            pytest.fail(f"{name}({key!r}) was accepted")
    assert list(store.list()) == []
    assert not (tmp_path / "target").exists()


BAD_PREFIXES = ["/", "/abs", "a//", "../", "a/../b", "a b"]


@pytest.mark.parametrize("prefix", BAD_PREFIXES)
def test_invalid_prefixes_are_refused(store: ObjectStore, prefix: str) -> None:
    with pytest.raises(InvalidArgument, match=r"^prefix: "):
        store.list(prefix)
    with pytest.raises(InvalidArgument, match=r"^prefix: "):
        store.delete_prefix(prefix)


def test_invalid_keys_are_refused_before_any_network_io(tmp_path: Path) -> None:
    """Against a dead endpoint, a bad key still gives InvalidArgument (not Unavailable): proof
    that validation comes before the first request."""
    dead = S3ObjectStore(f"{LOOPBACK}:{free_port()}", "ak", "sk", "never-contacted", retry=FAST_RETRY)
    for key in BAD_KEYS:
        for operation in _operations(tmp_path).values():
            with pytest.raises(InvalidArgument):
                operation(dead, key)
    for prefix in BAD_PREFIXES:
        with pytest.raises(InvalidArgument):
            dead.list(prefix)
        with pytest.raises(InvalidArgument):
            dead.delete_prefix(prefix)


def test_local_store_writes_nothing_outside_its_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    store = LocalObjectStore(root)
    for key in BAD_KEYS:
        with pytest.raises(InvalidArgument):
            store.put_bytes(key, b"x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["root"]
    assert list(root.iterdir()) == []


# Atomicity and concurrency


def test_readers_see_old_or_new_never_partial(store: ObjectStore, tmp_path: Path) -> None:
    """While a writer keeps overwriting a key with two very different versions, every concurrent
    read returns exactly one of them."""
    versions = [b"A" * (2 * 1024 * 1024), b"B" * (512 * 1024 + 3)]
    store.put_bytes("atomic", versions[0])
    writes = 12
    done = threading.Event()
    seen: list[bytes] = []
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            for i in range(writes):
                if i % 3 == 2:
                    source = tmp_path / f"version-{i}"
                    source.write_bytes(versions[i % 2])
                    store.put_file("atomic", source)
                else:
                    store.put_bytes("atomic", versions[i % 2])
        except BaseException as err:
            errors.append(err)
        finally:
            done.set()

    def reader(index: int) -> None:
        try:
            n = 0
            while not done.is_set() or n < 2:
                if n % 2:
                    target = tmp_path / f"read-{index}"
                    store.get_file("atomic", target)
                    seen.append(target.read_bytes())
                else:
                    seen.append(store.get_bytes("atomic"))
                n += 1
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=writer)] + [
        threading.Thread(target=reader, args=(i,)) for i in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    assert seen
    assert {data for data in seen} <= set(versions), "a reader saw a partial object"
    assert store.get_bytes("atomic") == versions[(writes - 1) % 2]
    assert keys_of(store.list()) == ["atomic"]  # no temp object visible


def test_many_threads_share_one_store(store: ObjectStore) -> None:
    def work(i: int) -> None:
        for j in range(5):
            store.put_bytes(f"t/{i}/{j}", f"{i}-{j}".encode())
            assert store.get_bytes(f"t/{i}/{j}") == f"{i}-{j}".encode()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert len(list(store.list("t/"))) == 40


# S3 specifics: signatures, dead endpoints, transient errors


def test_wrong_credentials_give_a_clear_error(s3_server: S3Server, s3_store: S3ObjectStore) -> None:
    if not s3_server.checks_signatures:
        pytest.skip("moto's server accepts any credentials: cannot prove signatures are checked")
    s3_store.put_bytes("secret", b"x")
    wrong = S3ObjectStore(
        s3_server.endpoint, s3_server.access_key, "not-the-secret", s3_store.bucket, retry=FAST_RETRY
    )
    for operation in (lambda: wrong.get_bytes("secret"), lambda: wrong.put_bytes("other", b"y")):
        with pytest.raises(Unavailable, match="credentials") as caught:
            operation()
        assert s3_server.endpoint in str(caught.value)
    unknown = S3ObjectStore(s3_server.endpoint, "nobody", "nothing", s3_store.bucket, retry=FAST_RETRY)
    with pytest.raises(Unavailable, match="credentials"):
        unknown.list()
    assert keys_of(s3_store.list()) == ["secret"]


def test_dead_endpoint_is_unavailable_after_bounded_retries() -> None:
    endpoint = f"{LOOPBACK}:{free_port()}"  # nothing listens there
    store = S3ObjectStore(endpoint, "ak", "sk", "bucket", retry=FAST_RETRY)
    with pytest.raises(Unavailable) as caught:
        store.get_bytes("x")
    message = str(caught.value)
    assert endpoint in message
    assert f"after {FAST_RETRY.max_attempts} attempt(s)" in message


class _Listener:
    """A loopback TCP server for failure injection: counts connections; `handle` decides what
    each one gets (close at once, an HTTP error, or a pipe to the real server)."""

    def __init__(self, handle: Callable[[socket.socket, int], None]) -> None:
        self._handle = handle
        self._sock = socket.create_server((LOOPBACK, 0))
        self.endpoint = f"{LOOPBACK}:{self._sock.getsockname()[1]}"
        self.connections = 0
        self._lock = threading.Lock()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
                number = self.connections
            threading.Thread(target=self._handle, args=(conn, number), daemon=True).start()

    def close(self) -> None:
        self._sock.close()


def _slow_down(conn: socket.socket) -> None:
    body = (
        b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
        b"<Message>Please reduce your request rate.</Message></Error>"
    )
    with conn:
        if conn.recv(65536).startswith(b"HEAD "):  # "the bucket exists", so the PUT comes next
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            return
        conn.sendall(
            b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nConnection: close\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )


def _pipe(conn: socket.socket, upstream: str) -> None:
    host, port = upstream.split(":")
    remote = socket.create_connection((host, int(port)))

    def copy(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        for end in (src, dst):  # one side finished: finish the other too
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)

    threading.Thread(target=copy, args=(remote, conn), daemon=True).start()
    copy(conn, remote)


def test_connections_dropped_are_retried_then_unavailable() -> None:
    listener = _Listener(lambda conn, _n: conn.close())
    try:
        store = S3ObjectStore(listener.endpoint, "ak", "sk", "bucket", retry=FAST_RETRY)
        with pytest.raises(Unavailable, match="attempt"):
            store.stat("x")
        assert listener.connections == FAST_RETRY.max_attempts  # bounded: no retry storm
    finally:
        listener.close()


def test_slow_down_is_retried_then_unavailable() -> None:
    listener = _Listener(lambda conn, _n: _slow_down(conn))
    try:
        store = S3ObjectStore(listener.endpoint, "ak", "sk", "bucket", retry=FAST_RETRY)
        with pytest.raises(Unavailable, match="SlowDown"):
            store.put_bytes("x", b"1")
        assert listener.connections == 1 + FAST_RETRY.max_attempts  # HEAD bucket, then the PUTs
    finally:
        listener.close()


def test_transient_errors_are_retried_until_success(s3_server: S3Server, s3_store: S3ObjectStore) -> None:
    """The first connections get 503 SlowDown, the next are piped to the real server: the store
    retries through the outage and the operations succeed (signatures still match: the Host
    header the client signed is forwarded unchanged)."""
    failing = 2
    listener = _Listener(
        lambda conn, n: _slow_down(conn) if n <= failing else _pipe(conn, s3_server.endpoint)
    )
    try:
        retry = RetryPolicy(max_attempts=5, initial_backoff=0.01, max_backoff=0.05, max_total=20.0)
        flaky = S3ObjectStore(
            listener.endpoint, s3_server.access_key, s3_server.secret_key, s3_store.bucket, retry=retry
        )
        flaky.put_bytes("through/outage", b"made it")
        assert s3_store.get_bytes("through/outage") == b"made it"
        assert flaky.get_bytes("through/outage") == b"made it"
        assert listener.connections > failing
    finally:
        listener.close()


def test_backoff_is_capped_jittered_and_bounded_in_attempts_and_time() -> None:
    now = [0.0]
    policy = RetryPolicy(max_attempts=6, initial_backoff=0.5, max_backoff=2.0, max_total=4.0)
    backoff = Backoff(policy, clock=lambda: now[0], rng=lambda: 1.0)  # rng 1.0: the cap itself
    delays = []
    while (delay := backoff.next_delay()) is not None:
        delays.append(delay)
        now[0] += delay
    assert delays == [0.5, 1.0, 2.0]  # doubling, then the next (2.0) would pass max_total
    assert backoff.attempts == 4
    jittered = Backoff(RetryPolicy(max_attempts=3), rng=lambda: 0.25)
    assert jittered.next_delay() == pytest.approx(0.25 * RetryPolicy().initial_backoff)
    assert jittered.next_delay() is not None
    assert jittered.next_delay() is None  # max_attempts reached


# The factory


def test_open_store_picks_local_without_endpoint(tmp_path: Path) -> None:
    store = open_store(StoreSettings(store_dir=str(tmp_path / "s")))
    assert isinstance(store, LocalObjectStore)
    store.put_bytes("k", b"v")
    assert (tmp_path / "s" / "k").read_bytes() == b"v"


def test_open_store_picks_s3_with_endpoint(s3_store_settings: StoreSettings, s3_store: S3ObjectStore) -> None:
    store = open_store(s3_store_settings)
    assert isinstance(store, S3ObjectStore)
    store.put_bytes("via/settings", b"v")
    assert s3_store.get_bytes("via/settings") == b"v"  # same bucket as the s3_store fixture


# Large objects stream: 200 MB through put_file/get_file with bounded memory


BIG_TRANSFER = r"""
import hashlib, json, os, resource, sys
from pathlib import Path
from services.common.local_store import LocalObjectStore
from services.common.s3_store import S3ObjectStore

kind, workdir, size = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
if kind == "s3":
    store = S3ObjectStore(os.environ["T_ENDPOINT"], os.environ["T_ACCESS"], os.environ["T_SECRET"],
                          os.environ["T_BUCKET"])
    store.ensure_bucket()
else:
    store = LocalObjectStore(workdir / "store")
source, target = workdir / "big.src", workdir / "big.dst"
digest = hashlib.sha256()
chunk = os.urandom(1024 * 1024)
with open(source, "wb") as out:
    for i in range(size // len(chunk)):
        block = i.to_bytes(8, "big") + chunk[8:]  # every MiB differs: a misplaced block is caught
        digest.update(block)
        out.write(block)
del chunk, block


def peak_rss() -> int:
    # VmHWM is this process's own high-water mark; ru_maxrss would also count the pytest
    # process this one was forked from (Linux keeps the pre-exec peak).
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


before = peak_rss()
store.put_file("big/object", source)
stat_size = store.stat("big/object").size
store.get_file("big/object", target)
after = peak_rss()
received = hashlib.sha256()
with open(target, "rb") as f:
    while block := f.read(1024 * 1024):
        received.update(block)
print(json.dumps({"sent": digest.hexdigest(), "received": received.hexdigest(), "size": stat_size,
                  "rss_before": before, "rss_after": after}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["local", "s3"])
def test_200mb_round_trip_streams_with_bounded_memory(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    size = 200 * 1024 * 1024
    env = dict(os.environ)
    if kind == "s3":
        server: S3Server = request.getfixturevalue("s3_server")
        bucket_store: S3ObjectStore = request.getfixturevalue("s3_store")
        env.update(
            T_ENDPOINT=server.endpoint,
            T_ACCESS=server.access_key,
            T_SECRET=server.secret_key,
            T_BUCKET=bucket_store.bucket,
        )
    # A subprocess so its peak RSS measures this transfer alone, not the test session.
    result = subprocess.run(
        [sys.executable, "-c", BIG_TRANSFER, kind, str(tmp_path), str(size)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["size"] == size
    assert report["received"] == report["sent"]
    growth = report["rss_after"] - report["rss_before"]
    assert report["rss_before"] < 200 * 1024 * 1024, report  # the measure is of this process alone
    print(f"{kind}: 200 MiB round trip, peak RSS growth {growth / 2**20:.1f} MiB")  # shown with -s
    assert growth < 64 * 1024 * 1024, f"peak RSS grew by {growth / 2**20:.0f} MiB moving 200 MiB"
