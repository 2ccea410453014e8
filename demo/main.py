"""The demo's options and its run: output folders, base model, photos, services, journey, summary.

`out/demo/` is the demo's own folder and is emptied at each run; `--out`/`--store` move both.
Model caches and Ray's HOME live in a temporary folder removed at the end. Defaults: ToyBench's
DreamBooth recipe (toybench/recipes.py: steps, learning rate, class images), 1 Ray worker
(`--workers 2` shows DDP), 4 images per prompt.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from dreambooth_client import DreamBoothClient, DreamBoothError

import demo
from demo.console import say
from demo.contact_sheet import write_contact_sheet
from demo.journey import BASE_MODEL, TOKEN, DemoResult, print_summary, train_and_generate
from demo.measure import measure
from demo.services import DemoError, import_base_model, running_services
from demo.subject import SUBJECT, write_subject_photos
from services.launcher.base_model import BaseModelError
from toybench.recipes import DREAMBOOTH
from toyworld.vocabulary import BACKGROUND_PHRASES

START_TIMEOUT_S = 300.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m demo", description=(demo.__doc__ or "").split("\n\n")[0].split(": ", 1)[-1]
    )
    parser.add_argument("--out", default="out/demo", help="images, previews and logs (default out/demo)")
    parser.add_argument(
        "--store", default="out/demo-store", help="the local object store (default out/demo-store)"
    )
    parser.add_argument(
        "--keep-store", action="store_true", help="reuse the store of an earlier run (cached priors)"
    )
    recipe = DREAMBOOTH
    parser.add_argument("--steps", type=int, default=recipe.steps, help=f"training steps ({recipe.steps})")
    parser.add_argument(
        "--lr", type=float, default=recipe.learning_rate, help=f"learning rate ({recipe.learning_rate:g})"
    )
    # 1 by default: on 2 shared cores, 2 DDP workers (1 core each) measured ~2.5x slower per step.
    parser.add_argument("--workers", type=int, default=1, help="Ray Train workers (default 1; 2 shows DDP)")
    parser.add_argument(
        "--photos", type=int, default=SUBJECT.photo_count, help=f"subject photos ({SUBJECT.photo_count})"
    )
    parser.add_argument(
        "--class-images",
        type=int,
        default=DREAMBOOTH.num_class_images,
        help=f"prior images ({DREAMBOOTH.num_class_images})",
    )
    parser.add_argument("--images", type=int, default=4, help="images per prompt (default 4)")
    parser.add_argument("--deadline", type=float, default=1200.0, help="give up after this many seconds")
    return parser.parse_args(argv)


def sheet_rows(result: DemoResult, photos: list[Path]) -> list[tuple[str, list[bytes]]]:
    instance = f"a photo of {TOKEN} {SUBJECT.object}"
    rows = [("uploaded photos", [path.read_bytes() for path in photos])]
    rows.append((f"base model: a photo of a {SUBJECT.object}", result.class_before))
    for background, images in result.composed.items():
        rows.append((f"after: {instance} {BACKGROUND_PHRASES[background]}", images))
    rows.append((f"after: a photo of a {SUBJECT.object}", result.class_after))
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    args.deadline = started + args.deadline
    out_dir, store_dir = Path(args.out).resolve(), Path(args.store).resolve()
    log_dir = out_dir / "logs"
    if out_dir.exists():
        shutil.rmtree(out_dir)  # the demo's own output folder: every run starts clean
    if store_dir.exists() and not args.keep_store:
        shutil.rmtree(store_dir)
    out_dir.mkdir(parents=True)
    store_dir.mkdir(parents=True, exist_ok=True)
    work_dir = Path(tempfile.mkdtemp(prefix="dreambooth-demo-"))
    try:
        say(f"DreamBooth demo: store {store_dir}, output {out_dir}")
        say("\nthe toy-world base model")
        import_base_model(BASE_MODEL, store_dir, work_dir, log_dir)
        photos = write_subject_photos(out_dir / "subject", args.photos)
        say(f"drew {len(photos)} photos of the subject in {photos[0].parent}")
        say("\nstarting the services")
        deadline = time.monotonic() + START_TIMEOUT_S
        with running_services(BASE_MODEL, store_dir, work_dir, log_dir, deadline) as services:
            trainer, inference = services["trainer"].address, services["inference"].address
            with DreamBoothClient(trainer=trainer, inference=inference, timeout=60) as client:
                result = train_and_generate(client, photos, out_dir, args)
        sheet = write_contact_sheet(out_dir / "contact-sheet.png", sheet_rows(result, photos))
        measure(result, photos)
        print_summary(result, photos, log_dir, time.monotonic() - started, sheet)
        return 0
    except (DemoError, BaseModelError, DreamBoothError) as err:
        print(f"demo failed: {err}\n(service logs: {log_dir})", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
