"""TLS and mTLS between the SDK/CLI and a real trainer on loopback, with certificates made here.

A CA signs the server's certificate (localhost, 127.0.0.1) and a client certificate whose common
name the keys file maps to the tenant `ops`; a second CA, unknown to the server, signs a rogue
client certificate.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import ipaddress
import json
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from dreambooth_client import cli
from dreambooth_client.client import DreamBoothClient
from dreambooth_client.errors import DreamBoothError
from dreambooth_client.retry import NO_RETRY

from services.common.settings import AuthSettings, ServerSettings
from tests.fixtures.tenants import write_keys_file
from tests.fixtures.trainer_server import RunningTrainer, make_png


@dataclasses.dataclass(frozen=True)
class Pem:
    cert: Path
    key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write(directory: Path, label: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> Pem:
    pem = Pem(directory / f"{label}.crt", directory / f"{label}.key")
    pem.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return pem


def make_ca(directory: Path, label: str) -> tuple[Pem, x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(label))
        .issuer_name(_name(label))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .sign(key, hashes.SHA256())
    )
    return _write(directory, label, cert, key), cert, key


def issue(
    directory: Path, label: str, ca: tuple[Pem, x509.Certificate, ec.EllipticCurvePrivateKey], *, server: bool
) -> Pem:
    _, ca_cert, ca_key = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(label))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    )
    if server:
        names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return _write(directory, label, builder.sign(ca_key, hashes.SHA256()), key)


@dataclasses.dataclass(frozen=True)
class Pki:
    ca: Pem
    server: Pem
    client: Pem  # common name "ops-robot", mapped to tenant ops by the keys file
    rogue_client: Pem  # signed by a CA the server does not know


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    ca = make_ca(tmp_path, "dreambooth-test-ca")
    rogue = make_ca(tmp_path, "rogue-ca")
    return Pki(
        ca=ca[0],
        server=issue(tmp_path, "server", ca, server=True),
        client=issue(tmp_path, "ops-robot", ca, server=False),
        rogue_client=issue(tmp_path, "rogue-robot", rogue, server=False),
    )


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    keys_file = tmp_path / "keys.toml"
    issued = write_keys_file(
        keys_file, {"acme": "acme"}, tables={"ops": {"certificate_names": ["ops-robot"]}}
    )
    return keys_file, issued


def serve(
    start_trainer: Callable[..., RunningTrainer], pki: Pki, keys_file: Path, mtls: bool
) -> RunningTrainer:
    server = ServerSettings(
        port=0,
        metrics_port=0,
        grace_seconds=0,
        tls_cert_file=str(pki.server.cert),
        tls_key_file=str(pki.server.key),
        tls_client_ca_file=str(pki.ca.cert) if mtls else "",
    )
    return start_trainer(server=server, auth=AuthSettings(api_keys_file=str(keys_file)))


def test_tls_round_trip_with_a_key_and_plaintext_refused(
    start_trainer: Callable[..., RunningTrainer], pki: Pki, keys: tuple[Path, dict[str, str]]
) -> None:
    keys_file, issued = keys
    trainer = serve(start_trainer, pki, keys_file, mtls=False)
    with DreamBoothClient(trainer.address, None, api_key=issued["acme"], ca_cert=pki.ca.cert) as client:
        dataset = client.upload_images([make_png(0)])
        assert dataset.name.startswith("datasets/") and client.get_usage().tenant == "acme"
    plaintext = DreamBoothClient(trainer.address, None, api_key=issued["acme"], retry=NO_RETRY)
    with plaintext, pytest.raises(DreamBoothError) as info:
        plaintext.get_usage(timeout=10)
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    no_key = DreamBoothClient(trainer.address, None, ca_cert=pki.ca.cert)
    with no_key, pytest.raises(DreamBoothError) as info:
        no_key.get_usage(timeout=10)
    assert info.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_mtls_needs_a_client_certificate_from_the_ca_and_it_names_the_tenant(
    start_trainer: Callable[..., RunningTrainer],
    pki: Pki,
    keys: tuple[Path, dict[str, str]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    keys_file, issued = keys
    trainer = serve(start_trainer, pki, keys_file, mtls=True)
    certified = {"ca_cert": pki.ca.cert, "client_cert": pki.client.cert, "client_key": pki.client.key}
    with DreamBoothClient(trainer.address, None, **certified) as robot:
        assert robot.get_usage().tenant == "ops"  # the certificate is the identity: no key sent
    with DreamBoothClient(trainer.address, None, api_key=issued["acme"], **certified) as keyed:
        assert keyed.get_usage().tenant == "acme"  # a key, when sent, says who calls

    refused = (
        {"ca_cert": pki.ca.cert},  # no client certificate
        {"ca_cert": pki.ca.cert, "client_cert": pki.rogue_client.cert, "client_key": pki.rogue_client.key},
    )
    for credentials in refused:
        with (
            DreamBoothClient(
                trainer.address, None, api_key=issued["acme"], retry=NO_RETRY, **credentials
            ) as stranger,
            pytest.raises(DreamBoothError) as info,
        ):
            stranger.get_usage(timeout=10)
        assert info.value.code == grpc.StatusCode.UNAVAILABLE, credentials

    flags = [
        "--ca-cert",
        str(pki.ca.cert),
        "--client-cert",
        str(pki.client.cert),
        "--client-key",
        str(pki.client.key),
    ]
    assert cli.main(["--trainer", trainer.address, *flags, "--json", "usage"]) == 0
    assert json.loads(capsys.readouterr().out)["tenant"] == "ops"
