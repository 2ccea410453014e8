"""`dreambooth-server`: one command for every server-side entry point.

Subcommands are imported lazily so `dreambooth-server make-tiny-model` never imports Ray and
`dreambooth-server inference` never imports the trainer. A service that must not start (a bad
keys file, a public address without authentication) says why in one line and exits 2.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "make-tiny-model": ("services.common.tiny_model_cli", "build a tiny Stable Diffusion from a seed"),
    "import-model": ("services.common.model_store_cli", "import a diffusers folder as a base model"),
    "keys": ("services.common.keys_cli", "add, list and revoke API keys in the keys file"),
    "pretrain-base": ("services.common.toy_base_cli", "pretrain the toy-world base model"),
    "gc": ("services.gc.main", "remove what nothing in the store references (--dry-run lists it)"),
    "inference": ("services.inference.main", "run the inference gRPC service"),
    "priorgen": ("services.priorgen.main", "run the prior-generation gRPC service"),
    "trainer": ("services.trainer.main", "run the trainer gRPC service"),
    "up": ("services.launcher.up", "run all three services on one machine (local store, local Ray)"),
}


def usage() -> str:
    lines = ["usage: dreambooth-server COMMAND [ARGS]", "", "commands:"]
    lines += [f"  {name:<16} {help_text}" for name, (_, help_text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help") or args[0] not in COMMANDS:
        print(usage(), file=sys.stderr if args and args[0] not in ("-h", "--help") else sys.stdout)
        return 0 if args and args[0] in ("-h", "--help") else 2
    from services.common.settings import ConfigError

    module = importlib.import_module(COMMANDS[args[0]][0])
    try:
        return int(module.main(args[1:]) or 0)
    except ConfigError as err:
        print(f"dreambooth-server {args[0]}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
