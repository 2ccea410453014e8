"""A multi-subject job end to end: the CLI uploads two subjects' folders, the trainer validates
the concepts, asks the real prior-generation server for one class-prior set per distinct class
prompt, trains both subjects on local Ray (the S3 store, the tiny model) and publishes."""

from __future__ import annotations

import io
import json
from pathlib import Path

from dreambooth.v1 import trainer_pb2
from dreambooth_client import cli

from services.common.model_store import ModelStore
from services.common.object_store import ObjectStore
from services.trainer.jobs.records import Job, job_key
from tests.fixtures.trainer_server import RunningTrainer, make_png

SUCCEEDED = trainer_pb2.TRAINING_JOB_STATE_SUCCEEDED


def folder_of(tmp_path: Path, name: str, seeds: range) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    for seed in seeds:
        (folder / f"{name}-{seed}.png").write_bytes(make_png(seed))
    return folder


def test_a_two_subject_job_gets_a_prior_set_per_class_trains_and_publishes(
    trainer_server: RunningTrainer, s3_store: ObjectStore, model_store: ModelStore, tmp_path: Path
) -> None:
    dogs, cats = folder_of(tmp_path, "dog", range(3)), folder_of(tmp_path, "cat", range(10, 13))
    argv = ["--trainer", trainer_server.address, "--json", "train", "--base-model", "tiny-sd"]
    argv += [
        "--dataset",
        str(dogs),
        "--instance-prompt",
        "a photo of sks dog",
        "--class-prompt",
        "a photo of dog",
    ]
    argv += ["--concept", str(cats), "zwx", "a photo of zwx cat", "a photo of cat"]
    argv += ["--prior-preservation", "--num-class-images", "2", "--prior-steps", "2", "--steps", "4"]
    argv += ["--resolution", "64", "--lr", "1e-4", "--workers", "1"]
    out, err = io.StringIO(), io.StringIO()
    assert cli.main(argv, stdout=out, stderr=err) == 0, err.getvalue()
    name = json.loads(out.getvalue())["name"]

    done = trainer_server.wait_for_state(name, SUCCEEDED, trainer_pb2.TRAINING_JOB_STATE_FAILED)
    assert done.state == SUCCEEDED, done.error_message
    (cat,) = done.spec.additional_concepts
    assert cat.dataset.startswith("datasets/") and cat.dataset != done.spec.dataset  # uploaded
    assert (cat.identifier_token, cat.class_prompt) == ("zwx", "a photo of cat")

    record = Job.from_json(s3_store.get_json(job_key(name.split("/")[1])))
    sets = (record.prior_prefix, *record.additional_prior_prefixes)
    assert len(sets) == 2 and sets[0] != sets[1]  # one set per distinct class prompt
    for prefix in sets:
        assert len([info for info in s3_store.list(f"{prefix}images/")]) == 2
    manifest = model_store.get(done.spec.model_id)
    assert manifest.training_job in (name, name.split("/")[1]) and done.progress.step == 4
