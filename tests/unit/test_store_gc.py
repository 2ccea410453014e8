"""The store's garbage collector (local store): delete + collect leaves no orphan and never breaks
a model still referenced, also while a publish runs at the same time (pins, collector notices)."""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import services.common.model_store as model_store_module
from services.common.errors import DataCorruption
from services.common.local_store import LocalObjectStore
from services.common.model_store import ModelStore, blob_key, file_sha256
from services.common.namespaced_store import scoped_store
from services.common.object_store import ObjectInfo
from services.common.store_pins import NOTICES_PREFIX, PINS_PREFIX
from services.gc.collector import CollectionReport, collect
from services.gc.main import main as gc_main
from services.trainer.dataset_layout import write_dataset
from services.trainer.job_spec import JobSpec
from services.trainer.jobs.records import JobRepository, JobState
from tests.fixtures.trainer_server import make_png

USED_PRIORS = "priors/" + "a" * 64 + "/"
UNUSED_PRIORS = "priors/" + "b" * 64 + "/"
DEAD_UPLOAD = "datasets/" + "c" * 64 + "/"


def fake_model(tmp_path: Path, name: str, files: dict[str, bytes]) -> Path:
    folder = tmp_path / name
    for path, data in files.items():
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        (folder / path).write_bytes(data)
    return folder


def keys(store: LocalObjectStore) -> set[str]:
    return {info.key for info in store.list()}


def finish(repo: JobRepository, job_id: str) -> None:
    for state in (JobState.TRAINING, JobState.PUBLISHING, JobState.SUCCEEDED):
        repo.transition(job_id, state)


@dataclasses.dataclass
class World:
    store: LocalObjectStore
    models: ModelStore
    finished_job: str
    running_job: str
    tuned_unet_blob: str


@pytest.fixture
def world(tmp_path: Path, tiny_model_dir: Path) -> World:
    """A store with every kind of object: referenced, and garbage of every kind."""
    store = LocalObjectStore(tmp_path / "store")
    models = ModelStore(store, tmp_path / "cache")
    models.import_folder(tiny_model_dir, "tiny-sd")
    tuned = tmp_path / "tuned"
    shutil.copytree(tiny_model_dir, tuned)
    (tuned / "unet" / "config.json").write_text('{"a fine-tuned": "unet"}')  # its own blob
    models.import_folder(tuned, "tuned", kind="fine_tuned", base_model="tiny-sd")
    lora = fake_model(tmp_path, "lora", {"pytorch_lora_weights.safetensors": b"adapter weights"})
    models.import_folder(lora, "lora-a", kind="lora", base_model="tiny-sd")
    used = write_dataset(store, "d" * 64, [make_png(0)])
    write_dataset(store, "e" * 64, [make_png(1)])

    repo = JobRepository(store)
    spec = JobSpec(
        base_model="tiny-sd",
        dataset=used.dataset_id,
        instance_prompt="a photo of sks dog",
        with_prior_preservation=True,
        class_prompt="a photo of dog",
    )
    finished, _ = repo.create(spec, request_id="", request_fingerprint="")
    repo.update(finished.job_id, prior_prefix=USED_PRIORS)
    finish(repo, finished.job_id)
    running, _ = repo.create(spec, request_id="", request_fingerprint="")
    repo.update(running.job_id, prior_prefix=USED_PRIORS)
    repo.transition(running.job_id, JobState.TRAINING)
    for job_id in (finished.job_id, running.job_id):
        store.put_bytes(f"jobs/{job_id}/checkpoints/step-00000002/trainable.safetensors", b"w" * 100)
        store.put_bytes(f"jobs/{job_id}/checkpoints/step-00000002/checkpoint.json", b"{}")
        store.put_bytes(f"jobs/{job_id}/previews/step-00000002-0001.jpg", b"jpeg")
        store.put_bytes(f"jobs/{job_id}/events.jsonl", b"{}\n")
    store.put_bytes("jobs/0123456789ab/previews/step-00000001-0001.jpg", b"a deleted job's preview")
    for prefix in (USED_PRIORS, UNUSED_PRIORS):
        store.put_bytes(f"{prefix}images/00000.png", make_png(2))
        store.put_bytes(f"{prefix}manifest.json", b"{}")
    store.put_bytes(f"{DEAD_UPLOAD}images/000.png", make_png(3))  # an upload that died
    store.put_json(f"{PINS_PREFIX}crashed.json", {"blobs": [], "prefixes": ["x/"], "expires": 1.0})
    store.put_bytes("other/not-ours.bin", b"kept: not a layout the collector knows")
    tuned_unet = models.get("tuned").files["unet/config.json"].sha256
    return World(store, models, finished.job_id, running.job_id, tuned_unet)


def test_delete_then_collect_leaves_no_orphan_and_keeps_every_referenced_model(world: World) -> None:
    store, models = world.store, world.models
    models.delete("tuned")
    before = keys(store)
    shared = {blob_key(e.sha256) for e in models.get("tiny-sd").files.values()}

    dry = collect(store, dry_run=True)
    assert keys(store) == before  # a dry run removes nothing
    report = collect(store)

    f, r = world.finished_job, world.running_job
    expected = {
        blob_key(world.tuned_unet_blob): "blob",  # only the deleted model had it
        f"jobs/{f}/checkpoints/step-00000002/checkpoint.json": "checkpoint",  # a finished job's
        f"jobs/{f}/checkpoints/step-00000002/trainable.safetensors": "checkpoint",
        "jobs/0123456789ab/previews/step-00000001-0001.jpg": "job leftovers",
        f"{UNUSED_PRIORS}images/00000.png": "prior set",
        f"{UNUSED_PRIORS}manifest.json": "prior set",
        f"{DEAD_UPLOAD}images/000.png": "dataset leftovers",
        f"{PINS_PREFIX}crashed.json": "expired pin",
    }
    assert {g.key: g.kind for g in report.garbage} == expected
    assert {g.key: g.kind for g in dry.garbage} == expected
    assert report.complete and report.deleted == len(expected)
    assert report.bytes == sum(g.size for g in dry.garbage) > 0
    # The set of a prior set is deleted manifest first: an interrupted sweep never leaves it looking whole.
    removed = [g.key for g in report.garbage]
    assert removed.index(f"{UNUSED_PRIORS}manifest.json") < removed.index(f"{UNUSED_PRIORS}images/00000.png")
    assert keys(store) == before - set(expected)
    assert shared <= keys(store)  # the blobs the deleted model shared with its base stay
    assert f"jobs/{r}/checkpoints/step-00000002/checkpoint.json" in keys(store)  # the running job's
    assert f"{USED_PRIORS}manifest.json" in keys(store) and "other/not-ours.bin" in keys(store)
    assert not [k for k in keys(store) if k.startswith(NOTICES_PREFIX)]  # the notice went too
    assert collect(store).garbage == ()  # nothing left to collect: no orphan
    for model_id in ("tiny-sd", "lora-a"):  # every blob of every model is there and verified
        assert models.materialize(model_id).is_dir()


def test_every_subjects_prior_set_of_a_multi_subject_job_is_kept(world: World) -> None:
    cat_priors = "priors/" + "f" * 64 + "/"
    world.store.put_bytes(f"{cat_priors}images/00000.png", make_png(4))
    world.store.put_bytes(f"{cat_priors}manifest.json", b"{}")
    repo = JobRepository(world.store)
    repo.load()
    repo.update(world.finished_job, additional_prior_prefixes=(cat_priors,))

    swept = {g.key for g in collect(world.store).garbage}
    assert f"{UNUSED_PRIORS}manifest.json" in swept
    assert not [key for key in swept if key.startswith((cat_priors, USED_PRIORS))]


def test_the_gc_command_lists_what_a_dry_run_would_remove_and_the_bytes(
    world: World, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DREAMBOOTH_STORE_DIR", str(world.store.root))
    before = keys(world.store)
    assert gc_main(["--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert keys(world.store) == before
    assert any(line.startswith("would remove prior set") and UNUSED_PRIORS in line for line in out)
    assert out[-1].startswith("total: would remove 7 objects, ")  # the 8th, the deleted model's blob, is live
    assert gc_main([]) == 0 and keys(world.store) == before - {line.split()[-1] for line in out[:7]}


class HookedStore(LocalObjectStore):
    """A local store that calls `hook(operation, argument)` after every put_file and list."""

    def __init__(self, root: Path, hook: Callable[[str, Any], None]) -> None:
        super().__init__(root)
        self.hook = hook

    def put_file(self, key: str, path: Path) -> None:
        super().put_file(key, path)
        self.hook("put_file", key)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        found = list(super().list(prefix))
        self.hook("list", prefix)
        return iter(found)


@contextlib.contextmanager
def unpinned_publishes(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The publish protocol without its pin and its wait: the control that shows the tests can fail."""

    class NoPin:
        def __init__(self, *args: object, **kwargs: object) -> None:
            pass

        def __enter__(self) -> NoPin:
            return self

        def __exit__(self, *exc_info: object) -> None:
            pass

        def refresh(self) -> None:
            pass

    monkeypatch.setattr(model_store_module, "Pin", NoPin)
    monkeypatch.setattr(model_store_module, "wait_for_collectors", lambda store: None)
    yield


@pytest.mark.parametrize("protected", [True, False])
def test_a_collection_during_a_publish_never_sweeps_the_blobs_it_uploaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, protected: bool
) -> None:
    reports = []

    def collect_after_the_first_blob(operation: str, key: str) -> None:
        if operation == "put_file" and not reports:  # the publish is half done: no manifest yet
            reports.append(collect(store))

    store = HookedStore(tmp_path / "store", collect_after_the_first_blob)
    models = ModelStore(store, tmp_path / "cache")
    folder = fake_model(tmp_path, "new", {"a.safetensors": b"first blob", "b.safetensors": b"second blob"})
    with contextlib.ExitStack() as stack:
        if not protected:
            stack.enter_context(unpinned_publishes(monkeypatch))
        models.import_folder(folder, "new", kind="lora", base_model="tiny-sd")
    first = blob_key(file_sha256(folder / "a.safetensors")[0])
    if protected:
        assert reports[0].garbage == () and models.materialize("new").is_dir()
    else:  # without the pin the collection takes the blob, and the model is broken
        assert [g.key for g in reports[0].garbage] == [first]
        with pytest.raises(DataCorruption, match="missing from the store"):
            models.materialize("new")


@pytest.mark.parametrize(("protected", "tenant"), [(True, ""), (True, "acme"), (False, "")])
def test_a_publish_reusing_a_blob_a_running_collection_sweeps_uploads_it_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, protected: bool, tenant: str
) -> None:
    """The collection has listed an orphan blob and read the pins and records; the publish,
    reusing that blob, starts before the collection sweeps. A tenant's publish (its pin in its
    own prefix) waits for the collector's notice at the store's root just the same."""
    publisher_waits, publisher_done = threading.Event(), threading.Event()
    state: dict[str, Any] = {}

    def hook(operation: str, prefix: str) -> None:
        thread = threading.current_thread().name
        if operation != "list":
            return
        if thread == "publisher" and prefix == NOTICES_PREFIX:
            publisher_waits.set()  # it sees the collector's notice: it will wait
        if thread == "collector" and prefix == NOTICES_PREFIX and "publisher" not in state:
            state["publisher"] = threading.Thread(target=publish, name="publisher")
            state["publisher"].start()  # pins (none) and records are read: now the publish starts
            deadline = time.monotonic() + 30
            while not (publisher_waits.is_set() or publisher_done.is_set()):
                assert time.monotonic() < deadline
                time.sleep(0.01)

    def publish() -> None:
        try:
            models.import_folder(new, "new", kind="lora", base_model="tiny-sd")
        except BaseException as err:
            state["error"] = err
        finally:
            publisher_done.set()

    store = HookedStore(tmp_path / "store", hook)
    models = ModelStore(scoped_store(store, tenant), tmp_path / "cache")
    shared = {"shared.safetensors": b"bytes two models have in common"}
    models.import_folder(fake_model(tmp_path, "old", shared), "old", kind="lora", base_model="tiny-sd")
    models.delete("old")  # its blob is an orphan now
    new = fake_model(tmp_path, "new", {**shared, "own.safetensors": b"the new model's own bytes"})
    with contextlib.ExitStack() as stack:
        if not protected:
            stack.enter_context(unpinned_publishes(monkeypatch))
        collector = threading.Thread(
            target=lambda: state.setdefault("report", collect(store)), name="collector"
        )
        collector.start()
        collector.join(60)
        state["publisher"].join(60)
    assert "error" not in state
    assert publisher_waits.is_set() == protected  # it saw the collection's notice and waited
    orphan = blob_key(file_sha256(new / "shared.safetensors")[0])
    assert orphan in [g.key for g in state["report"].garbage]  # the race happened: it was swept
    if protected:  # the publisher waited for the collection, then uploaded it again
        assert models.materialize("new").is_dir()
    else:
        with pytest.raises(DataCorruption, match="missing from the store"):
            models.materialize("new")


def test_every_tenants_manifests_and_pins_keep_their_blobs_and_an_unreferenced_one_goes(
    tmp_path: Path,
) -> None:
    """Tenants alpha and beta share the blob pool. A collection runs while alpha's second publish
    has uploaded its first blob (pinned in alpha's prefix, no manifest yet): alpha's published
    and in-flight blobs stay, so does a blob beta's deleted model shared with alpha's; the blob
    only beta's deleted model had goes, with beta's dead upload and its expired pin."""
    reports: list[CollectionReport] = []
    armed = threading.Event()

    def collect_mid_publish(operation: str, key: str) -> None:
        if operation == "put_file" and armed.is_set() and not reports:
            reports.append(collect(store))

    store = HookedStore(tmp_path / "store", collect_mid_publish)
    ModelStore(store, tmp_path / "cache").import_folder(
        fake_model(tmp_path, "base", {"model_index.json": b"{}", "unet.safetensors": b"the shared base"}),
        "base",
    )
    alpha = ModelStore(scoped_store(store, "alpha"), tmp_path / "cache")
    beta = ModelStore(scoped_store(store, "beta"), tmp_path / "cache")
    common = {"common.safetensors": b"bytes alpha's and beta's models share"}
    alpha.import_folder(
        fake_model(tmp_path, "a1", {**common, "own.safetensors": b"alpha's own"}),
        "a1",
        kind="lora",
        base_model="base",
    )
    beta.import_folder(
        fake_model(tmp_path, "b1", {**common, "own.safetensors": b"beta's own"}),
        "b1",
        kind="lora",
        base_model="base",
    )
    beta_only = blob_key(beta.get("b1").files["own.safetensors"].sha256)
    beta.delete("b1")
    write_dataset(scoped_store(store, "beta"), "c" * 64, [make_png(3)])
    beta_dead_upload = f"tenants/beta/datasets/{'c' * 64}/images/000.png"
    store.delete(f"tenants/beta/datasets/{'c' * 64}/manifest.json")  # an upload that died
    store.put_json("tenants/beta/pins/crashed.json", {"blobs": [], "prefixes": ["x/"], "expires": 1.0})
    assert alpha.get("base").kind == "base"  # the shared base, seen from alpha's view

    in_flight = fake_model(
        tmp_path, "a2", {"first.safetensors": b"alpha 2, first", "second.safetensors": b"2nd"}
    )
    armed.set()
    alpha.import_folder(in_flight, "a2", kind="lora", base_model="base")

    swept = {g.key: g.kind for g in reports[0].garbage}
    assert swept == {
        beta_only: "blob",
        beta_dead_upload: "dataset leftovers",
        "tenants/beta/pins/crashed.json": "expired pin",
    }
    assert [key for key in keys(store) if key.startswith("tenants/alpha/pins/")] == []  # unpinned after
    for model_id in ("a1", "a2", "base"):  # every blob alpha references is there and verified
        assert alpha.materialize(model_id).is_dir()
    assert collect(store).garbage == ()


def test_a_collection_takes_the_root_never_a_tenants_view(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="root"):
        collect(scoped_store(LocalObjectStore(tmp_path / "store"), "alpha"))
