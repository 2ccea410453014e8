"""The model store on a real S3 server (and the local directory store): publish, share, load, verify."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import threading
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from services.common import model_store_cli
from services.common.errors import AlreadyExists, DataCorruption, InvalidArgument, NotFound
from services.common.local_store import LocalObjectStore
from services.common.model_store import (
    LOCAL_MANIFEST_NAME,
    ModelStore,
    blob_key,
    manifest_key,
    model_name,
    parse_model_name,
)
from services.common.object_store import ObjectStore
from services.common.pipelines import load_pipeline
from services.common.settings import StoreSettings
from services.common.store_factory import open_store

UNET = "unet/diffusion_pytorch_model.safetensors"


def tree(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.name.startswith(".")
    }


def fine_tuned_copy(tiny_model_dir: Path, dest: Path) -> Path:
    """The tiny model with one UNet tensor nudged, as a fine-tune that left the VAE alone would be."""
    shutil.copytree(tiny_model_dir, dest)
    tensors = load_file(dest / UNET)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 0.01
    save_file(tensors, dest / UNET, metadata={"format": "pt"})
    return dest


@pytest.fixture(params=["s3", "local"])
def any_model_store(request: pytest.FixtureRequest) -> ModelStore:
    return request.getfixturevalue("model_store" if request.param == "s3" else "local_model_store")


def test_import_then_materialize_round_trip(any_model_store: ModelStore, tiny_model_dir: Path) -> None:
    models = any_model_store
    manifest = models.get("tiny-sd")
    assert manifest.name == model_name("tiny-sd") == "models/tiny-sd"
    assert manifest.kind == "base" and manifest.base_model is None
    assert manifest.labels == {"source": "tiny-model"}
    assert manifest.create_time.endswith("Z")
    assert manifest.files[UNET].sha256 == tree(tiny_model_dir)[UNET]
    assert manifest.size_bytes == sum(p.stat().st_size for p in tiny_model_dir.rglob("*") if p.is_file())
    assert models.exists("tiny-sd") and not models.exists("other")
    assert [m.model_id for m in models.list()] == ["tiny-sd"]
    # Stored layout: content-addressed blobs, manifest under the model.
    assert models.store.exists(manifest_key("tiny-sd"))
    assert models.store.exists(blob_key(manifest.files[UNET].sha256))

    folder = models.materialize("tiny-sd")
    assert folder.name == manifest.digest
    assert tree(folder) == tree(tiny_model_dir)
    assert json.loads((folder / LOCAL_MANIFEST_NAME).read_text())["model_id"] == "tiny-sd"
    assert models.materialize("tiny-sd") == folder  # cached by digest
    assert [p.name for p in (models.cache_dir / "models").iterdir()] == [manifest.digest]


def test_materialized_model_loads_as_a_pipeline(model_store: ModelStore, tmp_path: Path) -> None:
    fresh = ModelStore(model_store.store, tmp_path / "another-cache")  # e.g. another replica
    pipe = load_pipeline(fresh.materialize("tiny-sd"))
    assert pipe.tokenizer("a photo of sks dog").input_ids[0] == 49406


def test_models_share_blobs_of_identical_files(
    model_store: ModelStore, tiny_model_dir: Path, tmp_path: Path
) -> None:
    blobs_before = {info.key for info in model_store.store.list("blobs/")}
    tuned = model_store.import_folder(
        fine_tuned_copy(tiny_model_dir, tmp_path / "tuned"),
        "tiny-sd-dog",
        kind="fine_tuned",
        base_model="tiny-sd",
        training_job="job-1",
    )
    base = model_store.get("tiny-sd")
    blobs_after = {info.key for info in model_store.store.list("blobs/")}
    assert blobs_after - blobs_before == {blob_key(tuned.files[UNET].sha256)}  # only the UNet is new
    changed = {path for path in base.files if base.files[path] != tuned.files[path]}
    assert changed == {UNET}
    assert (tuned.base_model, tuned.training_job, tuned.kind) == ("tiny-sd", "job-1", "fine_tuned")
    assert [m.model_id for m in model_store.list()] == ["tiny-sd", "tiny-sd-dog"]
    assert model_store.materialize("tiny-sd-dog") != model_store.materialize("tiny-sd")


def test_corrupted_blob_names_the_file_and_leaves_no_folder(model_store: ModelStore, tmp_path: Path) -> None:
    manifest = model_store.get("tiny-sd")
    model_store.store.put_bytes(blob_key(manifest.files[UNET].sha256), b"bit rot")
    reader = ModelStore(model_store.store, tmp_path / "cache")
    with pytest.raises(DataCorruption, match=re.escape(UNET)):
        reader.materialize("tiny-sd")
    models_dir = tmp_path / "cache" / "models"
    assert not models_dir.exists() or list(models_dir.iterdir()) == []
    assert not (tmp_path / "cache" / "blobs" / "sha256" / manifest.files[UNET].sha256).exists()


def test_missing_blob_names_the_file(model_store: ModelStore, tmp_path: Path) -> None:
    manifest = model_store.get("tiny-sd")
    model_store.store.delete(blob_key(manifest.files["vae/config.json"].sha256))
    with pytest.raises(DataCorruption, match=re.escape("vae/config.json")):
        ModelStore(model_store.store, tmp_path / "cache").materialize("tiny-sd")


def test_a_model_without_manifest_does_not_exist(model_store: ModelStore) -> None:
    model_store.store.delete(manifest_key("tiny-sd"))  # blobs are all there, as after a crash
    assert model_store.store.list("blobs/")
    assert not model_store.exists("tiny-sd")
    assert model_store.list() == []
    with pytest.raises(NotFound):
        model_store.get("tiny-sd")
    with pytest.raises(NotFound):
        model_store.materialize("tiny-sd")


def test_existing_id_is_not_overwritten_unless_asked(model_store: ModelStore, tiny_model_dir: Path) -> None:
    first = model_store.get("tiny-sd")
    with pytest.raises(AlreadyExists):
        model_store.import_folder(tiny_model_dir, "tiny-sd")
    again = model_store.import_folder(tiny_model_dir, "tiny-sd", labels={"v": "2"}, overwrite=True)
    assert again.files == first.files and again.labels == {"v": "2"}


def test_delete_unpublishes_but_keeps_shared_blobs(model_store: ModelStore) -> None:
    model_store.delete("tiny-sd")
    assert not model_store.exists("tiny-sd")
    assert model_store.store.list("blobs/")
    with pytest.raises(NotFound):
        model_store.delete("tiny-sd")


@pytest.mark.parametrize(
    "weights", ["unet/diffusion_pytorch_model.bin", "model.ckpt", "text_encoder/weights.pt"]
)
def test_pickle_weights_are_refused_naming_the_file(
    s3_store: ObjectStore, tiny_model_dir: Path, tmp_path: Path, weights: str
) -> None:
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    (folder / weights).write_bytes(b"pickle bytes")
    models = ModelStore(s3_store, tmp_path / "cache")
    with pytest.raises(InvalidArgument, match="only safetensors") as err:
        models.import_folder(folder, "pickled")
    assert weights in str(err.value)
    assert list(s3_store.list()) == []  # refused before anything was uploaded


def test_bad_ids_and_names_are_invalid_arguments(tmp_path: Path, tiny_model_dir: Path) -> None:
    models = ModelStore(LocalObjectStore(tmp_path / "store"), tmp_path / "cache")
    for bad in ["", "Tiny", "-x", "a/b", "..", "x" * 64]:
        with pytest.raises(InvalidArgument):
            models.import_folder(tiny_model_dir, bad)
    with pytest.raises(InvalidArgument):
        models.import_folder(tiny_model_dir, "ok", kind="weird")
    with pytest.raises(InvalidArgument):
        models.import_folder(tmp_path / "nowhere", "ok")
    assert parse_model_name("models/tiny-sd") == "tiny-sd"
    with pytest.raises(InvalidArgument) as err:
        parse_model_name("tiny-sd", field="model")
    assert err.value.field == "model"
    with pytest.raises(InvalidArgument):
        parse_model_name("models/../x", field="model")


def test_tampered_manifest_paths_are_refused(local_model_store: ModelStore) -> None:
    store = local_model_store.store
    value = store.get_json(manifest_key("tiny-sd"))
    value["files"]["../../outside"] = value["files"].pop("model_index.json")
    store.put_json(manifest_key("tiny-sd"), value)
    with pytest.raises(DataCorruption, match="malformed"):
        local_model_store.materialize("tiny-sd")


def test_concurrent_materialize_builds_one_complete_folder(
    local_model_store: ModelStore, tmp_path: Path
) -> None:
    readers = [ModelStore(local_model_store.store, tmp_path / "shared-cache") for _ in range(4)]
    results: list[Path] = []
    errors: list[BaseException] = []

    def load(models: ModelStore) -> None:
        try:
            results.append(models.materialize("tiny-sd"))
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=load, args=(models,)) for models in readers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors and len(set(results)) == 1 and len(results) == 4
    assert [p.name for p in (tmp_path / "shared-cache" / "models").iterdir()] == [results[0].name]
    assert "model_index.json" in tree(results[0])


def test_reimport_repairs_a_truncated_blob(
    model_store: ModelStore, tiny_model_dir: Path, tmp_path: Path
) -> None:
    manifest = model_store.get("tiny-sd")
    model_store.store.put_bytes(blob_key(manifest.files[UNET].sha256), b"half an upload")
    model_store.import_folder(tiny_model_dir, "tiny-sd", overwrite=True)
    assert tree(ModelStore(model_store.store, tmp_path / "cache").materialize("tiny-sd")) == tree(
        tiny_model_dir
    )


def test_import_model_command_uses_the_store_settings(
    s3_store_settings: StoreSettings, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    settings = s3_store_settings
    monkeypatch.setenv("DREAMBOOTH_S3_ENDPOINT", settings.s3_endpoint)
    monkeypatch.setenv("DREAMBOOTH_S3_ACCESS_KEY", settings.s3_access_key)
    monkeypatch.setenv("DREAMBOOTH_S3_SECRET_KEY", settings.s3_secret_key)
    monkeypatch.setenv("DREAMBOOTH_S3_BUCKET", settings.s3_bucket)
    monkeypatch.setenv("DREAMBOOTH_CACHE_DIR", settings.cache_dir)
    argv = ["--from", str(tiny_model_dir), "--id", "sd-tiny", "--label", "team=ml"]
    assert model_store_cli.main(argv) == 0
    assert "imported models/sd-tiny" in capsys.readouterr().out
    assert model_store_cli.main(argv) == 1  # exists already
    assert "already exists" in capsys.readouterr().err
    models = ModelStore(open_store(settings), Path(settings.cache_dir))
    assert models.get("sd-tiny").labels == {"team": "ml"}
