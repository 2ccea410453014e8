"""Settings from `DREAMBOOTH_*` environment variables, with defaults that run on one machine.

Each service has one frozen dataclass; `from_env` fills it. Settings are built once in the
service's entry point and passed down, never read deep in the code.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

T = TypeVar("T")

PREFIX = "DREAMBOOTH_"


class ConfigError(ValueError):
    """A setting the service cannot start with; the message is one line saying which and why."""


@dataclasses.dataclass(frozen=True)
class StoreSettings:
    """Where state lives. An empty `s3_endpoint` means the embedded local-directory store."""

    s3_endpoint: str = ""  # host:port of MinIO/S3, e.g. "minio:9000"
    s3_access_key: str = ""
    s3_secret_key: str = ""
    s3_bucket: str = "dreambooth"
    s3_secure: bool = False  # https
    s3_region: str = "us-east-1"
    store_dir: str = "./data/store"  # root of the local-directory store
    cache_dir: str = "./data/cache"  # local cache of materialised models (keyed by digest)
    # The tenant prefix a job's Ray workers open the store under (set per job by the trainer,
    # never from the environment): "" is the root. See services/common/tenancy.py.
    namespace: str = dataclasses.field(default="", metadata={"env": False})


@dataclasses.dataclass(frozen=True)
class AuthSettings:
    """Who may call the services; shared by all of them (DREAMBOOTH_API_KEYS_FILE, ...)."""

    api_keys_file: str = ""  # TOML of tenants and hashed keys; "" = one implicit tenant, no keys
    allow_unauthenticated: bool = False  # serve a non-loopback address without keys or mTLS


@dataclasses.dataclass(frozen=True)
class ServerSettings:
    """How a gRPC service listens. Port 0 picks a free port (tests)."""

    host: str = "127.0.0.1"
    port: int = 0
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 0
    grace_seconds: float = 10.0  # graceful-shutdown grace after SIGTERM
    tls_cert_file: str = ""  # PEM; TLS is on when both cert and key are set
    tls_key_file: str = ""
    tls_client_ca_file: str = ""  # PEM; when set (with TLS), clients must present a cert it signed
    max_message_bytes: int = 16 * 1024 * 1024


def _convert(raw: str, target: Any, name: str) -> Any:
    if target is bool:
        lowered = raw.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off", ""):
            return False
        raise ValueError(f"{name}: expected a boolean, got {raw!r}")
    if target in (int, float, str):
        try:
            return target(raw)
        except ValueError as err:
            raise ValueError(f"{name}: expected {target.__name__}, got {raw!r}") from err
    if typing.get_origin(target) is tuple:
        return tuple(part.strip() for part in raw.split(",") if part.strip())
    raise TypeError(f"{name}: unsupported settings type {target!r}")


def from_env(cls: type[T], prefix: str = PREFIX, env: Mapping[str, str] | None = None) -> T:
    """Build `cls` from `{prefix}{FIELD}` variables over its defaults.

    A nested ServerSettings reads the same prefix (DREAMBOOTH_INFERENCE_PORT sets
    `InferenceSettings.server.port`); a nested StoreSettings or AuthSettings reads the global one
    (DREAMBOOTH_S3_ENDPOINT, DREAMBOOTH_API_KEYS_FILE), since every service shares them.
    """
    return _overlay(cls(), prefix, os.environ if env is None else env)


def _overlay(base: T, prefix: str, env: Mapping[str, str]) -> T:
    hints = typing.get_type_hints(type(base))
    values: dict[str, Any] = {}
    for field in dataclasses.fields(base):  # type: ignore[arg-type]
        target = hints[field.name]
        if dataclasses.is_dataclass(target):
            nested_prefix = PREFIX if target in (StoreSettings, AuthSettings) else prefix
            values[field.name] = _overlay(getattr(base, field.name), nested_prefix, env)
            continue
        if not field.metadata.get("env", True):
            continue
        name = f"{prefix}{field.name.upper()}"
        if name in env:
            values[field.name] = _convert(env[name], target, name)
    return dataclasses.replace(base, **values)  # type: ignore[type-var]
