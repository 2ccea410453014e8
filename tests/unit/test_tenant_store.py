"""How the store keeps tenants apart: prefixes, the shared base models and blobs, salted datasets,
and job records read back per tenant."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.common.errors import InvalidArgument, NotFound
from services.common.local_store import LocalObjectStore
from services.common.model_store import ModelStore
from services.common.namespaced_store import NamespacedStore, scoped_store
from services.common.settings import StoreSettings
from services.common.store_factory import open_store
from services.common.usage import IMAGES_GENERATED, TenantLabels, UsageLedger, ledger_total, stored_bytes
from services.trainer.job_spec import JobSpec
from services.trainer.jobs.datasets import DatasetStore
from services.trainer.jobs.records import JobRepository
from tests.fixtures.models import TINY_MODEL_ID
from tests.fixtures.trainer_server import make_dataset

SPEC = JobSpec(base_model=TINY_MODEL_ID, dataset="d" * 64, instance_prompt="a photo of sks dog", model_id="m")


def keys(store: LocalObjectStore) -> list[str]:
    return [info.key for info in store.list("")]


def test_a_tenant_view_prefixes_every_key_but_blobs(tmp_path: Path) -> None:
    root = LocalObjectStore(tmp_path / "store")
    acme = scoped_store(root, "acme")
    assert scoped_store(root, "") is root  # the implicit tenant is the root itself
    acme.put_bytes("jobs/1/job.json", b"{}")
    acme.put_bytes("blobs/sha256/ab", b"shared")
    assert keys(root) == ["blobs/sha256/ab", "tenants/acme/jobs/1/job.json"]
    assert [info.key for info in acme.list("jobs/")] == ["jobs/1/job.json"]
    assert (
        acme.get_bytes("blobs/sha256/ab")
        == b"shared"
        == scoped_store(root, "beta").get_bytes("blobs/sha256/ab")
    )

    beta = scoped_store(root, "beta")
    assert list(beta.list("jobs/")) == [] and not beta.exists("jobs/1/job.json")
    with pytest.raises(NotFound) as info:
        beta.get_bytes("jobs/1/job.json")
    assert str(info.value) == "object 'jobs/1/job.json' not found"  # names the key as the tenant sees it
    with pytest.raises(InvalidArgument):
        beta.get_bytes("../acme/jobs/1/job.json")  # no way out of the prefix
    with pytest.raises(ValueError):
        NamespacedStore(acme, "tenants/x/")  # type: ignore[arg-type]
    assert isinstance(
        open_store(StoreSettings(store_dir=str(tmp_path / "store"), namespace="tenants/acme/")),
        NamespacedStore,
    )


def test_a_tenant_sees_its_models_and_only_the_shared_bases(
    tmp_path: Path, local_model_store: ModelStore
) -> None:
    root = local_model_store  # holds tiny-sd, imported by the operator: a shared base
    folder = root.materialize(TINY_MODEL_ID)
    acme, beta = root.for_tenant("acme"), root.for_tenant("beta")
    acme.import_folder(folder, "acme-dog", kind="fine_tuned", base_model=TINY_MODEL_ID)
    root.import_folder(folder, "old-fine-tune", kind="fine_tuned", base_model=TINY_MODEL_ID)

    assert [m.model_id for m in acme.list()] == ["acme-dog", TINY_MODEL_ID]
    assert [m.model_id for m in beta.list()] == [TINY_MODEL_ID]  # not acme's; root fine-tunes are not shared
    assert [m.model_id for m in acme.own_models()] == ["acme-dog"]
    assert (
        acme.get(TINY_MODEL_ID).kind == "base" and acme.exists(TINY_MODEL_ID) and not acme.owns(TINY_MODEL_ID)
    )
    missing = pytest.raises(NotFound)
    with missing as other:
        beta.get("acme-dog")
    with pytest.raises(NotFound) as absent:
        beta.get("no-such-model")
    assert str(other.value) == str(absent.value).replace("no-such-model", "acme-dog")
    with pytest.raises(NotFound):
        beta.get("old-fine-tune")
    assert beta.materialize(TINY_MODEL_ID) == folder  # the same verified bytes: blobs are one pool
    keys_of_acme = [info.key for info in root.store.list("tenants/")]
    assert keys_of_acme == ["tenants/acme/models/acme-dog/manifest.json"]
    assert beta.published_by("acme-dog", "trainingJobs/x") is False  # its id is free in beta's view


def test_the_same_photos_are_a_different_dataset_for_each_tenant(tmp_path: Path) -> None:
    root = LocalObjectStore(tmp_path / "store")
    implicit = make_dataset(DatasetStore(root))
    acme = make_dataset(DatasetStore(root, "acme"))
    beta = make_dataset(DatasetStore(root, "beta"))
    assert len({implicit.dataset_id, acme.dataset_id, beta.dataset_id}) == 3
    assert make_dataset(DatasetStore(root, "acme")).dataset_id == acme.dataset_id  # still content-addressed
    assert DatasetStore(root, "beta").exists(beta.dataset_id) and not DatasetStore(root, "beta").exists(
        acme.dataset_id
    )
    assert root.exists(f"datasets/{implicit.dataset_id}/manifest.json")  # the implicit tenant: as before
    assert root.exists(f"tenants/acme/datasets/{acme.dataset_id}/manifest.json")
    assert stored_bytes(root, "acme", tmp_path / "cache") == sum(
        info.size for info in root.list("tenants/acme/datasets/")
    )


def test_job_records_live_and_load_per_tenant(tmp_path: Path) -> None:
    root = LocalObjectStore(tmp_path / "store")
    repo = JobRepository(root)
    mine, _ = repo.create(SPEC, request_id="r-1", request_fingerprint="f", tenant="acme")
    theirs, created = repo.create(SPEC, request_id="r-1", request_fingerprint="other", tenant="beta")
    assert created and theirs.job_id != mine.job_id  # request ids are per tenant: no ALREADY_EXISTS
    old, _ = repo.create(SPEC, request_id="", request_fingerprint="", tenant="")
    assert root.exists(f"tenants/acme/jobs/{mine.job_id}/job.json")
    assert root.exists(f"jobs/{old.job_id}/job.json")

    with pytest.raises(NotFound) as other:
        repo.get(theirs.job_id, "acme")
    with pytest.raises(NotFound) as absent:
        repo.get("0123456789ab", "acme")
    assert str(other.value) == str(absent.value).replace("0123456789ab", theirs.job_id)
    assert [job.job_id for job in repo.list(tenant="acme").jobs] == [mine.job_id]

    reloaded = JobRepository(root)
    assert {job.job_id for job in reloaded.load(("acme", "beta"))} == {mine.job_id, theirs.job_id, old.job_id}
    assert {job.job_id for job in JobRepository(root).load()} == {old.job_id}  # beta's are not loaded unasked
    assert reloaded.find_by_request("r-1", "f", "acme") == repo.get(mine.job_id)


def test_usage_ledgers_add_up_over_replicas_and_restarts(tmp_path: Path) -> None:
    root = LocalObjectStore(tmp_path / "store")
    first, second = UsageLedger(root, "inference"), UsageLedger(root, "inference")
    first.add("acme", IMAGES_GENERATED, 3)
    second.add("acme", IMAGES_GENERATED, 2)
    second.add("beta", IMAGES_GENERATED, 7)
    first.flush()
    second.close()  # a replica that stops writes what it counted
    restarted = UsageLedger(root, "inference")  # a new process: a new object, nothing overwritten
    restarted.add("acme", IMAGES_GENERATED, 1)
    restarted.flush()
    assert ledger_total(root, "acme", IMAGES_GENERATED) == 6
    assert ledger_total(root, "beta", IMAGES_GENERATED) == 7 and ledger_total(root, "", IMAGES_GENERATED) == 0
    assert all(info.key.startswith(("tenants/acme/usage/", "tenants/beta/usage/")) for info in root.list(""))


def test_tenant_labels_are_bounded() -> None:
    labels = TenantLabels(limit=2)
    assert [labels(name) for name in ("a", "b", "c", "a", "d")] == ["a", "b", "other", "a", "other"]
