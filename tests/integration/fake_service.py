"""A stand-in for one service under `up`'s supervisor: gRPC health only, no torch, starts in ~1 s.

`python -m tests.integration.fake_service NAME` serves the health check on DREAMBOOTH_<NAME>_PORT
(SERVING at once), prints one line, and exits 0 on SIGTERM. Behaviour switches (environment):
  FAKE_<NAME>_EXIT=N        exit with status N right after printing its line, before serving
  FAKE_<NAME>_ORPHAN=1      start a `sleep` that outlives it (a leftover for the launcher to end)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc


def main(name: str) -> int:
    prefix = f"DREAMBOOTH_{name.upper()}_"
    print(f"fake {name} starting (pid {os.getpid()})", flush=True)
    exit_code = os.environ.get(f"FAKE_{name.upper()}_EXIT")
    if exit_code is not None:
        return int(exit_code)
    if os.environ.get(f"FAKE_{name.upper()}_ORPHAN"):
        orphan = subprocess.Popen(["sleep", "600"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        print(f"orphan pid {orphan.pid}", flush=True)
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stopped.set())
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    server.add_insecure_port(f"127.0.0.1:{os.environ[f'{prefix}PORT']}")
    server.start()
    print(f"fake {name} serving", flush=True)
    while not stopped.wait(0.1):
        pass
    server.stop(0).wait()
    print(f"fake {name} stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
