"""A toy-world base model's folder: where the committed one lives, its file digests, and the check
that a folder is an intact base of this world. No torch: the launcher imports it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import toyworld

MANIFEST_FILE = "pretrain_manifest.json"
# The committed base (`make pretrain-base` writes it): the default base of the demo, `up`, the
# e2e tests and ToyBench.
COMMITTED_BASE = Path(__file__).resolve().parents[2] / "models" / "toy-world-base"


def folder_digests(folder: Path) -> dict[str, str]:
    """sha256 of every file in the folder but the manifest, by relative path."""
    return {
        path.relative_to(folder).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != MANIFEST_FILE
    }


def verify_base(folder: Path) -> dict[str, Any]:
    """The folder's manifest, after checking it is of this world and every digest matches."""
    folder = Path(folder)
    path = folder / MANIFEST_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no {MANIFEST_FILE}: not a pretrained toy-world base")
    manifest = json.loads(path.read_text())
    if manifest.get("world_version") != toyworld.WORLD_VERSION:
        raise ValueError(
            f"{folder} was pretrained on toy world version {manifest.get('world_version')!r}, "
            f"this is version {toyworld.WORLD_VERSION!r}"
        )
    if manifest.get("world_fingerprint") != toyworld.world_fingerprint():
        raise ValueError(f"{folder} was pretrained on another drawing of the toy world (fingerprint differs)")
    actual = folder_digests(folder)
    if actual != manifest["files"]:
        changed = sorted(set(actual.items()) ^ set(manifest["files"].items()))
        raise ValueError(f"{folder} does not match its manifest: {sorted({name for name, _ in changed})}")
    return manifest
