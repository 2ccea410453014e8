"""Tenants: who owns a resource, what they may use, and where their objects live in the store.

A tenant is a team with its own API keys (services/common/api_keys.py). Everything it owns lives
under its own prefix of the store, so a lookup made for one tenant never reads another's keys:

    tenants/{name}/datasets/...  jobs/...  priors/...  models/{id}/manifest.json  (its own)
    models/{id}/manifest.json                                   shared base models (operator-imported)
    blobs/sha256/{digest}                                       content-addressed bytes, one pool

The zero-config default (no keys file) has one implicit tenant, whose prefix is the store's root:
a store written before tenants existed reads exactly as before.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from services.common.errors import InvalidArgument, PermissionDenied, ResourceExhausted

TENANTS_ROOT = "tenants/"
TENANT_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
IMPLICIT_LABEL = "default"  # how the implicit tenant appears in metrics and usage


def validate_tenant_name(name: str, field_name: str = "tenant") -> str:
    if not isinstance(name, str) or not TENANT_NAME.match(name):
        raise InvalidArgument(
            field_name,
            f"tenant name {name!r} must be 1-63 characters of lowercase letters, digits or '-', "
            "starting with a letter or digit",
        )
    return name


def namespace_of(tenant_name: str) -> str:
    """The store prefix of a tenant's objects: "" for the implicit tenant (""), else tenants/{name}/."""
    return f"{TENANTS_ROOT}{tenant_name}/" if tenant_name else ""


@dataclass(frozen=True)
class Quotas:
    """Per-tenant limits from the keys file; 0 means no limit."""

    max_concurrent_jobs: int = 0  # training jobs not yet final (queued or running)
    max_generate_streams: int = 0  # Generate calls in flight at once
    max_stored_bytes: int = 0  # datasets, priors, job records, checkpoints and own models


@dataclass(frozen=True)
class Tenant:
    """The caller of one RPC, as the auth interceptor resolved it.

    `name` is "" for the implicit tenant of a server without a keys file. `admin` comes from the
    key used; `internal` marks service identities (the trainer calling priorgen), which may act
    on behalf of another tenant.
    """

    name: str
    admin: bool = False
    internal: bool = False
    quotas: Quotas = field(default_factory=Quotas)

    @property
    def namespace(self) -> str:
        return namespace_of(self.name)

    @property
    def label(self) -> str:
        """The name shown in metrics, usage and logs."""
        return self.name or IMPLICIT_LABEL

    @property
    def implicit(self) -> bool:
        return not self.name


# No keys file: every caller is the one tenant of the installation, with every right.
IMPLICIT_TENANT = Tenant(name="", admin=True, internal=True)


def owner_for(caller: Tenant, requested: str, field_name: str = "tenant") -> str:
    """The tenant a caller acts for: itself, or (service identities only) the one it names."""
    if not requested or requested == caller.name:
        return caller.name
    validate_tenant_name(requested, field_name)
    if not caller.internal:
        raise PermissionDenied(f"{field_name}: only a service identity may act for another tenant")
    return requested


def quota_exceeded(tenant: Tenant, quota: str, detail: str) -> ResourceExhausted:
    """RESOURCE_EXHAUSTED naming the quota, e.g. `quota max_concurrent_jobs (2) of tenant 'acme'`."""
    limit = getattr(tenant.quotas, quota)
    return ResourceExhausted(f"quota {quota} ({limit}) of tenant {tenant.label!r} reached: {detail}")
