"""`dreambooth-server make-tiny-model --out DIR --seed N`: build the tiny test model."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from services.common.tiny_model import build_tiny_model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dreambooth-server make-tiny-model",
        description="Build a tiny Stable Diffusion (real architecture, toy size) from a seed.",
    )
    parser.add_argument("--out", type=Path, required=True, help="folder to create (must be absent or empty)")
    parser.add_argument("--seed", type=int, default=0, help="same seed => byte-identical files (default 0)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        folder = build_tiny_model(args.out, seed=args.seed)
    except FileExistsError as err:
        print(f"make-tiny-model: {err}", file=sys.stderr)
        return 1
    size = sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())
    print(f"wrote {folder} ({size / 1e6:.1f} MB, seed {args.seed}) in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
