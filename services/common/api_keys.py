"""The API keys file (TOML): tenants, their quotas, and salted hashes of their keys.

    [tenants.acme]                      # optional: quotas and flags of one tenant (0 = no limit)
    max_concurrent_jobs = 2
    max_generate_streams = 4
    max_stored_bytes = 10_000_000_000
    internal = false                    # a service identity: may act for other tenants
    certificate_names = []              # mTLS client certificates (common names) that act as it

    [[keys]]                            # one per key; written by `dreambooth-server keys add`
    id = "3f9a0c2d1e7b"
    tenant = "acme"
    hash = "sha256$<salt hex>$<digest hex>"
    created = 2025-06-01T12:00:00Z
    admin = false
    revoked = 2025-06-02T09:00:00Z      # optional: from then on the key is refused

A key is `dbk_{id}_{secret}`: the id finds its entry and the secret (256 random bits) is checked
against the salted sha256. A fast hash is enough for secrets of that entropy (slow hashes protect
guessable passwords) and keeps authentication cheap on every RPC. The keys themselves are never
stored. Errors name the file, the line and the field at fault.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import os
import re
import secrets
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.common.settings import ConfigError
from services.common.tenancy import TENANT_NAME, Quotas, Tenant

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

KEY_PREFIX = "dbk"
_KEY_ID = re.compile(r"^[0-9a-f]{12}$")
_TOKEN = re.compile(r"^dbk_([0-9a-f]{12})_([0-9a-f]{64})$")
_HASH = re.compile(r"^sha256\$([0-9a-f]{32})\$([0-9a-f]{64})$")
_DUMMY_HASH = "sha256$" + "0" * 32 + "$" + "0" * 64  # compared against for unknown ids: same work
QUOTA_FIELDS = ("max_concurrent_jobs", "max_generate_streams", "max_stored_bytes")
TENANT_FIELDS = (*QUOTA_FIELDS, "internal", "certificate_names")
KEY_FIELDS = ("id", "tenant", "hash", "created", "admin", "revoked")
HEADER = (
    "# DreamBooth API keys: salted hashes only (the keys are shown once, by `dreambooth-server keys add`).\n"
    "# Every service re-reads this file when it changes. [tenants.NAME] tables hold quotas (0 = none).\n"
)


class KeysFileError(ConfigError):
    """The keys file cannot be used; the message names the file, the line and the field."""


@dataclass(frozen=True)
class KeyEntry:
    key_id: str
    tenant: str
    hash: str
    created: dt.datetime
    admin: bool = False
    revoked: dt.datetime | None = None


@dataclass(frozen=True)
class TenantEntry:
    name: str
    quotas: Quotas = field(default_factory=Quotas)
    internal: bool = False
    certificate_names: tuple[str, ...] = ()


@dataclass(frozen=True)
class KeysFile:
    tenants: dict[str, TenantEntry]
    keys: dict[str, KeyEntry]  # by key id, in file order

    def tenant(self, name: str, *, admin: bool = False) -> Tenant:
        entry = self.tenants.get(name) or TenantEntry(name)
        return Tenant(name=name, admin=admin, internal=entry.internal, quotas=entry.quotas)

    def verify(self, token: str) -> Tenant | None:
        """The tenant of a valid, unrevoked key; None for anything else (same work either way)."""
        match = _TOKEN.match(token)
        key_id, secret = match.groups() if match else ("", "0" * 64)
        entry = self.keys.get(key_id)
        ok = check_secret(secret, entry.hash if entry else _DUMMY_HASH)
        if entry is None or not ok or entry.revoked is not None:
            return None
        return self.tenant(entry.tenant, admin=entry.admin)

    def by_certificate(self, common_name: str) -> Tenant | None:
        for entry in self.tenants.values():
            if common_name in entry.certificate_names:
                return self.tenant(entry.name)
        return None


# ---- keys and hashes ----------------------------------------------------------------------------


def hash_secret(secret: str, salt: str | None = None) -> str:
    salt = salt or secrets.token_hex(16)
    digest = hashlib.sha256(bytes.fromhex(salt) + secret.encode()).hexdigest()
    return f"sha256${salt}${digest}"


def check_secret(secret: str, stored: str) -> bool:
    match = _HASH.match(stored)
    if match is None:
        return False
    return hmac.compare_digest(hash_secret(secret, match.group(1)), stored)


def new_key(tenant: str, *, admin: bool = False, now: dt.datetime | None = None) -> tuple[str, KeyEntry]:
    """A fresh key (shown once) and the entry that stores only its hash."""
    key_id, secret = secrets.token_hex(6), secrets.token_hex(32)
    created = (now or dt.datetime.now(dt.timezone.utc)).replace(microsecond=0)
    entry = KeyEntry(key_id=key_id, tenant=tenant, hash=hash_secret(secret), created=created, admin=admin)
    return f"{KEY_PREFIX}_{key_id}_{secret}", entry


# ---- reading ------------------------------------------------------------------------------------


def load_keys_file(path: Path) -> KeysFile:
    """Parse the file; KeysFileError (naming the line and field) when it is unreadable or wrong."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise KeysFileError(f"keys file {path}: cannot be read: {err}") from None
    return parse_keys_file(text, str(path))


def parse_keys_file(text: str, path: str = "<keys file>") -> KeysFile:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:  # its message ends "(at line N, column M)"
        raise KeysFileError(f"keys file {path}: {err}") from None
    where = _Locator(text, path)
    for name in data:
        if name not in ("tenants", "keys"):
            raise where.error(None, name, "unknown setting (expected [tenants.NAME] tables and [[keys]])")
    tenants_raw = data.get("tenants", {})
    if not isinstance(tenants_raw, dict):
        raise where.error(None, "tenants", "must be tables: [tenants.NAME]")
    keys_raw = data.get("keys", [])
    if not isinstance(keys_raw, list):
        raise where.error(None, "keys", "must be an array of tables: [[keys]]")
    tenants = {name: _tenant_entry(name, value, where) for name, value in tenants_raw.items()}
    keys: dict[str, KeyEntry] = {}
    for index, value in enumerate(keys_raw):
        entry = _key_entry(index, value, where)
        if entry.key_id in keys:
            raise where.error(("keys", index), "id", f"duplicate key id {entry.key_id!r}")
        keys[entry.key_id] = entry
    return KeysFile(tenants=tenants, keys=keys)


def _tenant_entry(name: str, value: Any, where: _Locator) -> TenantEntry:
    section = ("tenants", name)
    if not TENANT_NAME.match(name):
        raise where.error(section, None, f"tenant name {name!r} must be lowercase letters, digits or '-'")
    if not isinstance(value, dict):
        raise where.error(section, None, "must be a table")
    for key in value:
        if key not in TENANT_FIELDS:
            raise where.error(section, key, f"unknown field (expected one of {', '.join(TENANT_FIELDS)})")
    quotas = {}
    for key in QUOTA_FIELDS:
        number = value.get(key, 0)
        if isinstance(number, bool) or not isinstance(number, int) or number < 0:
            raise where.error(section, key, f"must be a whole number >= 0 (0 = no limit), got {number!r}")
        quotas[key] = number
    internal = value.get("internal", False)
    if not isinstance(internal, bool):
        raise where.error(section, "internal", f"must be true or false, got {internal!r}")
    names = value.get("certificate_names", [])
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise where.error(section, "certificate_names", "must be a list of certificate common names")
    return TenantEntry(name, Quotas(**quotas), internal, tuple(names))


def _key_entry(index: int, value: Any, where: _Locator) -> KeyEntry:
    section = ("keys", index)
    if not isinstance(value, dict):
        raise where.error(section, None, "must be a table")
    for key in value:
        if key not in KEY_FIELDS:
            raise where.error(section, key, f"unknown field (expected one of {', '.join(KEY_FIELDS)})")
    for key in ("id", "tenant", "hash", "created"):
        if key not in value:
            raise where.error(section, None, f"missing field {key!r}")
    if not isinstance(value["id"], str) or not _KEY_ID.match(value["id"]):
        raise where.error(section, "id", f"must be 12 hex digits, got {value['id']!r}")
    if not isinstance(value["tenant"], str) or not TENANT_NAME.match(value["tenant"]):
        raise where.error(section, "tenant", f"must be a tenant name, got {value['tenant']!r}")
    if not isinstance(value["hash"], str) or not _HASH.match(value["hash"]):
        raise where.error(section, "hash", "must be sha256$<32 hex salt>$<64 hex digest>")
    for key in ("created", "revoked"):
        moment = value.get(key)
        if key in value and not (isinstance(moment, dt.datetime) and moment.tzinfo is not None):
            raise where.error(
                section, key, f"must be a date-time with a zone, e.g. 2025-06-01T12:00:00Z, got {moment!r}"
            )
    admin = value.get("admin", False)
    if not isinstance(admin, bool):
        raise where.error(section, "admin", f"must be true or false, got {admin!r}")
    return KeyEntry(
        key_id=value["id"],
        tenant=value["tenant"],
        hash=value["hash"],
        created=value["created"],
        admin=admin,
        revoked=value.get("revoked"),
    )


class _Locator:
    """Finds the line of a section or field, so errors point where to edit."""

    _HEADER = re.compile(r"^\s*\[")

    def __init__(self, text: str, path: str) -> None:
        self.lines = text.splitlines()
        self.path = path

    def error(self, section: tuple[str, Any] | None, field_name: str | None, message: str) -> KeysFileError:
        line = self.line_of(section, field_name)
        where = ".".join(p for p in (_section_name(section), field_name) if p)
        prefix = f"keys file {self.path}" + (f", line {line}" if line else "")
        return KeysFileError(f"{prefix}: {where}: {message}")

    def line_of(self, section: tuple[str, Any] | None, field_name: str | None) -> int | None:
        start, end = self.section_span(section)
        if start is None:
            return None
        if field_name is not None:
            pattern = re.compile(rf"^\s*\"?{re.escape(field_name)}\"?\s*[=.]")
            for number in range(start if section is None else start + 1, end):
                if pattern.match(self.lines[number]):
                    return number + 1
        return start + 1 if section is not None else None

    def section_span(self, section: tuple[str, Any] | None) -> tuple[int | None, int]:
        """[start, end) line indexes of a section (its header line first); None when not found."""
        headers = [n for n, line in enumerate(self.lines) if self._HEADER.match(line)]
        if section is None:
            return 0, headers[0] if headers else len(self.lines)
        kind, which = section
        if kind == "keys":
            matches = [n for n in headers if re.match(r"^\s*\[\[\s*keys\s*\]\]", self.lines[n])]
            start = matches[which] if which < len(matches) else None
        else:
            pattern = re.compile(rf"^\s*\[\s*tenants\s*\.\s*\"?{re.escape(str(which))}\"?\s*\]")
            start = next((n for n in headers if pattern.match(self.lines[n])), None)
        if start is None:
            return None, 0
        end = next((n for n in headers if n > start), len(self.lines))
        return start, end


def _section_name(section: tuple[str, Any] | None) -> str:
    if section is None:
        return ""
    kind, which = section
    return f"keys[{which}]" if kind == "keys" else f"tenants.{which}"


# ---- writing (text-preserving: hand-written quotas and comments stay) ---------------------------


def key_block(entry: KeyEntry) -> str:
    lines = [
        "[[keys]]",
        f"id = {_string(entry.key_id)}",
        f"tenant = {_string(entry.tenant)}",
        f"hash = {_string(entry.hash)}",
        f"created = {_datetime(entry.created)}",
        f"admin = {'true' if entry.admin else 'false'}",
    ]
    if entry.revoked is not None:
        lines.append(f"revoked = {_datetime(entry.revoked)}")
    return "\n".join(lines) + "\n"


def with_key_added(text: str, entry: KeyEntry) -> str:
    text = text or HEADER
    separator = "" if text.endswith("\n\n") else ("\n" if text.endswith("\n") else "\n\n")
    return f"{text}{separator}{key_block(entry)}"


def with_key_revoked(text: str, key_id: str, when: dt.datetime, path: str = "<keys file>") -> str:
    """The text with `revoked = when` added to key `key_id`; KeysFileError if absent or revoked."""
    parsed = parse_keys_file(text, path)
    if key_id not in parsed.keys:
        raise KeysFileError(f"keys file {path}: no key with id {key_id!r}")
    if parsed.keys[key_id].revoked is not None:
        raise KeysFileError(f"keys file {path}: key {key_id!r} is already revoked")
    index = list(parsed.keys).index(key_id)
    start, end = _Locator(text, path).section_span(("keys", index))
    assert start is not None  # parse_keys_file found it
    lines = text.splitlines()
    while end > start + 1 and not lines[end - 1].strip():  # after its last field, before blank lines
        end -= 1
    lines.insert(end, f"revoked = {_datetime(when)}")
    return "\n".join(lines) + "\n"


def write_atomically(path: Path, text: str) -> None:
    """Replace the file in one rename (services never read half a file), readable by its owner only."""
    path = Path(path)
    parse_keys_file(text, str(path))  # never write a file the services would refuse
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _string(value: str) -> str:
    return json.dumps(value)  # a TOML basic string for the plain ASCII values written here


def _datetime(value: dt.datetime) -> str:
    return value.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
