"""from_env: types, bool parsing, clear errors on bad values, nested server/store prefixes."""

from __future__ import annotations

import dataclasses

import pytest

from services.common.settings import ServerSettings, StoreSettings, from_env


@dataclasses.dataclass(frozen=True)
class ExampleSettings:
    server: ServerSettings = dataclasses.field(default_factory=ServerSettings)
    store: StoreSettings = dataclasses.field(default_factory=StoreSettings)
    max_batch: int = 4
    warm: bool = False
    ratio: float = 0.5
    name: str = "example"
    models: tuple[str, ...] = ()


PREFIX = "DREAMBOOTH_EXAMPLE_"


def test_defaults_run_on_one_machine() -> None:
    settings = from_env(ExampleSettings, PREFIX, env={})
    assert settings == ExampleSettings()
    assert settings.server.host == "127.0.0.1"
    assert settings.server.metrics_host == "127.0.0.1"
    assert settings.store.s3_endpoint == ""  # embedded local store


def test_values_are_converted_to_field_types() -> None:
    env = {
        f"{PREFIX}MAX_BATCH": "16",
        f"{PREFIX}WARM": "true",
        f"{PREFIX}RATIO": "0.25",
        f"{PREFIX}NAME": "x",
        f"{PREFIX}MODELS": "tiny-sd, other ,,",
    }
    settings = from_env(ExampleSettings, PREFIX, env=env)
    assert settings.max_batch == 16
    assert settings.warm is True
    assert settings.ratio == 0.25
    assert settings.name == "x"
    assert settings.models == ("tiny-sd", "other")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("1", True),
        ("true", True),
        ("TRUE", True),
        (" yes ", True),
        ("on", True),
        ("0", False),
        ("false", False),
        ("No", False),
        ("off", False),
        ("", False),
    ],
)
def test_bool_parsing(raw: str, expected: bool) -> None:
    assert from_env(ExampleSettings, PREFIX, env={f"{PREFIX}WARM": raw}).warm is expected


@pytest.mark.parametrize(
    ("name", "raw", "expected_message"),
    [
        ("WARM", "maybe", "DREAMBOOTH_EXAMPLE_WARM: expected a boolean, got 'maybe'"),
        ("MAX_BATCH", "four", "DREAMBOOTH_EXAMPLE_MAX_BATCH: expected int, got 'four'"),
        ("MAX_BATCH", "1.5", "DREAMBOOTH_EXAMPLE_MAX_BATCH: expected int, got '1.5'"),
        ("RATIO", "half", "DREAMBOOTH_EXAMPLE_RATIO: expected float, got 'half'"),
        ("PORT", "http", "DREAMBOOTH_EXAMPLE_PORT: expected int, got 'http'"),
        ("GRACE_SECONDS", "soon", "DREAMBOOTH_EXAMPLE_GRACE_SECONDS: expected float, got 'soon'"),
    ],
)
def test_bad_values_name_the_variable(name: str, raw: str, expected_message: str) -> None:
    with pytest.raises(ValueError) as info:
        from_env(ExampleSettings, PREFIX, env={f"{PREFIX}{name}": raw})
    assert str(info.value) == expected_message


def test_server_settings_read_the_service_prefix() -> None:
    env = {
        f"{PREFIX}HOST": "0.0.0.0",
        f"{PREFIX}PORT": "50051",
        f"{PREFIX}METRICS_PORT": "9090",
        f"{PREFIX}GRACE_SECONDS": "2.5",
        f"{PREFIX}TLS_CERT_FILE": "/certs/tls.crt",
        f"{PREFIX}MAX_MESSAGE_BYTES": "1024",
        "DREAMBOOTH_OTHER_PORT": "1",  # another service's port is not ours
    }
    server = from_env(ExampleSettings, PREFIX, env=env).server
    assert server == ServerSettings(
        host="0.0.0.0",
        port=50051,
        metrics_port=9090,
        grace_seconds=2.5,
        tls_cert_file="/certs/tls.crt",
        max_message_bytes=1024,
    )


def test_store_settings_read_the_global_prefix() -> None:
    env = {
        "DREAMBOOTH_S3_ENDPOINT": "minio:9000",
        "DREAMBOOTH_S3_ACCESS_KEY": "ak",
        "DREAMBOOTH_S3_SECRET_KEY": "sk",
        "DREAMBOOTH_S3_BUCKET": "b",
        "DREAMBOOTH_S3_SECURE": "yes",
        "DREAMBOOTH_STORE_DIR": "/data/store",
        f"{PREFIX}S3_BUCKET": "ignored",  # the store is shared: service prefixes do not apply
    }
    store = from_env(ExampleSettings, PREFIX, env=env).store
    assert store == StoreSettings(
        s3_endpoint="minio:9000",
        s3_access_key="ak",
        s3_secret_key="sk",
        s3_bucket="b",
        s3_secure=True,
        store_dir="/data/store",
    )


def test_plain_dataclass_with_global_prefix() -> None:
    assert from_env(StoreSettings, env={"DREAMBOOTH_S3_REGION": "eu-west-1"}).s3_region == "eu-west-1"


def test_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(f"{PREFIX}MAX_BATCH", "7")
    assert from_env(ExampleSettings, PREFIX).max_batch == 7


def test_unsupported_field_type_is_a_clear_error() -> None:
    @dataclasses.dataclass(frozen=True)
    class Odd:
        mapping: dict[str, str] = dataclasses.field(default_factory=dict)

    with pytest.raises(TypeError, match="DREAMBOOTH_MAPPING: unsupported settings type"):
        from_env(Odd, env={"DREAMBOOTH_MAPPING": "a=b"})


def test_the_trainers_mlflow_settings_read_its_prefix_and_refuse_an_empty_experiment() -> None:
    from services.trainer.settings import ENV_PREFIX, TrainerSettings

    env = {f"{ENV_PREFIX}MLFLOW_TRACKING_URI": "http://mlflow:5000", f"{ENV_PREFIX}MLFLOW_EXPERIMENT": "dogs"}
    tracking = from_env(TrainerSettings, ENV_PREFIX, env=env).tracking
    assert (tracking.mlflow_tracking_uri, tracking.mlflow_experiment) == ("http://mlflow:5000", "dogs")
    assert from_env(TrainerSettings, ENV_PREFIX, env={}).tracking.mlflow_tracking_uri == ""
    with pytest.raises(ValueError, match="mlflow_experiment"):
        from_env(TrainerSettings, ENV_PREFIX, env={**env, f"{ENV_PREFIX}MLFLOW_EXPERIMENT": ""})
