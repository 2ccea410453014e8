"""The keys file, `dreambooth-server keys`, the reloading key ring and the authenticator."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from services.common import keys_cli
from services.common.api_keys import KeysFileError, load_keys_file, parse_keys_file
from services.common.auth import INVALID, MISSING, Authenticator, is_loopback, open_authenticator
from services.common.errors import PermissionDenied, Unauthenticated
from services.common.key_ring import KeyRing
from services.common.settings import AuthSettings, ConfigError, ServerSettings
from services.common.tenancy import IMPLICIT_TENANT, Quotas, owner_for
from tests.fixtures.tenants import bearer, write_keys_file


def run_keys(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = keys_cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_keys_add_list_revoke_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    keys_file = tmp_path / "keys.toml"
    code, out, err = run_keys(capsys, "add", "--tenant", "acme", "--file", str(keys_file))
    assert code == 0 and "shown only now" in err
    key = out.strip()
    assert key.startswith("dbk_") and len(out.splitlines()) == 1
    code, out, _ = run_keys(capsys, "add", "--tenant", "acme", "--admin", "--file", str(keys_file))
    admin_key = out.strip()

    text = keys_file.read_text()
    assert key.split("_")[2] not in text and admin_key.split("_")[2] not in text  # only hashes
    assert oct(keys_file.stat().st_mode & 0o777) == "0o600"
    parsed = load_keys_file(keys_file)
    acme = parsed.verify(key)
    assert acme is not None and acme.name == "acme" and not acme.admin
    assert parsed.verify(admin_key).admin  # type: ignore[union-attr]

    code, out, _ = run_keys(capsys, "list", "--file", str(keys_file))
    key_id = key.split("_")[1]
    assert code == 0 and key_id in out and "acme" in out and out.count("\n") == 3

    assert run_keys(capsys, "revoke", key_id, "--file", str(keys_file))[0] == 0
    revoked = load_keys_file(keys_file)
    assert revoked.verify(key) is None and revoked.verify(admin_key) is not None
    code, _, err = run_keys(capsys, "revoke", key_id, "--file", str(keys_file))
    assert code == 1 and "already revoked" in err
    code, _, err = run_keys(capsys, "revoke", "0123456789ab", "--file", str(keys_file))
    assert code == 1 and "no key with id" in err


def test_keys_add_keeps_hand_written_quotas_and_comments(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keys_file = tmp_path / "keys.toml"
    keys_file.write_text("# our teams\n[tenants.acme]\nmax_concurrent_jobs = 2  # two GPUs\n")
    run_keys(capsys, "add", "--tenant", "acme", "--file", str(keys_file))
    text = keys_file.read_text()
    assert text.startswith("# our teams\n[tenants.acme]\nmax_concurrent_jobs = 2  # two GPUs\n")
    assert load_keys_file(keys_file).tenants["acme"].quotas == Quotas(max_concurrent_jobs=2)
    code, _, err = run_keys(capsys, "add", "--tenant", "Not A Name", "--file", str(keys_file))
    assert code == 1 and "--tenant" in err


ZERO_HASH = "sha256$" + "0" * 32 + "$" + "0" * 64
GOOD_KEY = f"""[[keys]]
id = "0123456789ab"
tenant = "acme"
hash = "{ZERO_HASH}"
created = 2025-06-01T12:00:00Z
"""

MALFORMED = [
    ("[tenants.acme\nmax_concurrent_jobs = 1\n", "line 1"),
    (GOOD_KEY.replace('hash = "sha256$', 'hash = "md5$'), "line 4: keys[0].hash:"),
    (GOOD_KEY + "\n" + GOOD_KEY.replace('tenant = "acme"', "tenant = 7"), "line 9: keys[1].tenant:"),
    (GOOD_KEY + "\n" + GOOD_KEY, "line 8: keys[1].id: duplicate key id"),
    (GOOD_KEY.replace("created = 2025-06-01T12:00:00Z", "created = 2025-06-01"), "line 5: keys[0].created:"),
    (GOOD_KEY.replace('id = "0123456789ab"\n', ""), "line 1: keys[0]: missing field 'id'"),
    (GOOD_KEY + "admn = true\n", "line 6: keys[0].admn: unknown field"),
    ("\n[tenants.acme]\nmax_stored_bytes = -5\n", "line 3: tenants.acme.max_stored_bytes:"),
    ("[tenants.acme]\ninternal = 1\n", "line 2: tenants.acme.internal:"),
    ('[tenants."Bad Name"]\n', "line 1: tenants.Bad Name:"),
    ("api_keys = 3\n", "line 1: api_keys: unknown setting"),
]


@pytest.mark.parametrize(("text", "where"), MALFORMED)
def test_a_malformed_keys_file_names_the_line_and_field(text: str, where: str) -> None:
    with pytest.raises(KeysFileError) as info:
        parse_keys_file(text, "/etc/dreambooth/keys.toml")
    message = str(info.value)
    assert message.startswith("keys file /etc/dreambooth/keys.toml"), message
    assert where in message, message
    assert "\n" not in message


def test_the_key_ring_rereads_changes_and_keeps_the_last_good_keys(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    keys_file = tmp_path / "keys.toml"
    keys = write_keys_file(keys_file, {"first": "acme"})
    now = [0.0]
    ring = KeyRing(keys_file, poll_seconds=0.5, clock=lambda: now[0])
    assert ring.current().verify(keys["first"]) is not None

    more = write_keys_file(keys_file, {"second": "acme"})  # the first key is gone
    assert ring.current().verify(keys["first"]) is not None  # not looked at again yet
    now[0] = 0.5
    assert ring.current().verify(keys["first"]) is None
    assert ring.current().verify(more["second"]) is not None

    caplog.set_level(logging.ERROR)
    keys_file.write_text("[[keys]\nbroken")
    for moment in (1.0, 1.5, 2.0):  # one error for one bad version, however often it is looked at
        now[0] = moment
        assert ring.current().verify(more["second"]) is not None
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "last good keys" in errors[0].getMessage()
    assert "line 1" in errors[0].error  # type: ignore[attr-defined]

    os.unlink(keys_file)  # unreadable: still the last good keys
    now[0] = 3.0
    assert ring.current().verify(more["second"]) is not None
    assert len([r for r in caplog.records if r.levelno == logging.ERROR]) == 2


def test_a_missing_or_malformed_keys_file_stops_the_start(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot be read"):
        KeyRing(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text(GOOD_KEY.replace("acme", "ACME"))
    with pytest.raises(ConfigError, match=r"line 3: keys\[0\]\.tenant"):
        open_authenticator("trainer", AuthSettings(api_keys_file=str(bad)), ServerSettings())


def test_authenticator_bearer_legacy_header_and_certificates(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.toml"
    keys = write_keys_file(
        keys_file,
        {"acme": "acme", "svc": "trainer-svc"},
        tables={
            "acme": {"max_generate_streams": 3},
            "trainer-svc": {"internal": True, "certificate_names": ["trainer"]},
        },
    )
    auth = Authenticator(KeyRing(keys_file))
    acme = auth.authenticate(bearer(keys["acme"]))
    assert (acme.name, acme.quotas.max_generate_streams, acme.internal) == ("acme", 3, False)
    assert auth.authenticate([("x-api-key", keys["acme"])]).name == "acme"  # deprecated, still accepted
    assert auth.authenticate([("authorization", f"bearer {keys['svc']}")]).internal
    assert auth.authenticate([], certificate_names=["trainer"]).name == "trainer-svc"
    assert auth.tenant_names() == ["acme", "trainer-svc"]

    wrong_secret = keys["acme"][:-4] + "0000"
    for metadata in (bearer("nonsense"), bearer(wrong_secret), [("authorization", f"Basic {keys['acme']}")]):
        with pytest.raises(Unauthenticated) as info:
            auth.authenticate(metadata)
        assert str(info.value) == INVALID
    for metadata, names in (([], []), ([("other", "x")], ["someone-else"])):
        with pytest.raises(Unauthenticated) as info:
            auth.authenticate(metadata, names)
        assert str(info.value) == MISSING
    assert Authenticator().authenticate([]) is IMPLICIT_TENANT  # no keys file: the implicit tenant


def test_only_a_service_identity_acts_for_another_tenant(tmp_path: Path) -> None:
    keys = write_keys_file(
        tmp_path / "k.toml", {"acme": "acme", "svc": "svc"}, tables={"svc": {"internal": True}}
    )
    ring = KeyRing(tmp_path / "k.toml")
    acme, svc = ring.current().verify(keys["acme"]), ring.current().verify(keys["svc"])
    assert acme is not None and svc is not None
    assert owner_for(acme, "") == owner_for(acme, "acme") == "acme"
    assert owner_for(svc, "acme") == "acme"
    with pytest.raises(PermissionDenied, match="tenant: only a service identity"):
        owner_for(acme, "beta")


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("localhost", True), ("::1", True), ("[::1]", True), ("127.9.9.9", True),
     ("0.0.0.0", False), ("::", False), ("", False), ("10.0.0.7", False), ("trainer.internal", False)],
)  # fmt: skip
def test_loopback_hosts(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_a_public_bind_needs_keys_mtls_or_an_explicit_opt_out(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    public = ServerSettings(host="0.0.0.0")
    with pytest.raises(ConfigError) as info:
        open_authenticator("inference", AuthSettings(), public)
    assert "DREAMBOOTH_API_KEYS_FILE" in str(info.value) and "0.0.0.0" in str(info.value)
    assert not open_authenticator("inference", AuthSettings(), ServerSettings(host="127.0.0.1")).enabled

    write_keys_file(tmp_path / "keys.toml", {"a": "acme"})
    assert open_authenticator(
        "inference", AuthSettings(api_keys_file=str(tmp_path / "keys.toml")), public
    ).enabled
    mtls = ServerSettings(host="0.0.0.0", tls_client_ca_file="/etc/ca.pem")
    assert not open_authenticator("inference", AuthSettings(), mtls).enabled  # mTLS alone: one tenant

    caplog.set_level(logging.WARNING)
    open_authenticator("inference", AuthSettings(allow_unauthenticated=True), public)
    assert any("without authentication" in r.getMessage() for r in caplog.records)
