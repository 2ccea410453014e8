"""`dreambooth-server import-model --from DIR --id ID [--label k=v]`: publish a base model.

The store comes from the same DREAMBOOTH_* settings the services read (S3 when
DREAMBOOTH_S3_ENDPOINT is set, else the local directory store).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from services.common.errors import DomainError
from services.common.model_store import MODEL_KINDS, ModelStore
from services.common.settings import StoreSettings, from_env
from services.common.store_factory import open_store


def _label(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dreambooth-server import-model",
        description="Import a diffusers-format folder (safetensors weights only) into the model store.",
    )
    parser.add_argument("--from", dest="folder", type=Path, required=True, help="diffusers model folder")
    parser.add_argument("--id", dest="model_id", required=True, help="model id, e.g. sd-1-5")
    parser.add_argument("--kind", choices=MODEL_KINDS, default="base")
    parser.add_argument("--label", action="append", type=_label, default=[], help="KEY=VALUE (repeatable)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing model with this id")
    args = parser.parse_args(argv)

    settings = from_env(StoreSettings)
    models = ModelStore(open_store(settings), Path(settings.cache_dir))
    try:
        manifest = models.import_folder(
            args.folder, args.model_id, kind=args.kind, labels=dict(args.label), overwrite=args.overwrite
        )
    except DomainError as err:
        print(f"import-model: {err}", file=sys.stderr)
        return 1
    print(
        f"imported {manifest.name}: {len(manifest.files)} files, {manifest.size_bytes / 1e6:.1f} MB, "
        f"digest {manifest.digest[:12]}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
