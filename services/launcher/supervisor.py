"""Start, watch and stop a set of services together: if one goes, they all go."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable

from services.launcher.children import Child, LineSink, describe_exit
from services.launcher.health import HealthProbe
from services.launcher.plan import Plan, ServicePlan

STOP_TIMEOUT_S = 60.0  # SIGTERM to exit: the services' grace (10 s) plus the trainer's Ray shutdown


class LaunchError(Exception):
    """The services could not be started or kept running; the message says why."""


class ChildExited(LaunchError):
    def __init__(self, child: Child) -> None:
        code = child.returncode
        how = describe_exit(code) if code is not None else "gone"
        super().__init__(f"{child.name} exited unexpectedly ({how})")
        self.child = child


class StopRequested(Exception):
    """A signal asked the launcher to stop while it was still starting."""


def service_argv(name: str) -> list[str]:
    return [sys.executable, "-m", "services.cli", name]


class Supervisor:
    """The children of one launch. Use as a context manager: leaving it stops them all."""

    def __init__(
        self,
        plan: Plan,
        sink: LineSink,
        *,
        argv: Callable[[str], list[str]] = service_argv,
        should_stop: Callable[[], bool] = lambda: False,
    ) -> None:
        self.plan = plan
        self.sink = sink
        self.argv = argv
        self.should_stop = should_stop
        self.children: dict[str, Child] = {}
        self.stop_problems: list[str] = []

    def __enter__(self) -> Supervisor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, names: Iterable[str]) -> None:
        for name in names:
            self.children[name] = Child(name, self.argv(name), self.plan.services[name].env, self.sink)

    def exited(self) -> Child | None:
        """The first child that is no longer running, if any."""
        return next((child for child in self.children.values() if not child.running()), None)

    def check(self) -> None:
        """Raise StopRequested when a stop was asked for, ChildExited when a child is gone."""
        if self.should_stop():
            raise StopRequested
        child = self.exited()
        if child is not None:
            raise ChildExited(child)

    def wait_serving(
        self,
        deadline: float,
        on_serving: Callable[[ServicePlan, Child], None] = lambda plan, child: None,
    ) -> None:
        """Poll each started service's health until SERVING; fail fast when a child exits."""
        pending = dict(self.children)
        with HealthProbe() as probe:
            while pending:
                for name in list(pending):
                    self.check()
                    plan = self.plan.services[name]
                    if probe.serving(plan.address):
                        on_serving(plan, pending.pop(name))
                if pending and time.monotonic() > deadline:
                    raise LaunchError(f"not SERVING in time: {', '.join(pending)}")
                if pending:
                    time.sleep(0.25)

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> list[str]:
        """SIGTERM every running child, wait, then end whatever is left of their sessions.

        Idempotent. Returns (and keeps in `stop_problems`) what did not stop cleanly.
        """
        running = [child for child in self.children.values() if child.running()]
        for child in running:
            child.terminate()
        deadline = time.monotonic() + timeout
        for child in running:
            code = child.wait(max(0.0, deadline - time.monotonic()))
            if code is None:
                self.stop_problems.append(f"{child.name} did not stop within {timeout:.0f} s: killed it")
            elif code != 0:
                self.stop_problems.append(f"{child.name} stopped with {describe_exit(code)}")
        for child in self.children.values():
            killed = child.end_session()
            if killed and child in running:
                pids = " ".join(map(str, killed))
                self.stop_problems.append(f"{child.name} left processes behind: killed {pids}")
        self.children.clear()
        return self.stop_problems
