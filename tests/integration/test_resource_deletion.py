"""DeleteTrainingJob, DeleteDataset and DeleteModel over real gRPC (S3 store), through the SDK and
the CLI, then a collection: refused while a running job needs a resource, and afterwards the
store keeps nothing the deleted resources left behind.

The training core is a stand-in (no Ray): deletion is about the records, not the training.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from dreambooth.v1 import trainer_pb2
from dreambooth_client import (
    DreamBoothClient,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    cli,
)

from services.common.model_store import ModelStore
from services.gc.collector import collect
from tests.fixtures.trainer_server import RunningTrainer, make_png, tiny_spec
from tests.unit.test_store_gc import fake_model
from tests.unit.test_trainer_job_runner import FakeTrain

TRAINING = trainer_pb2.TRAINING_JOB_STATE_TRAINING
CANCELLED = trainer_pb2.TRAINING_JOB_STATE_CANCELLED


@pytest.fixture
def trainer(start_trainer: Callable[..., RunningTrainer]) -> RunningTrainer:
    return start_trainer(train=FakeTrain())  # never opens its gate: a job trains until cancelled


@pytest.fixture
def client(trainer: RunningTrainer) -> Iterator[DreamBoothClient]:
    with DreamBoothClient(trainer=trainer.address, inference=None, timeout=60) as sdk:
        yield sdk


def run_cli(address: str, *argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = cli.main(["--trainer", address, *argv], stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def test_deletes_wait_for_running_jobs_and_a_collection_then_leaves_no_orphan(
    trainer: RunningTrainer, client: DreamBoothClient, model_store: ModelStore, tmp_path: Path
) -> None:
    store = model_store.store
    lora = fake_model(tmp_path, "lora", {"pytorch_lora_weights.safetensors": b"adapter"})
    model_store.import_folder(lora, "tiny-lora", kind="lora", base_model="tiny-sd")
    dataset = client.upload_images([make_png(0), make_png(1)])
    job = trainer.create(tiny_spec(dataset.name, num_workers=1))
    trainer.wait_for_state(job.name, TRAINING)

    # 1. What a running job uses cannot go.
    with pytest.raises(FailedPreconditionError, match=f"used by unfinished training jobs {job.name}"):
        client.delete_model("tiny-sd")
    with pytest.raises(FailedPreconditionError, match=f"used by unfinished training jobs {job.name}"):
        client.delete_dataset(dataset)
    code, out, err = run_cli(trainer.address, "datasets", "delete", dataset.name)
    assert (code, out) == (1, "") and err.startswith("error: FAILED_PRECONDITION: datasets/")
    with pytest.raises(InvalidArgumentError, match="name: must be datasets") as bad:
        client.delete_dataset("datasets/not-a-digest")
    assert bad.value.field == "name"

    # 2. Deleting the job cancels it first; its keys go with it.
    deleted = client.delete_training_job(job)
    assert deleted.state == CANCELLED
    with pytest.raises(NotFoundError):
        client.get_training_job(job)
    job_id = job.name.removeprefix("trainingJobs/")
    assert not list(store.list(f"jobs/{job_id}/"))

    # 3. Now the dataset and the models can go; a base goes after the LoRA models built on it.
    assert client.delete_dataset(dataset).name == dataset.name
    with pytest.raises(FailedPreconditionError, match="is the base of LoRA models models/tiny-lora"):
        client.delete_model("tiny-sd")
    code, out, err = run_cli(trainer.address, "models", "delete", "tiny-lora")
    assert (code, out, err) == (0, "deleted models/tiny-lora\n", "")
    assert client.delete_model("models/tiny-sd").name == "models/tiny-sd"
    with pytest.raises(NotFoundError):
        client.delete_model("tiny-sd")

    # 4. A collection removes the blobs nothing names any more; then nothing is left but garbage-free.
    report = collect(store)
    assert {g.kind for g in report.garbage} == {"blob"}
    # Every model, dataset and job is gone; the usage ledger keeps the deleted job's training.
    assert [info.key for info in store.list()] == [f"usage/deleted-jobs/{job_id}.json"]
    assert collect(store).garbage == ()


def test_the_dataset_of_a_running_jobs_additional_concept_cannot_go(
    trainer: RunningTrainer, client: DreamBoothClient
) -> None:
    dog, cat = client.upload_images([make_png(0)]), client.upload_images([make_png(5)])
    concept = trainer_pb2.TrainingConcept(
        dataset=cat.name, instance_prompt="a photo of zwx cat", identifier_token="zwx"
    )
    job = trainer.create(tiny_spec(dog.name, num_workers=1, additional_concepts=[concept]))
    trainer.wait_for_state(job.name, TRAINING)
    with pytest.raises(FailedPreconditionError, match=f"used by unfinished training jobs {job.name}"):
        client.delete_dataset(cat)
    client.cancel_training_job(job)
    trainer.wait_for_state(job.name, CANCELLED)
    assert client.delete_dataset(cat).name == cat.name
