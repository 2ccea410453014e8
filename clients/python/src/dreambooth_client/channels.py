"""Channel and call settings shared by the sync and asyncio clients."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc

AUTHORIZATION_METADATA = "authorization"  # `Bearer <key>`: what the servers' auth interceptor reads
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
    """How to reach the services: TLS or not, which CA, a client certificate (mTLS), options."""

    tls: bool = False
    root_certificates: bytes | None = None  # PEM; None = the system's roots
    certificate_chain: bytes | None = None  # PEM client certificate, for servers that require one
    private_key: bytes | None = None  # PEM key of that certificate
    options: Sequence[tuple[str, object]] = field(default=CHANNEL_OPTIONS)

    def __post_init__(self) -> None:
        if (self.certificate_chain is None) != (self.private_key is None):
            raise ValueError("a client certificate needs its key (client_cert and client_key together)")

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.root_certificates,
            private_key=self.private_key,
            certificate_chain=self.certificate_chain,
        )

    @classmethod
    def create(
        cls,
        *,
        tls: bool = False,
        ca_cert: str | os.PathLike[str] | bytes | None = None,
        client_cert: str | os.PathLike[str] | bytes | None = None,
        client_key: str | os.PathLike[str] | bytes | None = None,
    ) -> ChannelConfig:
        """From PEM bytes or file paths; a CA or client certificate implies TLS."""
        root, chain, key = (_pem(value) for value in (ca_cert, client_cert, client_key))
        return cls(
            tls=tls or any(v is not None for v in (root, chain, key)),
            root_certificates=root,
            certificate_chain=chain,
            private_key=key,
        )


def _pem(value: str | os.PathLike[str] | bytes | None) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    with open(value, "rb") as source:
        return source.read()


def call_metadata(api_key: str | None, extra: Sequence[tuple[str, str]] = ()) -> tuple[tuple[str, str], ...]:
    """Metadata sent with every call: `authorization: Bearer <key>` (when set) plus the caller's."""
    metadata = tuple(extra)
    if api_key:
        metadata = ((AUTHORIZATION_METADATA, f"Bearer {api_key}"), *metadata)
    return metadata


def env_address(variable: str, default: str) -> str:
    return os.environ.get(variable) or default


def sync_channel(address: str, config: ChannelConfig) -> grpc.Channel:
    if config.tls:
        return grpc.secure_channel(address, config.credentials(), options=list(config.options))
    return grpc.insecure_channel(address, options=list(config.options))
