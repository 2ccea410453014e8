"""One tenant's view of the object store: every key under its prefix, blobs shared.

    store = NamespacedStore(root, "tenants/acme/")
    store.put_json("jobs/3f9a0c2d1e7b/job.json", ...)   # root key tenants/acme/jobs/3f9a0c2d1e7b/job.json
    store.get_bytes("blobs/sha256/ab12...")            # root key blobs/sha256/ab12... (shared pool)

Code written for the root layout (datasets/, jobs/, priors/, models/) works unchanged on a
tenant's view, and cannot name a key outside it. Content-addressed blobs are the exception: one
pool, so a fine-tuned model shares its base's bytes; a blob is reachable only through a manifest,
and manifests are per tenant. Errors name keys as the tenant sees them, never the prefix.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from services.common.errors import NotFound
from services.common.object_store import ObjectInfo, ObjectStore, validate_key, validate_prefix
from services.common.tenancy import namespace_of

SHARED_PREFIXES = ("blobs/",)


class NamespacedStore(ObjectStore):
    def __init__(self, root: ObjectStore, namespace: str) -> None:
        if isinstance(root, NamespacedStore):
            raise ValueError("a namespace is taken from the root store, not from another namespace")
        if not namespace.endswith("/"):
            raise ValueError(f"a namespace ends with '/', got {namespace!r}")
        validate_prefix(namespace, "namespace")
        self.root = root
        self.namespace = namespace

    def __repr__(self) -> str:
        return f"NamespacedStore({self.root!r}, {self.namespace!r})"

    def _key(self, key: str) -> str:
        validate_key(key)
        return key if key.startswith(SHARED_PREFIXES) else self.namespace + key

    def put_bytes(self, key: str, data: bytes) -> None:
        self.root.put_bytes(self._key(key), data)

    def put_file(self, key: str, path: Path) -> None:
        self.root.put_file(self._key(key), path)

    def get_bytes(self, key: str) -> bytes:
        try:
            return self.root.get_bytes(self._key(key))
        except NotFound:
            raise NotFound(f"object {key!r}") from None

    def get_file(self, key: str, path: Path) -> None:
        try:
            self.root.get_file(self._key(key), path)
        except NotFound:
            raise NotFound(f"object {key!r}") from None

    def stat(self, key: str) -> ObjectInfo:
        try:
            info = self.root.stat(self._key(key))
        except NotFound:
            raise NotFound(f"object {key!r}") from None
        return ObjectInfo(key=key, size=info.size)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        validate_prefix(prefix)
        if prefix.startswith(SHARED_PREFIXES):
            return self.root.list(prefix)
        cut = len(self.namespace)
        return (
            ObjectInfo(key=info.key[cut:], size=info.size) for info in self.root.list(self.namespace + prefix)
        )

    def delete(self, key: str) -> None:
        self.root.delete(self._key(key))


def scoped_store(root: ObjectStore, tenant_name: str) -> ObjectStore:
    """The store as tenant `tenant_name` sees it: the root itself for the implicit tenant ("")."""
    namespace = namespace_of(tenant_name)
    return NamespacedStore(root, namespace) if namespace else root
