"""The standard gRPC health check ("" = the whole server), which every service serves."""

from __future__ import annotations

import contextlib

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


class HealthProbe:
    """One channel per address, reused across checks; close() when done."""

    def __init__(self) -> None:
        self._channels: dict[str, grpc.Channel] = {}

    def serving(self, address: str, timeout: float = 1.0) -> bool:
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = grpc.insecure_channel(address)
        stub = health_pb2_grpc.HealthStub(channel)
        with contextlib.suppress(grpc.RpcError):
            response = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
            return response.status == health_pb2.HealthCheckResponse.SERVING
        return False

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()
        self._channels.clear()

    def __enter__(self) -> HealthProbe:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
