"""Connect the trainer to Ray: a local Ray started in-process by default, a cluster when asked.

A local Ray must stay offline: no usage-stats reports, no cloud-metadata probes, no node-IP
discovery through a public address. Those switches are environment variables that Ray reads in
every process it starts, so they are set (as defaults: an operator's explicit value wins) before
`ray.init`.
"""

from __future__ import annotations

import logging
import os
import subprocess
import threading

from services.trainer.driver.reaper import start_reaper, stop_reaper

LOCAL = "local"

# Read by Ray's processes at start-up. setdefault: an operator's explicit setting wins.
OFFLINE_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",  # no usage report (and no cloud-provider probing for it)
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # node IP = 127.0.0.1, not found via a public IP
    "RAY_AUTH_MODE": "disabled",
    "AWS_EC2_METADATA_DISABLED": "true",  # pyarrow/boto never ask 169.254.169.254 for credentials
    "GLOO_SOCKET_IFNAME": "lo",  # torch.distributed (gloo on CPU) over loopback
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1",  # the controller notices results/failures quickly
}

_lock = threading.Lock()
_started_local = False  # this process started the local Ray it is connected to
_reaper: subprocess.Popen[bytes] | None = None  # kills that Ray if this process is killed -9
log = logging.getLogger(__name__)


def apply_offline_env() -> None:
    for name, value in OFFLINE_ENV.items():
        os.environ.setdefault(name, value)


def connect_ray(address: str | None = None, *, num_cpus: int | None = None) -> None:
    """Make this process a Ray driver; a no-op when it already is one.

    `address` None, "" or "local" starts a private local Ray on 127.0.0.1 without a dashboard
    (`num_cpus` logical CPUs, default: all). Anything else connects to that cluster, e.g.
    "ray://head:10001" or "auto" (what RAY_ADDRESS holds under KubeRay).
    """
    global _started_local, _reaper
    if address in (None, "", LOCAL):
        apply_offline_env()  # before Ray reads its constants, when this is the first import of ray
    import ray

    with _lock:
        if ray.is_initialized():
            return
        if address in (None, "", LOCAL):
            ray.init(
                address=LOCAL,
                include_dashboard=False,
                num_cpus=num_cpus,
                _node_ip_address="127.0.0.1",
                logging_level=logging.WARNING,
                # Workers' output stays in Ray's session logs: the service logs structured
                # lines, and errors come back as exceptions anyway.
                log_to_driver=False,
                configure_logging=False,
            )
            _started_local = True
            _reaper = start_reaper()
            log.info("started local Ray with %s CPUs", ray.cluster_resources().get("CPU"))
        else:
            os.environ.setdefault(
                "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", OFFLINE_ENV["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"]
            )
            ray.init(address=address, logging_level=logging.WARNING, configure_logging=False)
            log.info("connected to Ray cluster at %s", address)


def is_local() -> bool:
    """Whether this process runs on a local Ray it started (fixed size: it cannot scale up)."""
    return _started_local


def disconnect_ray() -> None:
    """Shut down the Ray this process started or joined (only its own processes)."""
    global _started_local, _reaper
    import ray

    with _lock:
        if ray.is_initialized():
            ray.shutdown()
        _started_local = False
        if _reaper is not None:
            stop_reaper(_reaper)
            _reaper = None
