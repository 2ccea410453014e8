"""The demo's services, started with `up`'s launcher: free ports, the demo's store, logs to files.

Model caches and Ray's HOME (holding `ray_bootstrap_config.yaml` with a local provider, so Ray
never looks for a cloud) live in the demo's temporary work folder. The store is `--store`.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO

from demo.console import say
from services.launcher.base_model import ensure_base_model
from services.launcher.children import Child
from services.launcher.plan import SERVICES, Layout, Plan, ServicePlan, env_prefix, plan_services
from services.launcher.supervisor import ChildExited, LaunchError, Supervisor


class DemoError(Exception):
    """Something the person running the demo should read (no traceback needed)."""


def demo_layout(store_dir: Path, work_dir: Path) -> Layout:
    return Layout(store_dir, work_dir / "cache", work_dir / "ray-home")


def demo_plan(
    base_model: str, store_dir: Path, work_dir: Path, environ: Mapping[str, str] | None = None
) -> Plan:
    """`up`'s plan on free ports (gRPC and metrics), one training job at a time."""
    overrides = {"DREAMBOOTH_TRAINER_MAX_CONCURRENT_JOBS": "1"}
    for name in SERVICES:
        overrides[f"{env_prefix(name)}PORT"] = "0"  # 0: the launcher picks a free port
        overrides[f"{env_prefix(name)}METRICS_PORT"] = "0"  # 0: the service binds any free port
    environ = {**(os.environ if environ is None else environ), **overrides}
    return plan_services(demo_layout(store_dir, work_dir), base_model, environ)


class LogFiles:
    """A line sink writing each process's output to `<log_dir>/<name>.log`."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self._files: dict[str, IO[str]] = {}
        self._lock = threading.Lock()

    def path(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def write(self, name: str, line: str) -> None:
        with self._lock:
            file = self._files.get(name)
            if file is None:
                self.log_dir.mkdir(parents=True, exist_ok=True)
                file = self._files[name] = self.path(name).open("a", encoding="utf-8")
            file.write(line + "\n")
            file.flush()

    def close(self) -> None:
        with self._lock:
            for file in self._files.values():
                file.close()
            self._files.clear()

    def __enter__(self) -> LogFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def import_base_model(base_model: str, store_dir: Path, work_dir: Path, log_dir: Path) -> None:
    """The toy-world base as `base_model` in the demo's store, unless an earlier run put it there."""
    with LogFiles(log_dir) as logs:
        ensure_base_model(
            store_dir,
            base_model,
            env=os.environ,
            sink=logs.write,
            say=lambda text: say(f"  {text}"),
            scratch_dir=work_dir,
        )


@contextlib.contextmanager
def running_services(
    base_model: str, store_dir: Path, work_dir: Path, log_dir: Path, deadline: float
) -> Iterator[dict[str, ServicePlan]]:
    """The three services, SERVING, until the block ends; then they are stopped (only those)."""
    plan = demo_plan(base_model, store_dir, work_dir)
    demo_layout(store_dir, work_dir).prepare()

    def serving(service: ServicePlan, child: Child) -> None:
        say(f"  {service.name:<9} SERVING on {service.address} (pid {child.pid})")

    with LogFiles(log_dir) as logs, Supervisor(plan, logs.write) as supervisor:
        supervisor.start(SERVICES)
        try:
            supervisor.wait_serving(deadline, serving)
        except ChildExited as err:
            raise DemoError(
                f"{err} while starting; its log ({logs.path(err.child.name)}) ends with:\n{err.child.tail()}"
            ) from None
        except LaunchError as err:
            raise DemoError(f"{err}; see the logs under {log_dir}") from None
        try:
            yield plan.services
        finally:
            say("stopping the services")
            for problem in supervisor.stop():
                say(f"  {problem}")
