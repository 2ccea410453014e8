"""Pick the object store backend from settings: S3 when an endpoint is set, else a local directory."""

from __future__ import annotations

from pathlib import Path

from services.common.local_store import LocalObjectStore
from services.common.namespaced_store import NamespacedStore
from services.common.object_store import ObjectStore
from services.common.s3_store import S3ObjectStore
from services.common.settings import StoreSettings


def open_store(settings: StoreSettings) -> ObjectStore:
    """The store, seen through `settings.namespace` when it names a tenant's prefix."""
    root = _open_root(settings)
    return NamespacedStore(root, settings.namespace) if settings.namespace else root


def _open_root(settings: StoreSettings) -> ObjectStore:
    if settings.s3_endpoint:
        return S3ObjectStore(
            settings.s3_endpoint,
            settings.s3_access_key,
            settings.s3_secret_key,
            settings.s3_bucket,
            secure=settings.s3_secure,
            region=settings.s3_region,
        )
    return LocalObjectStore(Path(settings.store_dir))
