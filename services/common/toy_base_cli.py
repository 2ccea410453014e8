"""`dreambooth-server pretrain-base --out DIR --seed N`: pretrain the toy-world base model.

Reproduces the committed base (`make pretrain-base`): the manifest in the folder records the
command, seed, thread count, settings and versions. `--quick` runs a handful of steps to check
the path end to end (the model learns nothing); `--minutes` caps the wall-clock time.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
import time
from pathlib import Path

import torch

from services.common.toy_base import PretrainSettings, pretrain_base

OVERRIDABLE = ("images", "vae_images", "vae_steps", "unet_steps", "unet_batch", "unet_lr")


def main(argv: list[str] | None = None) -> int:
    args_list = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="dreambooth-server pretrain-base",
        description="Pretrain a Stable Diffusion of the real architecture on the toy world.",
    )
    parser.add_argument("--out", type=Path, required=True, help="the model folder to write")
    parser.add_argument("--seed", type=int, default=0, help="same seed and threads => same bytes (default 0)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--minutes", type=float, help="stop the training stages early after this long")
    parser.add_argument("--quick", action="store_true", help="a few steps: checks the path, learns nothing")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own)")
    defaults = PretrainSettings()
    for name in OVERRIDABLE:
        kind = type(getattr(defaults, name))
        parser.add_argument(
            f"--{name.replace('_', '-')}", type=kind, help=f"default {getattr(defaults, name)}"
        )
    args = parser.parse_args(args_list)
    if args.minutes is not None and args.minutes <= 0:
        parser.error("--minutes must be positive")
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = PretrainSettings.quick() if args.quick else defaults
    overrides = {name: getattr(args, name) for name in OVERRIDABLE if getattr(args, name) is not None}
    settings = dataclasses.replace(settings, **overrides)
    command = shlex.join(["dreambooth-server", "pretrain-base", *args_list])
    started = time.perf_counter()
    try:
        manifest = pretrain_base(
            args.out, args.seed, settings, command=command, overwrite=args.overwrite, minutes=args.minutes
        )
    except FileExistsError as err:
        print(f"pretrain-base: {err}", file=sys.stderr)
        return 1
    size = sum(path.stat().st_size for path in args.out.rglob("*") if path.is_file())
    stages = manifest["stages"]
    print(
        f"wrote {args.out} ({size / 1e6:.1f} MB, seed {args.seed}) in {time.perf_counter() - started:.0f} s: "
        f"vae {stages['vae']['steps']} steps (PSNR {stages['vae']['psnr_world']} dB world, "
        f"{stages['vae']['psnr_subjects']} dB subjects), unet {stages['unet']['steps']} steps "
        f"(loss {stages['unet']['final_loss']})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
