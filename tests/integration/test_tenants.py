"""Tenants over real servers on loopback: the three services with one keys file, the S3 store.

Two tenants, alpha and beta, each upload the same photos, train one job (alpha's with class
priors, which the trainer asks of priorgen as the internal tenant `svc`) and get one model. Then
every RPC of every service is tried across them. Training runs the real worker loop in this
process (tests.fixtures.tenants.InProcessTraining), so no Ray is started.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from dreambooth.v1 import (
    inference_pb2,
    inference_pb2_grpc,
    priorgen_pb2,
    priorgen_pb2_grpc,
    trainer_pb2,
    trainer_pb2_grpc,
)
from dreambooth_client import DreamBoothClient
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common import keys_cli
from services.common.model_store import ModelStore, blob_key
from services.common.namespaced_store import scoped_store
from services.common.s3_store import S3ObjectStore
from services.common.settings import AuthSettings, StoreSettings
from services.common.store_pins import Pin
from services.gc.collector import collect
from tests.fixtures.inference_server import RunningInference, inference_settings_for
from tests.fixtures.models import TINY_MODEL_ID
from tests.fixtures.priorgen_server import RunningPriorGen, priorgen_settings_for, priors_request
from tests.fixtures.s3 import S3Server
from tests.fixtures.tenants import InProcessTraining, bearer, rpc_error, write_keys_file
from tests.fixtures.trainer_server import (
    RunningTrainer,
    make_png,
    tiny_spec,
    trainer_settings_for,
    upload_requests,
)

S = trainer_pb2
FINAL = (S.TRAINING_JOB_STATE_SUCCEEDED, S.TRAINING_JOB_STATE_FAILED, S.TRAINING_JOB_STATE_CANCELLED)
DEADLINE_S = 120.0
SHARED_BASE = f"models/{TINY_MODEL_ID}"
QUOTAS = {"max_concurrent_jobs": 1, "max_generate_streams": 1, "max_stored_bytes": 1000}  # 64x64 PNGs: ~200 B


@dataclasses.dataclass
class Deployment:
    store: S3ObjectStore
    keys_file: Path
    keys: dict[str, str]
    trainer: RunningTrainer
    priorgen: RunningPriorGen
    inference: RunningInference
    channels: list[grpc.Channel] = dataclasses.field(default_factory=list)

    def channel(self, address: str) -> grpc.Channel:
        channel = grpc.insecure_channel(address)
        self.channels.append(channel)
        return channel

    def as_tenant(self, label: str | None) -> Client:
        return Client(self, bearer(self.keys[label]) if label else ())


@dataclasses.dataclass
class Client:
    """Stubs of the three services calling with one key (or none)."""

    deployment: Deployment
    metadata: tuple[tuple[str, str], ...]

    def __post_init__(self) -> None:
        d = self.deployment
        self.trainer = trainer_pb2_grpc.TrainerServiceStub(d.channel(d.trainer.address))
        self.inference = inference_pb2_grpc.InferenceServiceStub(d.channel(d.inference.address))
        self.priorgen = priorgen_pb2_grpc.PriorGenServiceStub(d.channel(d.priorgen.address))

    def call(self, method: Callable[..., Any], request: Any, timeout: float = DEADLINE_S) -> Any:
        return method(request, metadata=self.metadata, timeout=timeout)

    def stream(self, method: Callable[..., Any], request: Any, timeout: float = DEADLINE_S) -> list[Any]:
        return list(method(request, metadata=self.metadata, timeout=timeout))

    def upload(self, seeds: range) -> trainer_pb2.Dataset:
        requests = upload_requests([make_png(seed) for seed in seeds])
        return self.trainer.UploadImages(requests, metadata=self.metadata, timeout=DEADLINE_S).dataset

    def create(self, spec: trainer_pb2.TrainingJobSpec, request_id: str = "") -> trainer_pb2.TrainingJob:
        request = S.CreateTrainingJobRequest(spec=spec, request_id=request_id)
        return self.call(self.trainer.CreateTrainingJob, request).training_job

    def get(self, name: str) -> trainer_pb2.TrainingJob:
        return self.call(self.trainer.GetTrainingJob, S.GetTrainingJobRequest(name=name)).training_job

    def wait(self, name: str, *states: int, timeout: float = 240.0) -> trainer_pb2.TrainingJob:
        deadline = time.monotonic() + timeout
        while (job := self.get(name)).state not in states:
            assert time.monotonic() < deadline, f"{name} is still {job.state}"
            time.sleep(0.1)
        return job

    def usage(self) -> trainer_pb2.GetUsageResponse:
        return self.call(self.trainer.GetUsage, S.GetUsageRequest())

    def generate(self, model: str, **fields: Any) -> list[inference_pb2.GenerateResponse]:
        request = inference_pb2.GenerateRequest(
            model=model, prompt="a photo of sks dog", steps=2, seed=1, **fields
        )
        return self.stream(self.inference.Generate, request)


@pytest.fixture(scope="module")
def deployment(
    s3_server: S3Server, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployment]:
    tmp = tmp_path_factory.mktemp("tenants")
    bucket = f"test-tenants-{uuid.uuid4().hex[:12]}"
    store = S3ObjectStore(s3_server.endpoint, s3_server.access_key, s3_server.secret_key, bucket)
    store.ensure_bucket()
    ModelStore(store, tmp / "import-cache").import_folder(tiny_model_dir, TINY_MODEL_ID)  # the shared base
    keys_file = tmp / "keys.toml"
    keys = write_keys_file(
        keys_file,
        {"alpha": "alpha", "beta": "beta", "gamma": "gamma", "svc": "svc"},
        tables={"gamma": QUOTAS, "svc": {"internal": True}},
    )
    store_settings = StoreSettings(
        s3_endpoint=s3_server.endpoint,
        s3_access_key=s3_server.access_key,
        s3_secret_key=s3_server.secret_key,
        s3_bucket=bucket,
        cache_dir=str(tmp / "cache"),
    )
    auth = AuthSettings(api_keys_file=str(keys_file))
    started: list[Any] = []
    try:
        priorgen = RunningPriorGen(priorgen_settings_for(store_settings, tmp, auth=auth))
        started.append(priorgen)
        trainer_settings = trainer_settings_for(
            store_settings, tmp, auth=auth, priorgen_address=priorgen.address, priorgen_api_key=keys["svc"]
        )
        trainer = RunningTrainer(trainer_settings, train=InProcessTraining())
        started.append(trainer)
        inference = RunningInference(
            inference_settings_for(store_settings, tmp, auth=auth, usage_flush_seconds=0.2)
        )
        started.append(inference)
        inference.wait_ready()
        deployment = Deployment(store, keys_file, keys, trainer, priorgen, inference)
        yield deployment
        for channel in deployment.channels:
            channel.close()
    finally:
        for server in reversed(started):
            server.stop()


@dataclasses.dataclass(frozen=True)
class World:
    """Two tenants with one dataset, one finished job and one model each."""

    datasets: dict[str, str]
    jobs: dict[str, trainer_pb2.TrainingJob]


@pytest.fixture(scope="module")
def world(deployment: Deployment) -> World:
    alpha, beta = deployment.as_tenant("alpha"), deployment.as_tenant("beta")
    datasets = {"alpha": alpha.upload(range(2)).name, "beta": beta.upload(range(2)).name}
    common = {"max_train_steps": 2, "num_workers": 1, "checkpointing_steps": 0}
    alpha_spec = tiny_spec(
        datasets["alpha"],
        with_prior_preservation=True,
        class_prompt="a photo of dog",
        num_class_images=2,
        prior_steps=2,
        **common,
    )
    created = {
        "alpha": alpha.create(alpha_spec, request_id="same-request"),
        "beta": beta.create(tiny_spec(datasets["beta"], **common), request_id="same-request"),
    }
    jobs = {}
    for label, client in (("alpha", alpha), ("beta", beta)):
        jobs[label] = client.wait(created[label].name, *FINAL)
        assert jobs[label].state == S.TRAINING_JOB_STATE_SUCCEEDED, jobs[label].error_message
    return World(datasets, jobs)


def same_message_as_missing(
    error: grpc.RpcError, present: str, missing_error: grpc.RpcError, missing: str
) -> None:
    """NOT_FOUND, and word for word what a resource that does not exist gets."""
    assert error.code() == grpc.StatusCode.NOT_FOUND, error.details()
    assert missing_error.code() == grpc.StatusCode.NOT_FOUND, missing_error.details()
    assert error.details() == missing_error.details().replace(missing, present)


def test_tenants_never_reach_each_others_resources(deployment: Deployment, world: World) -> None:
    alpha, beta = deployment.as_tenant("alpha"), deployment.as_tenant("beta")
    theirs = world.jobs["beta"]
    missing_job = "trainingJobs/0123456789ab"
    their_model, missing_model = theirs.model, "models/no-such-model"
    assert theirs.model and world.jobs["alpha"].model and theirs.model != world.jobs["alpha"].model

    # The same photos are a different dataset for each, and the same request id two jobs.
    assert world.datasets["alpha"] != world.datasets["beta"]
    assert world.jobs["alpha"].request_id == theirs.request_id == "same-request"
    assert world.jobs["alpha"].name != theirs.name

    # Trainer: get, watch, cancel, list, train from their dataset or model.
    for rpc, request in (
        (alpha.trainer.GetTrainingJob, S.GetTrainingJobRequest),
        (alpha.trainer.CancelTrainingJob, S.CancelTrainingJobRequest),
    ):
        same_message_as_missing(
            rpc_error(lambda rpc=rpc, request=request: alpha.call(rpc, request(name=theirs.name))),
            theirs.name,
            rpc_error(lambda rpc=rpc, request=request: alpha.call(rpc, request(name=missing_job))),
            missing_job,
        )
    same_message_as_missing(
        rpc_error(
            lambda: alpha.stream(alpha.trainer.WatchTrainingJob, S.WatchTrainingJobRequest(name=theirs.name))
        ),
        theirs.name,
        rpc_error(
            lambda: alpha.stream(alpha.trainer.WatchTrainingJob, S.WatchTrainingJobRequest(name=missing_job))
        ),
        missing_job,
    )
    logs = alpha.trainer.DownloadTrainingJobLogs
    same_message_as_missing(
        rpc_error(lambda: alpha.stream(logs, S.DownloadTrainingJobLogsRequest(name=theirs.name))),
        theirs.name,
        rpc_error(lambda: alpha.stream(logs, S.DownloadTrainingJobLogsRequest(name=missing_job))),
        missing_job,
    )
    their_logs = beta.stream(
        beta.trainer.DownloadTrainingJobLogs, S.DownloadTrainingJobLogsRequest(name=theirs.name)
    )
    assert their_logs[0].manifest.name == theirs.name and their_logs[0].manifest.files
    assert beta.get(theirs.name).state == S.TRAINING_JOB_STATE_SUCCEEDED
    listed = alpha.call(alpha.trainer.ListTrainingJobs, S.ListTrainingJobsRequest())
    assert [job.name for job in listed.training_jobs] == [world.jobs["alpha"].name]
    missing_dataset = "datasets/" + "0" * 64
    same_message_as_missing(
        rpc_error(lambda: alpha.create(tiny_spec(world.datasets["beta"]))),
        world.datasets["beta"],
        rpc_error(lambda: alpha.create(tiny_spec(missing_dataset))),
        missing_dataset,
    )
    same_message_as_missing(
        rpc_error(lambda: alpha.create(tiny_spec(world.datasets["alpha"], base_model=their_model))),
        their_model,
        rpc_error(lambda: alpha.create(tiny_spec(world.datasets["alpha"], base_model=missing_model))),
        missing_model,
    )

    # Inference: get, list, generate.
    same_message_as_missing(
        rpc_error(
            lambda: alpha.call(alpha.inference.GetModel, inference_pb2.GetModelRequest(name=their_model))
        ),
        their_model.removeprefix("models/"),
        rpc_error(
            lambda: alpha.call(alpha.inference.GetModel, inference_pb2.GetModelRequest(name=missing_model))
        ),
        missing_model.removeprefix("models/"),
    )
    same_message_as_missing(
        rpc_error(lambda: alpha.generate(their_model)),
        their_model.removeprefix("models/"),
        rpc_error(lambda: alpha.generate(missing_model)),
        missing_model.removeprefix("models/"),
    )
    for label, client in (("alpha", alpha), ("beta", beta)):
        models = client.call(client.inference.ListModels, inference_pb2.ListModelsRequest()).models
        assert sorted(m.name for m in models) == sorted([SHARED_BASE, world.jobs[label].model])
        own = client.generate(world.jobs[label].model)
        shared = client.generate(SHARED_BASE)
        assert (
            [r.WhichOneof("event") for r in own][-1] == "image" == [r.WhichOneof("event") for r in shared][-1]
        )

    # Priorgen: their model as a base, or generating for them.
    same_message_as_missing(
        rpc_error(
            lambda: alpha.stream(alpha.priorgen.GeneratePriors, priors_request(base_model=their_model))
        ),
        their_model.removeprefix("models/"),
        rpc_error(
            lambda: alpha.stream(alpha.priorgen.GeneratePriors, priors_request(base_model=missing_model))
        ),
        missing_model.removeprefix("models/"),
    )
    refused = rpc_error(lambda: alpha.stream(alpha.priorgen.GeneratePriors, priors_request(tenant="beta")))
    assert refused.code() == grpc.StatusCode.PERMISSION_DENIED and refused.details().startswith("tenant:")


def test_the_store_keeps_each_tenant_under_its_own_prefix(deployment: Deployment, world: World) -> None:
    keys = [info.key for info in deployment.store.list("")]
    outside = [
        k for k in keys if not k.startswith(("tenants/alpha/", "tenants/beta/", "tenants/gamma/", "blobs/"))
    ]
    assert outside and all(k.startswith(f"models/{TINY_MODEL_ID}/") for k in outside), outside
    alpha_job = world.jobs["alpha"].name.removeprefix("trainingJobs/")
    alpha_model = world.jobs["alpha"].model.removeprefix("models/")
    for expected in (
        f"tenants/alpha/{world.datasets['alpha']}/manifest.json",
        f"tenants/alpha/jobs/{alpha_job}/job.json",
        f"tenants/alpha/models/{alpha_model}/manifest.json",
    ):
        assert expected in keys, expected
    assert any(k.startswith("tenants/alpha/priors/") for k in keys)
    assert any(
        k.startswith(f"tenants/alpha/jobs/{alpha_job}/tensorboard/events.out.tfevents.") for k in keys
    )  # made for alpha by the trainer's key
    assert not any(k.startswith("tenants/svc/") for k in keys)


def test_priors_are_made_per_tenant_never_a_cache_hit_across(deployment: Deployment) -> None:
    request = priors_request(num_images=1, seed=99)
    first = deployment.as_tenant("alpha").stream(
        deployment.as_tenant("alpha").priorgen.GeneratePriors, request
    )
    beta = deployment.as_tenant("beta")
    second = beta.stream(beta.priorgen.GeneratePriors, request)
    again = beta.stream(beta.priorgen.GeneratePriors, request)
    assert (
        not first[-1].prior_set.cached and not second[-1].prior_set.cached
    )  # beta cannot tell alpha made it
    assert again[-1].prior_set.cached and second[-1].prior_set.key == first[-1].prior_set.key


def every_method() -> list[tuple[str, str, Any]]:
    """(service, full method, descriptor) for every RPC of the three services."""
    methods = []
    for module, service in (
        (trainer_pb2, "TrainerService"),
        (priorgen_pb2, "PriorGenService"),
        (inference_pb2, "InferenceService"),
    ):
        descriptor = module.DESCRIPTOR.services_by_name[service]
        for method in descriptor.methods:
            methods.append((service, f"/{descriptor.full_name}/{method.name}", method))
    return methods


def call_raw(channel: grpc.Channel, full_method: str, method: Any, metadata: Any) -> None:
    """Call any RPC with an empty request (the auth interceptor answers before the servicer)."""
    empty = b""
    identity = {"request_serializer": lambda raw: raw, "response_deserializer": lambda raw: raw}
    streams = (method.client_streaming, method.server_streaming)
    if streams == (False, False):
        channel.unary_unary(full_method, **identity)(empty, metadata=metadata, timeout=30)
    elif streams == (False, True):
        list(channel.unary_stream(full_method, **identity)(empty, metadata=metadata, timeout=30))
    elif streams == (True, False):
        channel.stream_unary(full_method, **identity)(iter([empty]), metadata=metadata, timeout=30)
    else:
        list(channel.stream_stream(full_method, **identity)(iter([empty]), metadata=metadata, timeout=30))


def test_no_key_is_unauthenticated_on_every_rpc_of_every_service(deployment: Deployment) -> None:
    addresses = {
        "TrainerService": deployment.trainer.address,
        "PriorGenService": deployment.priorgen.address,
        "InferenceService": deployment.inference.address,
    }
    methods = every_method()
    assert len(methods) == 16  # a new RPC is tried here as soon as it is added
    for service, full_method, method in methods:
        channel = deployment.channel(addresses[service])
        for metadata, message in (((), "missing credentials"), (bearer("dbk_not_a_key"), "invalid API key")):
            error = rpc_error(functools.partial(call_raw, channel, full_method, method, metadata))
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED, (full_method, error.details())
            assert error.details().startswith(message), (full_method, error.details())
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING  # probes need no key


def test_a_revoked_key_stops_working_without_restart(
    deployment: Deployment, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    keys_cli.main(["add", "--tenant", "alpha", "--file", str(deployment.keys_file)])
    key = capsys.readouterr().out.strip()
    client = Client(deployment, bearer(key))
    calls = {
        "trainer": lambda: client.call(
            client.trainer.ListTrainingJobs, S.ListTrainingJobsRequest(), timeout=10
        ),
        "inference": lambda: client.call(
            client.inference.ListModels, inference_pb2.ListModelsRequest(), timeout=10
        ),
        "priorgen": lambda: client.stream(
            client.priorgen.GeneratePriors, priors_request(base_model="models/x", num_images=0), timeout=10
        ),
    }
    deadline = time.monotonic() + 5  # the new key is picked up too
    while True:
        codes = {name: _code(call) for name, call in calls.items()}
        if (
            set(codes.values()) == {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT}
            or time.monotonic() > deadline
        ):
            break
        time.sleep(0.05)
    assert codes == {
        "trainer": grpc.StatusCode.OK,
        "inference": grpc.StatusCode.OK,
        "priorgen": grpc.StatusCode.INVALID_ARGUMENT,
    }

    caplog.set_level(logging.ERROR)
    good = deployment.keys_file.read_text()
    deployment.keys_file.write_text(good + "\n[[keys]]\nthis is not toml\n")  # a broken edit: ignored
    time.sleep(0.8)
    assert _code(calls["trainer"]) == grpc.StatusCode.OK
    assert any("last good keys" in r.getMessage() for r in caplog.records)
    deployment.keys_file.write_text(good)

    keys_cli.main(["revoke", key.split("_")[1], "--file", str(deployment.keys_file)])
    revoked_at = time.monotonic()
    pending = set(calls)
    while pending and time.monotonic() - revoked_at < 2.0:
        pending = {name for name in pending if _code(calls[name]) != grpc.StatusCode.UNAUTHENTICATED}
        time.sleep(0.05)
    assert not pending, f"still accepted {time.monotonic() - revoked_at:.2f} s after revoking: {pending}"


def _retry_busy(call: Callable[[], Any], timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return call()
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _code(call: Callable[[], object]) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK


def test_quotas_are_enforced_and_usage_counts_move(deployment: Deployment, world: World) -> None:
    gamma, alpha = deployment.as_tenant("gamma"), deployment.as_tenant("alpha")
    before = gamma.usage()
    assert before.tenant == "gamma" and before.quotas.max_generate_streams == 1
    assert (before.images_generated, before.stored_bytes, before.active_training_jobs) == (0, 0, 0)
    trained = alpha.usage()
    assert trained.tenant == "alpha" and trained.training_step_seconds > 0 and trained.stored_bytes > 0

    # Stored bytes: one small dataset fits, the next does not.
    dataset = gamma.upload(range(1)).name
    error = rpc_error(lambda: gamma.upload(range(10, 16)))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "quota max_stored_bytes" in error.details()

    # Concurrent training jobs: one runs (long), the second is refused; alpha cannot cancel it.
    running = gamma.create(tiny_spec(dataset, max_train_steps=5000, num_workers=1, checkpointing_steps=0))
    error = rpc_error(lambda: gamma.create(tiny_spec(dataset, num_workers=1)))
    assert (
        error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        and "quota max_concurrent_jobs (1)" in error.details()
    )
    assert (
        rpc_error(
            lambda: alpha.call(alpha.trainer.CancelTrainingJob, S.CancelTrainingJobRequest(name=running.name))
        ).code()
        == grpc.StatusCode.NOT_FOUND
    )
    gamma.call(gamma.trainer.CancelTrainingJob, S.CancelTrainingJobRequest(name=running.name))
    assert gamma.wait(running.name, *FINAL).state == S.TRAINING_JOB_STATE_CANCELLED

    # Concurrent Generate streams: a second while the first samples is refused, naming the quota.
    long_request = inference_pb2.GenerateRequest(model=SHARED_BASE, prompt="a photo", steps=150, num_images=8)
    first = gamma.inference.Generate(long_request, metadata=gamma.metadata, timeout=DEADLINE_S)
    assert next(first).WhichOneof("event") == "progress"  # it is running
    second = rpc_error(lambda: gamma.generate(SHARED_BASE))
    first.cancel()
    assert (
        second.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        and "quota max_generate_streams (1)" in second.details()
    )

    # Usage moves: images (each replica's ledger reaches the store every 0.2 s), bytes stored.
    images = _retry_busy(lambda: gamma.generate(SHARED_BASE, num_images=2))  # once the first stream ended
    assert [r.WhichOneof("event") for r in images].count("image") == 2
    deadline = time.monotonic() + 10
    while (after := gamma.usage()).images_generated < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert after.images_generated == 2 and after.stored_bytes > before.stored_bytes
    scrape = urllib.request.urlopen(
        f"http://127.0.0.1:{deployment.inference.metrics_port}/metrics", timeout=10
    )
    assert 'dreambooth_inference_tenant_images_generated_total{tenant="gamma"}' in scrape.read().decode()
    assert deployment.trainer.server.app.registry.get_sample_value(
        "dreambooth_trainer_tenant_training_step_seconds_total", {"tenant": "alpha"}
    )


def model_blobs(store: S3ObjectStore, tenant: str, model: str) -> set[str]:
    manifest = ModelStore(scoped_store(store, tenant), Path("unused")).get(model.removeprefix("models/"))
    return {entry.sha256 for entry in manifest.files.values()}


def test_deletes_and_exports_reach_only_the_callers_own_and_a_collection_covers_every_tenant(
    deployment: Deployment, world: World, tmp_path: Path
) -> None:
    """Runs last: beta deletes what it has. Alpha's model keeps every blob, beta's own go."""
    alpha, beta = deployment.as_tenant("alpha"), deployment.as_tenant("beta")
    store = deployment.store
    theirs, mine = world.jobs["beta"], world.jobs["alpha"]
    missing_job, missing_dataset = "trainingJobs/0123456789ab", "datasets/" + "0" * 64

    # 1. Alpha cannot delete or export beta's job, dataset or model: as if they did not exist.
    for rpc, request, present, missing in (
        (alpha.trainer.DeleteTrainingJob, S.DeleteTrainingJobRequest, theirs.name, missing_job),
        (alpha.trainer.DeleteDataset, S.DeleteDatasetRequest, world.datasets["beta"], missing_dataset),
        (alpha.trainer.DeleteModel, S.DeleteModelRequest, theirs.model, "models/no-such-model"),
    ):
        same_message_as_missing(
            rpc_error(lambda rpc=rpc, request=request, name=present: alpha.call(rpc, request(name=name))),
            present.removeprefix("models/"),
            rpc_error(lambda rpc=rpc, request=request, name=missing: alpha.call(rpc, request(name=name))),
            missing.removeprefix("models/"),
        )
    export = alpha.inference.ExportModel
    same_message_as_missing(
        rpc_error(lambda: alpha.stream(export, inference_pb2.ExportModelRequest(name=theirs.model))),
        theirs.model.removeprefix("models/"),
        rpc_error(
            lambda: alpha.stream(export, inference_pb2.ExportModelRequest(name="models/no-such-model"))
        ),
        "no-such-model",
    )
    assert beta.get(theirs.name).state == S.TRAINING_JOB_STATE_SUCCEEDED  # all still there
    assert beta.call(beta.inference.GetModel, inference_pb2.GetModelRequest(name=theirs.model)).model.name

    # 2. The shared base is anyone's to use and export, no tenant's to delete.
    refused = rpc_error(lambda: alpha.call(alpha.trainer.DeleteModel, S.DeleteModelRequest(name=SHARED_BASE)))
    assert refused.code() == grpc.StatusCode.PERMISSION_DENIED and "shared base" in refused.details()

    # 3. Alpha exports its own model, every file checked against its digest by the SDK.
    with DreamBoothClient(
        trainer=None, inference=deployment.inference.address, api_key=deployment.keys["alpha"], timeout=60
    ) as sdk:
        exported = sdk.export_model(mine.model, tmp_path / "alpha-model")
    assert exported.name == mine.model and (tmp_path / "alpha-model" / "model_index.json").is_file()

    # 4. Beta deletes its own job, dataset and model; its usage keeps the training it paid for.
    before = beta.usage()
    their_blobs = model_blobs(store, "beta", theirs.model)
    assert beta.call(
        beta.trainer.DeleteTrainingJob, S.DeleteTrainingJobRequest(name=theirs.name)
    ).training_job
    beta.call(beta.trainer.DeleteDataset, S.DeleteDatasetRequest(name=world.datasets["beta"]))
    beta.call(beta.trainer.DeleteModel, S.DeleteModelRequest(name=theirs.model))
    after = beta.usage()
    assert after.training_step_seconds == pytest.approx(before.training_step_seconds)
    assert after.training_step_seconds > 0 and after.stored_bytes < before.stored_bytes
    assert rpc_error(lambda: beta.get(theirs.name)).code() == grpc.StatusCode.NOT_FOUND
    assert alpha.get(mine.name).state == S.TRAINING_JOB_STATE_SUCCEEDED  # alpha's untouched

    # 5. A collection while alpha has a publish in flight (its pin in alpha's prefix, blob uploaded,
    # no manifest yet): alpha's models and in-flight blob stay, beta's own blobs go.
    in_flight = b"alpha's publish in flight"
    in_flight_digest = hashlib.sha256(in_flight).hexdigest()
    alpha_blobs = model_blobs(store, "alpha", mine.model)
    base_blobs = model_blobs(store, "", SHARED_BASE)
    beta_only = their_blobs - alpha_blobs - base_blobs
    assert beta_only  # its fine-tuned weights
    with Pin(scoped_store(store, "alpha"), blobs=[in_flight_digest], owner="test publish"):
        store.put_bytes(blob_key(in_flight_digest), in_flight)
        report = collect(store)
    swept = {g.key for g in report.garbage}
    assert {blob_key(digest) for digest in beta_only} <= swept
    kept = {blob_key(digest) for digest in alpha_blobs | base_blobs | {in_flight_digest}}
    assert not kept & swept and kept <= {info.key for info in store.list("blobs/")}
    # Of alpha's own keys only the prior set no job names goes (test_priors_are_made_per_tenant's).
    assert {g.kind for g in report.garbage if g.key.startswith("tenants/alpha/")} <= {"prior set"}
    alpha_job = store.get_json(f"tenants/alpha/jobs/{mine.name.removeprefix('trainingJobs/')}/job.json")
    assert alpha_job["prior_prefix"] and not [k for k in swept if alpha_job["prior_prefix"] in k]
    images = alpha.generate(mine.model)  # alpha's model still loads, every blob verified
    assert [r.WhichOneof("event") for r in images][-1] == "image"
    # The publish died without its manifest: its pin gone, the next collection takes the blob.
    assert blob_key(in_flight_digest) in {g.key for g in collect(store).garbage}
