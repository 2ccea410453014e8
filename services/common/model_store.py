"""Models in the object store: content-addressed blobs plus one manifest per model (DESIGN §5).

Layout in the store:
    blobs/sha256/{digest}          the bytes of one file, named by its sha256 (shared by models)
    models/{id}/manifest.json      model id, kind, lineage, labels, file path -> (sha256, size)

Publishing uploads the blobs first and writes the manifest last, so a model whose manifest is
missing does not exist, and a crash mid-import leaves only unreferenced blobs. A fine-tuned model
whose VAE and tokenizer did not change shares those blobs with its base. While it runs, a publish
holds a pin on its blobs (store_pins.py), so the store's garbage collector never sweeps a blob
of an unfinished publish; blobs it reuses are checked again once no collection that could have
missed the pin is running.

Loading (`materialize`) builds a local diffusers folder under `cache_dir`, keyed by the manifest's
digest: each blob is downloaded once into a local blob cache, its sha256 verified, then hard-linked
into a temporary folder that is renamed into place when complete. A corrupted blob raises
DataCorruption naming the file, and no half-built folder is ever visible. Folders are shared
hard links: treat them as read-only (write a new folder, never edit one in place).

Only safetensors weights are accepted: a pickle-based weight file anywhere in a folder is refused.

Tenants: a ModelStore over a tenant's view of the store (NamespacedStore, `for_tenant`) holds the
tenant's own manifests and also sees the shared base models (kind "base" at the root's models/);
its own model wins when both have an id. Blobs are one shared pool either way.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.common.errors import AlreadyExists, DataCorruption, InvalidArgument, NotFound
from services.common.namespaced_store import NamespacedStore, scoped_store
from services.common.object_store import ObjectStore, validate_key
from services.common.store_pins import Pin, wait_for_collectors

log = logging.getLogger(__name__)

MODEL_KINDS = ("base", "fine_tuned", "lora")
MANIFEST_VERSION = 1
# Pickle-based (or otherwise non-safetensors) weight formats: loading them can run code or they
# are frameworks we never load. Refused at import, whatever the folder.
FORBIDDEN_WEIGHT_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle", ".msgpack", ".h5")
_MODEL_ID = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_LABEL_KEY = re.compile(r"^[a-z][a-z0-9_.-]{0,62}$")
_CHUNK = 1024 * 1024
_MANIFEST_NAME = "manifest.json"
# Written into each materialised folder for humans and tools; hidden, so never re-imported.
LOCAL_MANIFEST_NAME = ".dreambooth-manifest.json"


def validate_model_id(model_id: str, field: str = "model_id") -> str:
    if not isinstance(model_id, str) or not _MODEL_ID.match(model_id):
        raise InvalidArgument(
            field,
            f"model id {model_id!r} must be 1-63 characters of lowercase letters, digits, '.', '_' "
            "or '-', starting with a letter or digit",
        )
    return model_id


def model_name(model_id: str) -> str:
    """The resource name of a model: `models/{id}`."""
    return f"models/{validate_model_id(model_id)}"


def parse_model_name(name: str, field: str = "model") -> str:
    """`models/{id}` -> id; InvalidArgument naming `field` when malformed."""
    if not isinstance(name, str) or not name.startswith("models/"):
        raise InvalidArgument(field, f"expected a model name 'models/{{id}}', got {name!r}")
    return validate_model_id(name.removeprefix("models/"), field)


def manifest_key(model_id: str) -> str:
    return f"models/{model_id}/{_MANIFEST_NAME}"


def blob_key(sha256: str) -> str:
    return f"blobs/sha256/{sha256}"


@dataclass(frozen=True)
class ManifestEntry:
    sha256: str
    size: int


@dataclass(frozen=True)
class ModelManifest:
    model_id: str
    kind: str
    base_model: str | None
    training_job: str | None
    create_time: str  # ISO-8601, UTC, e.g. "2025-01-31T12:00:00.000Z"
    labels: dict[str, str] = field(default_factory=dict)
    files: dict[str, ManifestEntry] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"models/{self.model_id}"

    @property
    def size_bytes(self) -> int:
        return sum(entry.size for entry in self.files.values())

    @property
    def digest(self) -> str:
        """sha256 of the canonical manifest: changes whenever any file or field changes."""
        return hashlib.sha256(self.canonical_bytes()).hexdigest()

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": MANIFEST_VERSION,
            "model_id": self.model_id,
            "kind": self.kind,
            "base_model": self.base_model,
            "training_job": self.training_job,
            "create_time": self.create_time,
            "labels": dict(sorted(self.labels.items())),
            "files": {
                path: {"sha256": entry.sha256, "size": entry.size}
                for path, entry in sorted(self.files.items())
            },
        }

    def canonical_bytes(self) -> bytes:
        return json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()

    @classmethod
    def from_json(cls, value: Any, model_id: str) -> ModelManifest:
        """Parse and validate a stored manifest; anything malformed is DataCorruption."""
        try:
            if value.get("format_version") != MANIFEST_VERSION:
                raise ValueError(f"unsupported format_version {value.get('format_version')!r}")
            if value["model_id"] != model_id:
                raise ValueError(f"names model {value['model_id']!r}")
            if value["kind"] not in MODEL_KINDS:
                raise ValueError(f"unknown kind {value['kind']!r}")
            files = {}
            for path, entry in value["files"].items():
                validate_key(path, "path")  # a tampered manifest must not write outside the folder
                if not _SHA256.match(entry["sha256"]) or not isinstance(entry["size"], int):
                    raise ValueError(f"bad entry for {path!r}")
                files[path] = ManifestEntry(sha256=entry["sha256"], size=entry["size"])
            labels = {str(k): str(v) for k, v in value.get("labels", {}).items()}
            return cls(
                model_id=model_id,
                kind=value["kind"],
                base_model=value.get("base_model"),
                training_job=value.get("training_job"),
                create_time=str(value["create_time"]),
                labels=labels,
                files=files,
            )
        except (KeyError, TypeError, AttributeError, ValueError, InvalidArgument) as err:
            raise DataCorruption(f"manifest of model {model_id!r} is malformed: {err}") from err


class ModelStore:
    """Publish, list and load models. Safe to share between threads and processes."""

    def __init__(self, store: ObjectStore, cache_dir: Path) -> None:
        self.store = store
        self.cache_dir = Path(cache_dir)
        # A tenant's view also sees the shared base models, which live at the root.
        self.shared = ModelStore(store.root, cache_dir) if isinstance(store, NamespacedStore) else None

    def __repr__(self) -> str:
        return f"ModelStore({self.store!r}, cache_dir={str(self.cache_dir)!r})"

    def for_tenant(self, tenant_name: str) -> ModelStore:
        """Tenant `tenant_name`'s models plus the shared bases (self for the implicit tenant)."""
        if self.shared is not None:
            raise ValueError("for_tenant() is asked of the root model store")
        return self if not tenant_name else ModelStore(scoped_store(self.store, tenant_name), self.cache_dir)

    # Publishing

    def import_folder(
        self,
        folder: Path,
        model_id: str,
        *,
        kind: str = "base",
        base_model: str | None = None,
        training_job: str | None = None,
        labels: Mapping[str, str] | None = None,
        overwrite: bool = False,
    ) -> ModelManifest:
        """Publish a local folder as `models/{model_id}`: blobs first, manifest last."""
        validate_model_id(model_id)
        if kind not in MODEL_KINDS:
            raise InvalidArgument("kind", f"must be one of {', '.join(MODEL_KINDS)}, got {kind!r}")
        if base_model is not None:
            validate_model_id(base_model, "base_model")
        labels = _validate_labels(labels or {})
        files = scan_folder(Path(folder))
        if kind != "lora" and "model_index.json" not in files:
            raise InvalidArgument(
                "folder", f"{folder} is not a diffusers pipeline folder (no model_index.json)"
            )
        if not overwrite and self.exists(model_id):
            raise AlreadyExists(f"model {model_id!r} already exists")

        entries = {rel_path: ManifestEntry(*file_sha256(path)) for rel_path, path in files.items()}
        blobs = {entry.sha256 for entry in entries.values()}
        with Pin(
            self.store, blobs=blobs, prefixes=[f"models/{model_id}/"], owner=f"publish {model_id}"
        ) as pin:
            uploaded = self._upload_blobs(files, entries, pin)
            manifest = self._write_manifest(model_id, kind, base_model, training_job, labels, entries)
        log.info(
            "published model %s: %d files, %d new blobs, %d bytes",
            model_id,
            len(entries),
            uploaded,
            manifest.size_bytes,
        )
        return manifest

    def _upload_blobs(self, files: dict[str, Path], entries: dict[str, ManifestEntry], pin: Pin) -> int:
        """Upload the blobs the store lacks; returns how many. Blobs already there are reused
        (content-addressed: shared with other models), once no collection could still sweep them."""
        uploaded = 0
        reused: list[str] = []
        for rel_path, local_path in files.items():
            entry = entries[rel_path]
            if self._blob_present(entry):
                reused.append(rel_path)
                continue
            self.store.put_file(blob_key(entry.sha256), local_path)
            uploaded += 1
            pin.refresh()
        if reused:
            wait_for_collectors(self.store)
            for rel_path in reused:  # a collection that missed the pin may have swept some
                if not self._blob_present(entries[rel_path]):
                    self.store.put_file(blob_key(entries[rel_path].sha256), files[rel_path])
                    uploaded += 1
        return uploaded

    def _write_manifest(
        self,
        model_id: str,
        kind: str,
        base_model: str | None,
        training_job: str | None,
        labels: dict[str, str],
        entries: dict[str, ManifestEntry],
    ) -> ModelManifest:
        manifest = ModelManifest(
            model_id=model_id,
            kind=kind,
            base_model=base_model,
            training_job=training_job,
            create_time=_now_iso(),
            labels=labels,
            files=entries,
        )
        self.store.put_bytes(manifest_key(model_id), _pretty(manifest.to_json()))  # last: publishes
        return manifest

    def _blob_present(self, entry: ManifestEntry) -> bool:
        try:
            # A blob of the wrong size is a leftover of a broken upload: upload it again.
            return self.store.stat(blob_key(entry.sha256)).size == entry.size
        except NotFound:
            return False

    # Reading

    def get(self, model_id: str) -> ModelManifest:
        validate_model_id(model_id)
        try:
            return self._read_own(model_id)
        except NotFound:
            shared = self._shared_base(model_id)
            if shared is not None:
                return shared
            raise

    def _read_own(self, model_id: str) -> ModelManifest:
        try:
            raw = self.store.get_bytes(manifest_key(model_id))
        except NotFound as err:
            raise NotFound(f"models/{model_id}", f"model {model_id!r} not found") from err
        try:
            value = json.loads(raw)
        except ValueError as err:
            raise DataCorruption(f"manifest of model {model_id!r} is not valid JSON: {err}") from err
        return ModelManifest.from_json(value, model_id)

    def exists(self, model_id: str) -> bool:
        validate_model_id(model_id)
        return self.owns(model_id) or self._shared_base(model_id) is not None

    def owns(self, model_id: str) -> bool:
        """Whether the model is this store's own (not a shared base seen from a tenant's view)."""
        validate_model_id(model_id)
        return self.store.exists(manifest_key(model_id))

    def _shared_base(self, model_id: str) -> ModelManifest | None:
        if self.shared is None:
            return None
        try:
            manifest = self.shared.get(model_id)
        except NotFound:
            return None
        return manifest if manifest.kind == "base" else None  # only bases are shared

    def published_by(self, model_id: str, training_job: str) -> bool:
        """The one rule for "is this job's model already there?": False when no model has the id,
        True when `training_job` published it, AlreadyExists when another model took the id."""
        if not self.exists(model_id):
            return False
        owner = self.get(model_id).training_job or ""
        if owner.removeprefix("trainingJobs/") == training_job.removeprefix("trainingJobs/"):
            return True
        raise AlreadyExists(
            f"model_id: model {model_id!r} was published by something else; "
            "create the job with another model_id"
        )

    def list(self) -> list[ModelManifest]:
        """Every published model, sorted by id (with the shared bases, seen from a tenant's view).
        Models with a malformed manifest are skipped."""
        manifests = {m.model_id: m for m in self.own_models()}
        if self.shared is not None:
            for manifest in self.shared.list():
                if manifest.kind == "base":
                    manifests.setdefault(manifest.model_id, manifest)
        return sorted(manifests.values(), key=lambda m: m.model_id)

    def own_models(self) -> list[ModelManifest]:
        """This store's own models (without the shared bases a tenant's view also sees)."""
        manifests = []
        for info in self.store.list("models/"):
            parts = info.key.split("/")
            if len(parts) != 3 or parts[2] != _MANIFEST_NAME or not _MODEL_ID.match(parts[1]):
                continue
            try:
                manifests.append(self._read_own(parts[1]))
            except NotFound:  # deleted while we listed
                continue
            except DataCorruption as err:
                log.warning("skipping model %s: %s", parts[1], err)
        return manifests

    def delete(self, model_id: str) -> None:
        """Unpublish: the manifest goes first (the model stops existing), then its other keys.

        Blobs stay: other models may share them. A tenant deletes only its own models.
        """
        validate_model_id(model_id)
        if not self.owns(model_id):
            raise NotFound(f"models/{model_id}", f"model {model_id!r} not found")
        self.store.delete(manifest_key(model_id))
        self.store.delete_prefix(f"models/{model_id}/")

    # Loading

    def materialize(self, model_id: str) -> Path:
        """A local folder with the model's files, every sha256 verified. Cached by digest."""
        return self.materialize_manifest(self.get(model_id))

    def materialize_manifest(self, manifest: ModelManifest) -> Path:
        """materialize() of a manifest already read (blobs only: any tenant's view will do)."""
        model_id = manifest.model_id
        models_dir = self.cache_dir / "models"
        target = models_dir / manifest.digest
        if target.is_dir():
            return target
        models_dir.mkdir(parents=True, exist_ok=True)
        building = Path(tempfile.mkdtemp(prefix=f".{manifest.digest[:16]}.", dir=models_dir))
        try:
            for rel_path, entry in sorted(manifest.files.items()):
                blob = self._cached_blob(model_id, rel_path, entry)
                dest = building.joinpath(*rel_path.split("/"))
                dest.parent.mkdir(parents=True, exist_ok=True)
                _link_or_copy(blob, dest)
            (building / LOCAL_MANIFEST_NAME).write_bytes(_pretty(manifest.to_json()))
            building.chmod(0o755)
            try:
                os.rename(building, target)
            except OSError:
                if not target.is_dir():  # not "someone else finished first"
                    raise
                shutil.rmtree(building, ignore_errors=True)  # a concurrent caller won the race
        except BaseException:
            shutil.rmtree(building, ignore_errors=True)
            raise
        log.info("materialised model %s (%s) at %s", model_id, manifest.digest[:12], target)
        return target

    def local_file(self, manifest: ModelManifest, rel_path: str) -> Path:
        """The verified local copy of one file of a model (fetched once into the blob cache), for
        a reader that needs one file and not the whole folder (a LoRA's weights). Read-only."""
        entry = manifest.files.get(rel_path)
        if entry is None:
            raise NotFound(
                f"{manifest.name}/{rel_path}", f"model {manifest.model_id!r} has no file {rel_path!r}"
            )
        return self._cached_blob(manifest.model_id, rel_path, entry)

    def _cached_blob(self, model_id: str, rel_path: str, entry: ManifestEntry) -> Path:
        """The verified local copy of a blob: downloaded once, checked, then renamed into the cache."""
        blobs_dir = self.cache_dir / "blobs" / "sha256"
        cached = blobs_dir / entry.sha256
        if cached.is_file():
            return cached
        blobs_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f".{entry.sha256[:16]}.", dir=blobs_dir) as tmp:
            downloaded = Path(tmp) / "blob"
            try:
                self.store.get_file(blob_key(entry.sha256), downloaded)
            except NotFound as err:
                raise DataCorruption(
                    f"model {model_id!r}: file {rel_path!r} is missing from the store "
                    f"(blob sha256:{entry.sha256})"
                ) from err
            digest, size = file_sha256(downloaded)
            if (digest, size) != (entry.sha256, entry.size):
                raise DataCorruption(
                    f"model {model_id!r}: file {rel_path!r} is corrupted in the store: expected "
                    f"sha256 {entry.sha256} ({entry.size} bytes), got sha256 {digest} ({size} bytes)"
                )
            os.replace(downloaded, cached)
        return cached


def scan_folder(folder: Path) -> dict[str, Path]:
    """Relative posix path -> file, sorted; refuses non-safetensors weights and odd names.

    Hidden files and folders (.cache, .gitattributes, our own local manifest) are skipped;
    symlinks are followed (Hugging Face cache snapshots are links to blobs).
    """
    if not folder.is_dir():
        raise InvalidArgument("folder", f"{folder} is not a directory")
    files: dict[str, Path] = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        rel_path = rel.as_posix()
        if path.suffix.lower() in FORBIDDEN_WEIGHT_SUFFIXES:
            raise InvalidArgument(
                "folder",
                f"{rel_path}: only safetensors weights are accepted ({path.suffix} files may run code "
                "when loaded); convert it to .safetensors or remove it",
            )
        validate_key(rel_path, "folder")
        files[rel_path] = path
    if not files:
        raise InvalidArgument("folder", f"{folder} has no files")
    return files


def file_sha256(path: Path) -> tuple[str, int]:
    """(hex sha256, size) of a file, streamed."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as source:
        while chunk := source.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _link_or_copy(source: Path, dest: Path) -> None:
    try:
        os.link(source, dest)
    except OSError:  # another filesystem, or links not supported
        with contextlib.suppress(FileNotFoundError):
            dest.unlink()
        shutil.copyfile(source, dest)


def _validate_labels(labels: Mapping[str, str]) -> dict[str, str]:
    for key, value in labels.items():
        if not isinstance(key, str) or not _LABEL_KEY.match(key):
            raise InvalidArgument("labels", f"label key {key!r} must match [a-z][a-z0-9_.-]{{0,62}}")
        if not isinstance(value, str) or len(value) > 256:
            raise InvalidArgument("labels", f"label {key!r} must be a string of at most 256 characters")
    return dict(sorted(labels.items()))


def _now_iso() -> str:
    now = dt.datetime.now(dt.timezone.utc)
    return now.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _pretty(value: Any) -> bytes:
    return (json.dumps(value, indent=2, sort_keys=True) + "\n").encode()
