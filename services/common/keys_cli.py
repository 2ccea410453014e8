"""`dreambooth-server keys add|list|revoke`: manage the API keys file.

    dreambooth-server keys add --tenant acme [--admin] --file keys.toml   # prints the key, once
    dreambooth-server keys list --file keys.toml
    dreambooth-server keys revoke 3f9a0c2d1e7b --file keys.toml

--file defaults to DREAMBOOTH_API_KEYS_FILE. The file is edited in place as text (quotas and
comments written by hand stay) and replaced in one rename; running services pick the change up
within a second, so a revoked key stops working without a restart.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
from pathlib import Path

from services.common.api_keys import (
    KeysFileError,
    load_keys_file,
    new_key,
    parse_keys_file,
    with_key_added,
    with_key_revoked,
    write_atomically,
)
from services.common.errors import InvalidArgument
from services.common.tenancy import validate_tenant_name

FILE_ENV = "DREAMBOOTH_API_KEYS_FILE"


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return ""
    except (OSError, UnicodeDecodeError) as err:
        raise KeysFileError(f"keys file {path}: cannot be read: {err}") from None


def cmd_add(args: argparse.Namespace) -> int:
    validate_tenant_name(args.tenant, "--tenant")
    text = _read_text(args.file)
    parse_keys_file(text, str(args.file))  # refuse to add to a file the services would refuse
    key, entry = new_key(args.tenant, admin=args.admin)
    write_atomically(args.file, with_key_added(text, entry))
    print(key)
    role = "admin key" if args.admin else "key"
    print(
        f"added {role} {entry.key_id} for tenant {args.tenant!r} to {args.file}; the key above is shown "
        "only now: keep it secret",
        file=sys.stderr,
    )
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    keys = load_keys_file(args.file)
    print(f"{'KEY ID':<14}{'TENANT':<24}{'ADMIN':<7}{'CREATED':<22}REVOKED")
    for entry in keys.keys.values():
        revoked = _when(entry.revoked) if entry.revoked else "-"
        admin = "yes" if entry.admin else "no"
        print(f"{entry.key_id:<14}{entry.tenant:<24}{admin:<7}{_when(entry.created):<22}{revoked}")
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    text = _read_text(args.file)
    now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    write_atomically(args.file, with_key_revoked(text, args.key_id, now, str(args.file)))
    print(f"revoked key {args.key_id} in {args.file}", file=sys.stderr)
    return 0


def _when(moment: dt.datetime) -> str:
    return moment.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dreambooth-server keys", description="Manage the API keys file.")
    default_file = os.environ.get(FILE_ENV) or None
    file_help = f"the keys file (default: ${FILE_ENV})"
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    add = actions.add_parser("add", help="create a key for a tenant; prints it once")
    add.add_argument("--tenant", required=True, help="tenant name (lowercase letters, digits, '-')")
    add.add_argument("--admin", action="store_true", help="an admin key")
    add.set_defaults(handler=cmd_add)
    listing = actions.add_parser("list", help="every key: id, tenant, admin, created, revoked")
    listing.set_defaults(handler=cmd_list)
    revoke = actions.add_parser("revoke", help="refuse a key from now on")
    revoke.add_argument("key_id", metavar="KEY_ID")
    revoke.set_defaults(handler=cmd_revoke)
    for sub in (add, listing, revoke):
        sub.add_argument(
            "--file", type=Path, default=default_file, required=default_file is None, help=file_help
        )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.file = Path(args.file)
    try:
        return int(args.handler(args))
    except (KeysFileError, InvalidArgument) as err:
        print(f"keys: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
