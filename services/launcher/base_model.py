"""The base model of a fresh local store, imported on first start.

A store with no base model gets, under the id asked for, the committed toy-world base
(models/toy-world-base: a Stable Diffusion pretrained on the toy world, so DreamBooth visibly
learns), or the tiny random model when the id is `tiny-sd` (seconds to build; pictures are noise).
A store that has base models is never changed: the id asked for must be one of them. The tiny
model is built by `dreambooth-server make-tiny-model` in a child process (torch stays out of the
launcher), then published with the model store; its build folder is removed afterwards.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from services.common.local_store import LocalObjectStore
from services.common.model_store import ModelStore, validate_model_id
from services.common.toy_base_files import COMMITTED_BASE, verify_base
from services.launcher.children import Child, LineSink, describe_exit

TINY_MODEL_ID = "tiny-sd"
TOY_WORLD_BASE_ID = "toy-world"
TINY_MODEL_SEED = 0
TINY_MODEL_NAME = "tiny-model"  # the name on its build's output lines


class BaseModelError(Exception):
    """The store cannot provide the base model asked for; the message says what to do."""


def base_models(store_dir: Path) -> list[str]:
    models = ModelStore(LocalObjectStore(store_dir), store_dir / "unused-cache")  # listing loads nothing
    return [manifest.model_id for manifest in models.list() if manifest.kind == "base"]


def needs_import(store_dir: Path, model_id: str) -> bool:
    """True when the store has no base model at all (the tiny model goes in as `model_id`).

    Raises BaseModelError when the store has base models but not `model_id`: it is never changed.
    """
    validate_model_id(model_id, "--base-model-id")
    existing = base_models(store_dir)
    if model_id in existing:
        return False
    if existing:
        raise BaseModelError(
            f"base model {model_id!r} is not in the store {store_dir}; it holds {', '.join(existing)}: "
            "pass one of those as --base-model-id, or import yours with `dreambooth-server import-model`"
        )
    return True


def import_tiny_model(
    store_dir: Path,
    model_id: str,
    *,
    env: Mapping[str, str],
    sink: LineSink,
    say: Callable[[str], None],
    check: Callable[[], None] = lambda: None,
    scratch_dir: Path | None = None,
) -> None:
    """Build the tiny model (a child process) and publish it as the base model `model_id`.

    `check` is called while the build runs and may raise to abort it (a stop was asked for, a
    service died): the build process is then ended. The build happens in a temporary folder
    under `scratch_dir` (default: beside the store), removed afterwards.
    """
    say(f"the store has no base model: building the tiny Stable Diffusion as {model_id}")
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix=".tiny-model-build.", dir=scratch_dir or store_dir.parent))
    try:
        folder = work / "model"
        argv = [sys.executable, "-m", "services.cli", "make-tiny-model", "--out", str(folder)]
        build = Child(TINY_MODEL_NAME, [*argv, "--seed", str(TINY_MODEL_SEED)], env, sink)
        try:
            while (code := build.wait(0.25)) is None:
                check()
        finally:
            build.end_session(linger=0)
        if code != 0:
            raise BaseModelError(f"building the tiny model failed ({describe_exit(code)})")
        models = ModelStore(LocalObjectStore(store_dir), work / "cache")
        labels = {"source": "tiny-model", "seed": str(TINY_MODEL_SEED)}
        manifest = models.import_folder(folder, model_id, kind="base", labels=labels)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    say(
        f"imported base model {model_id} ({len(manifest.files)} files, {manifest.size_bytes / 1e6:.1f} MB) "
        f"in {time.monotonic() - started:.1f} s: random weights, 64x64, for trying the system out"
    )


def import_toy_world_base(store_dir: Path, model_id: str, *, say: Callable[[str], None]) -> None:
    """Publish the committed toy-world base (its digests checked first) as the base `model_id`."""
    started = time.monotonic()
    try:
        pretrained = verify_base(COMMITTED_BASE)
    except (OSError, ValueError) as err:
        raise BaseModelError(f"the committed toy-world base cannot be used: {err}") from None
    with tempfile.TemporaryDirectory(prefix=".toy-base-import.", dir=store_dir.parent) as work:
        models = ModelStore(LocalObjectStore(store_dir), Path(work))
        labels = {"source": "toy-world-base", "world": str(pretrained["world_version"])}
        manifest = models.import_folder(COMMITTED_BASE, model_id, kind="base", labels=labels)
    say(
        f"imported base model {model_id} ({len(manifest.files)} files, {manifest.size_bytes / 1e6:.1f} MB) "
        f"in {time.monotonic() - started:.1f} s: pretrained on the toy world, 64x64"
    )


def import_base_model(
    store_dir: Path,
    model_id: str,
    *,
    env: Mapping[str, str],
    sink: LineSink,
    say: Callable[[str], None],
    check: Callable[[], None] = lambda: None,
    scratch_dir: Path | None = None,
) -> None:
    """The tiny model under `tiny-sd`, else the toy-world base under `model_id` (an empty store)."""
    if model_id == TINY_MODEL_ID:
        import_tiny_model(
            store_dir, model_id, env=env, sink=sink, say=say, check=check, scratch_dir=scratch_dir
        )
    else:
        import_toy_world_base(store_dir, model_id, say=say)


def ensure_base_model(
    store_dir: Path,
    model_id: str,
    *,
    env: Mapping[str, str],
    sink: LineSink,
    say: Callable[[str], None],
    scratch_dir: Path | None = None,
) -> bool:
    """needs_import, then import_base_model when needed; True when it was imported now."""
    if not needs_import(store_dir, model_id):
        say(f"base model {model_id} is in the store")
        return False
    import_base_model(store_dir, model_id, env=env, sink=sink, say=say, scratch_dir=scratch_dir)
    return True
