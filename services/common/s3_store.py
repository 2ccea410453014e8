"""ObjectStore over MinIO / any S3 server, through the `minio` SDK.

A PUT is atomic in S3 (readers see the old object or the whole new one), so writes need no
temp-and-rename dance on the server; downloads to a local file still go through a temp file.
Transient failures (connection errors, timeouts, 5xx, SlowDown) are retried with backoff here,
in one place, and the SDK's own urllib3 retries are off so the two never multiply.
"""

from __future__ import annotations

import io
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import urllib3
from minio import Minio
from minio.error import InvalidResponseError, S3Error, ServerError

from services.common.errors import NotFound, Unavailable
from services.common.local_store import write_file_atomically
from services.common.object_store import ObjectInfo, ObjectStore, validate_key, validate_prefix
from services.common.retry import Backoff, RetryPolicy, call_with_retry

T = TypeVar("T")

_MISSING_CODES = frozenset({"NoSuchKey", "NoSuchBucket", "NoSuchObject"})
_CREDENTIAL_CODES = frozenset(
    {
        "AccessDenied",
        "SignatureDoesNotMatch",
        "InvalidAccessKeyId",
        "InvalidToken",
        "ExpiredToken",
        "AuthorizationHeaderMalformed",
    }
)
_TRANSIENT_CODES = frozenset(
    {"SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout", "XMinioServerNotInitialized"}
)
_CHUNK = 1024 * 1024
# Multipart: the SDK holds about (parallel uploads + 1) parts in memory at once, so this bounds
# the memory of an upload whatever the file size.
_PART_SIZE = 8 * 1024 * 1024
_PARALLEL_UPLOADS = 2


def is_transient(err: BaseException) -> bool:
    """True for failures worth retrying: the network, timeouts, 5xx and throttling."""
    if isinstance(err, S3Error):
        status = getattr(err.response, "status", 0) or 0
        return err.code in _TRANSIENT_CODES or status >= 500 or status == 429
    if isinstance(err, ServerError):
        return err.status_code >= 500 or err.status_code == 429
    if isinstance(err, InvalidResponseError):
        status = getattr(err, "_code", 0) or 0  # the SDK keeps the HTTP status private
        return status >= 500 or status == 429
    return isinstance(err, (urllib3.exceptions.HTTPError, ConnectionError, TimeoutError))


class S3ObjectStore(ObjectStore):
    """Objects live in one bucket, created on first use if missing (so a service may start
    before its object store is up and still work once it is)."""

    def __init__(
        self,
        endpoint: str,
        access_key: str,
        secret_key: str,
        bucket: str,
        secure: bool = False,
        region: str = "us-east-1",
        *,
        retry: RetryPolicy | None = None,
        connect_timeout: float = 3.0,
        read_timeout: float = 120.0,
    ) -> None:
        # Accept "http://host:port" too: people paste URLs; the SDK wants host:port.
        if endpoint.startswith(("http://", "https://")):
            secure = endpoint.startswith("https://")
            endpoint = endpoint.split("://", 1)[1]
        endpoint = endpoint.rstrip("/")
        self.endpoint = endpoint
        self.bucket = bucket
        self.region = region
        self.url = f"{'https' if secure else 'http'}://{endpoint}"
        self.retry = retry or RetryPolicy()
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=connect_timeout, read=read_timeout),
            maxsize=16,  # several threads share one store
            retries=False,  # retried above the SDK, with one policy (see module docstring)
        )
        self._client = Minio(
            endpoint,
            access_key=access_key or None,
            secret_key=secret_key or None,
            secure=secure,
            region=region,  # known region: the SDK skips its GetBucketLocation round trip
            http_client=http,
        )
        self._bucket_ready = False
        self._bucket_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"S3ObjectStore({self.url!r}, bucket={self.bucket!r})"

    # ObjectStore

    def put_bytes(self, key: str, data: bytes) -> None:
        validate_key(key)
        self._call(
            f"put {key!r}",
            lambda: self._client.put_object(self.bucket, key, io.BytesIO(data), len(data)),
        )

    def put_file(self, key: str, path: Path) -> None:
        validate_key(key)
        self._call(
            f"upload {key!r}",
            lambda: self._client.fput_object(
                self.bucket, key, str(path), part_size=_PART_SIZE, num_parallel_uploads=_PARALLEL_UPLOADS
            ),
        )

    def get_bytes(self, key: str) -> bytes:
        validate_key(key)

        def read() -> bytes:
            response = self._client.get_object(self.bucket, key)
            try:
                return response.read()
            finally:
                response.close()
                response.release_conn()

        return self._call(f"get {key!r}", read, missing=key)

    def get_file(self, key: str, path: Path) -> None:
        validate_key(key)
        target = Path(path)

        def download() -> None:
            response = self._client.get_object(self.bucket, key)
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                write_file_atomically(target, lambda out: shutil.copyfileobj(response, out, _CHUNK))
            finally:
                response.close()
                response.release_conn()

        self._call(f"download {key!r}", download, missing=key)

    def stat(self, key: str) -> ObjectInfo:
        validate_key(key)
        info = self._call(f"stat {key!r}", lambda: self._client.stat_object(self.bucket, key), missing=key)
        if info.is_dir:  # filer-backed servers (SeaweedFS) may answer HEAD on a "directory"
            raise NotFound(f"object {key!r}")
        return ObjectInfo(key=key, size=int(info.size or 0))

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        validate_prefix(prefix)

        def list_all() -> list[ObjectInfo]:
            objects = self._client.list_objects(self.bucket, prefix=prefix or None, recursive=True)
            return [
                ObjectInfo(key=obj.object_name, size=int(obj.size or 0))
                for obj in objects
                if not obj.is_dir and obj.object_name
            ]

        # Sorted here too: S3 promises UTF-8 order, but not every S3-compatible server keeps it.
        found = self._call(f"list {prefix!r}", list_all)
        return iter(sorted(found, key=lambda info: info.key))

    def delete(self, key: str) -> None:
        validate_key(key)

        def remove() -> None:
            try:
                self._client.remove_object(self.bucket, key)
            except S3Error as err:
                if err.code not in _MISSING_CODES:
                    raise

        self._call(f"delete {key!r}", remove)

    # Plumbing

    def ensure_bucket(self) -> None:
        """Create the bucket if it is missing; later calls are free. Raises Unavailable."""
        if self._bucket_ready:
            return
        with self._bucket_lock:
            if not self._bucket_ready:
                self._retrying(f"create bucket {self.bucket!r}", self._create_bucket_if_missing, None)
                self._bucket_ready = True

    def _create_bucket_if_missing(self) -> None:
        if self._client.bucket_exists(self.bucket):
            return
        try:
            self._client.make_bucket(self.bucket, location=self.region)
        except S3Error as err:  # another process created it between our two calls
            if err.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise

    def _call(self, what: str, operation: Callable[[], T], missing: str | None = None) -> T:
        self.ensure_bucket()
        return self._retrying(what, operation, missing)

    def _retrying(self, what: str, operation: Callable[[], T], missing: str | None) -> T:
        def give_up(err: Exception, backoff: Backoff) -> Exception:
            return self._domain_error(what, err, backoff, missing)

        return call_with_retry(operation, self.retry, is_transient, give_up=give_up)

    def _domain_error(self, what: str, err: Exception, backoff: Backoff, missing: str | None) -> Exception:
        """Word a failure for people: which store, which operation, what to check."""
        where = f"object store {self.url} (bucket {self.bucket!r})"
        if isinstance(err, S3Error):
            if missing is not None and err.code in _MISSING_CODES:
                return NotFound(f"object {missing!r}")
            if err.code in _CREDENTIAL_CODES:
                return Unavailable(
                    f"{where} refused our credentials ({err.code}) on {what}: "
                    "check the S3 access key and secret key settings"
                )
        if is_transient(err):
            return Unavailable(
                f"{where} is unavailable: {what} failed after {backoff.attempts} attempt(s) "
                f"in {backoff.elapsed:.1f}s: {_describe(err)}"
            )
        if isinstance(err, (S3Error, ServerError, InvalidResponseError)):
            return Unavailable(f"{where}: {what} failed: {_describe(err)}")
        return err  # a local problem (e.g. the target file), not the store's: keep its type


def _describe(err: Exception) -> str:
    if isinstance(err, S3Error):
        return f"{err.code}: {err.message}"
    if isinstance(err, urllib3.exceptions.MaxRetryError) and err.reason is not None:
        err = err.reason  # type: ignore[assignment]
    return f"{type(err).__name__}: {err}"
