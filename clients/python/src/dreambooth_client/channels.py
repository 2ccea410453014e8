"""Channel and call settings shared by the sync and asyncio clients."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc

API_KEY_METADATA = "x-api-key"  # the metadata key the servers' auth interceptor reads
DEFAULT_TRAINER = "127.0.0.1:50051"
DEFAULT_INFERENCE = "127.0.0.1:50053"
TRAINER_ADDRESS_ENV = "DREAMBOOTH_TRAINER_ADDRESS"
INFERENCE_ADDRESS_ENV = "DREAMBOOTH_INFERENCE_ADDRESS"
API_KEY_ENV = "DREAMBOOTH_API_KEY"

# Final images are one message each; a 1024x1024 PNG is a few MB, so leave room above gRPC's 4 MB.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
)


@dataclass(frozen=True)
class ChannelConfig:
    """How to reach the services: TLS or not, which CA, extra channel options."""

    tls: bool = False
    root_certificates: bytes | None = None  # PEM; None = the system's roots
    options: Sequence[tuple[str, object]] = field(default=CHANNEL_OPTIONS)

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=self.root_certificates)


def call_metadata(api_key: str | None, extra: Sequence[tuple[str, str]] = ()) -> tuple[tuple[str, str], ...]:
    """Metadata sent with every call: the API key (when set) plus anything the caller adds."""
    metadata = tuple(extra)
    if api_key:
        metadata = ((API_KEY_METADATA, api_key), *metadata)
    return metadata


def env_address(variable: str, default: str) -> str:
    return os.environ.get(variable) or default


def sync_channel(address: str, config: ChannelConfig) -> grpc.Channel:
    if config.tls:
        return grpc.secure_channel(address, config.credentials(), options=list(config.options))
    return grpc.insecure_channel(address, options=list(config.options))
