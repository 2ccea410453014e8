"""`dreambooth-server up`: trainer, priorgen and inference in one command, on one machine.

Each service runs as a child process (`dreambooth-server <service>`, its own session), on the
local store under --data-dir and a private local Ray. Their output becomes one stream, each line
prefixed with the service's name. On first start, a store without a base model gets the tiny
Stable Diffusion. "ready" is printed once every service's gRPC health says SERVING.

Ctrl-C or SIGTERM stops all three gracefully (exit 0). If one service exits on its own, the
others are stopped and `up` exits 1. Exit 2: a setting, or a store without the base model asked
for, that `up` cannot run with (nothing is started).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import TextIO

from services.common.errors import DomainError
from services.launcher.base_model import TOY_WORLD_BASE_ID, BaseModelError, import_base_model, needs_import
from services.launcher.children import Child
from services.launcher.plan import DEFAULT_PORTS, Layout, Plan, PlanError, ServicePlan, plan_services
from services.launcher.supervisor import (
    ChildExited,
    LaunchError,
    StopRequested,
    Supervisor,
    service_argv,
)

PROG = "dreambooth-server up"
DEFAULT_BASE_MODEL = TOY_WORLD_BASE_ID
NAME_WIDTH = len("[tiny-model]")  # the longest name in the stream

EPILOG = f"""\
ports and other settings come from the services' usual variables, e.g.
  DREAMBOOTH_TRAINER_PORT ({DEFAULT_PORTS["trainer"]}), DREAMBOOTH_PRIORGEN_PORT \
({DEFAULT_PORTS["priorgen"]}), DREAMBOOTH_INFERENCE_PORT ({DEFAULT_PORTS["inference"]}),
  DREAMBOOTH_<SERVICE>_HOST (127.0.0.1), DREAMBOOTH_<SERVICE>_METRICS_PORT (9181, 9182, 9183);
  a port of 0 means any free port.
up always uses the local store under --data-dir and a local Ray: DREAMBOOTH_S3_ENDPOINT and
RAY_ADDRESS are ignored.
"""


class LogStream:
    """One output stream for every process: `[name] line`, whole lines, flushed at once."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self._lock = threading.Lock()

    def line(self, name: str, text: str) -> None:
        with self._lock:
            self.stream.write(f"{f'[{name}]':<{NAME_WIDTH}} {text}\n")
            self.stream.flush()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=__doc__.split("\n\n")[0].split(": ", 1)[1],
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path("data"),
        help="the store (DIR/store), model caches (DIR/cache) and Ray's home (DIR/ray-home); default ./data",
    )
    parser.add_argument(
        "--base-model-id",
        default=os.environ.get("DREAMBOOTH_INFERENCE_DEFAULT_MODEL") or DEFAULT_BASE_MODEL,
        help="the base model inference loads at start; an empty store gets the committed toy-world base "
        "under this id (the tiny random model when it is tiny-sd) "
        f"(default: DREAMBOOTH_INFERENCE_DEFAULT_MODEL, else {DEFAULT_BASE_MODEL})",
    )
    parser.add_argument(
        "--start-timeout", type=float, default=600.0, help="seconds until every service is SERVING (600)"
    )
    return parser.parse_args(argv)


def usage_lines(plan: Plan, base_model: str) -> list[str]:
    """How to reach the services with the `dreambooth` CLI, addresses included when not the default."""
    services = plan.services
    flags = ""
    for name in ("trainer", "inference"):
        if services[name].address != f"127.0.0.1:{DEFAULT_PORTS[name]}":
            flags += f" --{name} {services[name].address}"
    return [
        f"try:  dreambooth{flags} models list",
        f'      dreambooth{flags} generate --model {base_model} --prompt "a photo of a ball" --steps 10 '
        "--out out/",
        f"      dreambooth{flags} train --base-model {base_model} --dataset PHOTOS_DIR "
        '--instance-prompt "a photo of sks ball" --resolution 64 --wait',
        "Ctrl-C stops all three.",
    ]


class Up:
    """One run of the command: signals in, one log stream out, an exit status."""

    def __init__(
        self,
        args: argparse.Namespace,
        out: LogStream,
        argv: Callable[[str], list[str]] = service_argv,
    ) -> None:
        self.args = args
        self.out = out
        self.argv = argv  # the command of each service (tests run stand-ins)
        self.signals: list[str] = []  # set by the handler; the main loop reports them

    def say(self, text: str) -> None:
        self.out.line("up", text)

    def on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.signals.append(signal.Signals(signum).name)  # nothing else here: no locks in a handler

    def stop_requested(self) -> bool:
        return bool(self.signals)

    def run(self) -> int:
        try:
            layout, plan, import_needed = self._prepare()
        except (PlanError, BaseModelError, DomainError) as err:
            self.say(f"error: {err}")
            return 2
        supervisor = Supervisor(plan, self.out.line, argv=self.argv, should_stop=self.stop_requested)
        try:
            status = self._serve(supervisor, layout, plan, import_needed)
        finally:
            if self.signals:
                self.say(f"{self.signals[0]}: stopping the services")
            problems = supervisor.stop()
        for problem in problems:
            self.say(f"error: {problem}")
        if problems:
            return 1
        self.say("stopped" if status == 0 else "stopped; exiting with status 1")
        return status

    def _prepare(self) -> tuple[Layout, Plan, bool]:
        """The plan and the data dir; whether the base model must be imported. Starts nothing."""
        layout = Layout.under(self.args.data_dir)
        plan = plan_services(layout, self.args.base_model_id)
        for note in plan.notes:
            self.say(f"note: {note}")
        layout.prepare()
        self.say(f"data in {layout.store_dir.parent} (store, per-service model caches, Ray's home)")
        import_needed = needs_import(layout.store_dir, self.args.base_model_id)
        if not import_needed:
            self.say(f"base model {self.args.base_model_id} is in the store")
        return layout, plan, import_needed

    def _serve(self, supervisor: Supervisor, layout: Layout, plan: Plan, import_needed: bool) -> int:
        """Start, wait for SERVING, watch until a signal (0) or a failure (1). Stopping is the caller's."""
        started = time.monotonic()
        try:
            supervisor.start(["priorgen", "trainer"])
            if import_needed:  # while those two start
                import_base_model(
                    layout.store_dir,
                    self.args.base_model_id,
                    env=plan.services["priorgen"].env,
                    sink=self.out.line,
                    say=self.say,
                    check=supervisor.check,
                )
            supervisor.start(["inference"])  # it loads and warms up the base model before SERVING
            supervisor.wait_serving(started + self.args.start_timeout, self._serving)
            self.say(f"ready in {time.monotonic() - started:.1f} s:")
            for name in ("trainer", "priorgen", "inference"):
                self.say(f"  {name:<10} {plan.services[name].address}")
            for line in usage_lines(plan, self.args.base_model_id):
                self.say(line)
            while not self.stop_requested():
                time.sleep(0.2)
                supervisor.check()
        except StopRequested:
            pass
        except ChildExited as err:
            self.say(f"error: {err}; stopping the others")
            return 1
        except (LaunchError, BaseModelError, DomainError) as err:
            self.say(f"error: {err}; stopping the services")
            return 1
        return 0

    def _serving(self, plan: ServicePlan, child: Child) -> None:
        self.say(f"{plan.name} SERVING on {plan.address} (pid {child.pid})")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    up = Up(args, LogStream(sys.stdout))
    handled = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, up.on_signal) for sig in handled}
    try:
        return up.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
