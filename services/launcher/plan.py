"""What `up` starts: each service's address and environment.

Everything a service reads still comes from its usual `DREAMBOOTH_*` variables (ports, hosts,
batch sizes, log level...), with these differences, which make the three one local system:
- the store is the local directory `<data>/store` and each service caches models under
  `<data>/cache/<service>` (no two processes share a cache folder); `DREAMBOOTH_S3_ENDPOINT`,
  `RAY_ADDRESS` and `DREAMBOOTH_TRAINER_RAY_ADDRESS` are dropped (with a note), so the trainer
  starts a private local Ray, offline: Ray's switches below, and the trainer's HOME is
  `<data>/ray-home`, holding `ray_bootstrap_config.yaml` with a local provider so Ray never
  probes for a cloud;
- the trainer calls the priorgen started beside it, and the inference service warms up the
  base model `up` was given;
- a port of 0 is replaced by a free port chosen here, so `up` knows every address.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

SERVICES = ("priorgen", "trainer", "inference")  # start order: the trainer calls priorgen
# The defaults of services/<service>/settings.py (the README's table): used when no
# DREAMBOOTH_<SERVICE>_PORT is set. tests/unit/test_launcher_plan.py checks they agree.
DEFAULT_PORTS = {"trainer": 50051, "priorgen": 50052, "inference": 50053}
DEFAULT_HOST = "127.0.0.1"
WILDCARD_HOSTS = {"0.0.0.0": "127.0.0.1", "::": "::1", "[::]": "::1", "": "127.0.0.1"}

# Ray must never reach for a network it does not have (usage stats, cloud metadata, public IPs).
# setdefault: an explicit value in the environment wins.
RAY_OFFLINE_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "disabled",
    "AWS_EC2_METADATA_DISABLED": "true",
    "GLOO_SOCKET_IFNAME": "lo",
}
# Point away from the local system `up` runs: dropped, with a note.
DROPPED_ENV = ("DREAMBOOTH_S3_ENDPOINT", "RAY_ADDRESS", "DREAMBOOTH_TRAINER_RAY_ADDRESS")
RAY_BOOTSTRAP = "provider:\n  type: local\n"


class PlanError(Exception):
    """A setting `up` cannot run with; the message says which and why."""


@dataclass(frozen=True)
class Layout:
    """Where the services keep their state on this machine."""

    store_dir: Path
    cache_root: Path  # one folder per service under it
    ray_home: Path

    @classmethod
    def under(cls, data_dir: Path) -> Layout:
        data_dir = Path(data_dir).resolve()
        return cls(data_dir / "store", data_dir / "cache", data_dir / "ray-home")

    def prepare(self) -> None:
        for folder in (self.store_dir, self.cache_root, self.ray_home):
            folder.mkdir(parents=True, exist_ok=True)
        bootstrap = self.ray_home / "ray_bootstrap_config.yaml"
        if not bootstrap.exists():
            bootstrap.write_text(RAY_BOOTSTRAP)


@dataclass(frozen=True)
class ServicePlan:
    name: str
    host: str  # what the service binds
    port: int
    env: Mapping[str, str] = field(repr=False)

    @property
    def address(self) -> str:
        """Where to dial it from this machine (a wildcard bind is reached on loopback)."""
        host = WILDCARD_HOSTS.get(self.host, self.host).strip("[]")
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"


@dataclass(frozen=True)
class Plan:
    services: dict[str, ServicePlan]
    notes: list[str]  # environment variables overridden or ignored, for the person running `up`


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def env_prefix(name: str) -> str:
    return f"DREAMBOOTH_{name.upper()}_"


def _port(name: str, environ: Mapping[str, str], pick: Callable[[], int]) -> int:
    variable = f"{env_prefix(name)}PORT"
    raw = environ.get(variable, "").strip()
    if not raw:
        return DEFAULT_PORTS[name]
    try:
        port = int(raw)
    except ValueError:
        raise PlanError(f"{variable}: expected a port number, got {raw!r}") from None
    if not 0 <= port <= 65535:
        raise PlanError(f"{variable}: {port} is not a port number")
    return port or pick()


def plan_services(
    layout: Layout,
    base_model: str,
    environ: Mapping[str, str] | None = None,
    *,
    pick_port: Callable[[], int] = free_port,
) -> Plan:
    """The three services' addresses and environments over `environ` (default: os.environ)."""
    environ = dict(os.environ if environ is None else environ)
    notes = []
    for variable in DROPPED_ENV:
        if environ.pop(variable, ""):
            notes.append(f"{variable} is ignored: up runs the local store and a local Ray")
    for variable, value in (
        ("DREAMBOOTH_STORE_DIR", str(layout.store_dir)),
        ("DREAMBOOTH_CACHE_DIR", str(layout.cache_root)),
    ):
        if environ.get(variable, value) != value:
            notes.append(f"{variable} is ignored: up uses {value} (set --data-dir instead)")
        environ[variable] = value
    for variable, value in RAY_OFFLINE_ENV.items():
        environ.setdefault(variable, value)

    binds: dict[str, tuple[str, int]] = {}
    for name in SERVICES:
        prefix = env_prefix(name)
        tls = [v for v in (f"{prefix}TLS_CERT_FILE", f"{prefix}TLS_KEY_FILE") if environ.get(v)]
        if tls:
            raise PlanError(
                f"{' and '.join(tls)} set: up serves plaintext (it checks health without TLS); "
                f"unset them, or run `dreambooth-server {name}` on its own for TLS"
            )
        host = environ.get(f"{prefix}HOST", "").strip() or DEFAULT_HOST
        binds[name] = (host, _port(name, environ, pick_port))
    taken: dict[int, str] = {}
    for name, (_, port) in binds.items():
        if port in taken:
            raise PlanError(f"{taken[port]} and {name} are both set to port {port}")
        taken[port] = name

    priorgen = ServicePlan("priorgen", *binds["priorgen"], env={})
    own_env = {
        "priorgen": {},
        "trainer": {
            "DREAMBOOTH_TRAINER_PRIORGEN_ADDRESS": priorgen.address,
            "HOME": str(layout.ray_home),  # holds ray_bootstrap_config.yaml (local provider)
        },
        "inference": {"DREAMBOOTH_INFERENCE_DEFAULT_MODEL": base_model},
    }
    services = {}
    for name, (host, port) in binds.items():
        env = {
            **environ,
            "DREAMBOOTH_CACHE_DIR": str(layout.cache_root / name),
            f"{env_prefix(name)}PORT": str(port),
            **own_env[name],
        }
        services[name] = ServicePlan(name, host, port, env)
    return Plan(services, notes)
