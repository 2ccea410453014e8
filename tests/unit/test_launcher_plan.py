"""`up`'s plan: addresses and environments of the three services, and what it refuses."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from services import cli
from services.inference.settings import InferenceSettings
from services.launcher import up
from services.launcher.plan import (
    DEFAULT_PORTS,
    SERVICES,
    Layout,
    PlanError,
    ServicePlan,
    plan_services,
)
from services.priorgen.settings import PriorGenSettings

BASE_ENV = {"PATH": "/usr/bin", "DREAMBOOTH_TRAINER_LOG_LEVEL": "DEBUG"}


def ports(*numbers: int):
    it = iter(numbers)
    return lambda: next(it)


def test_defaults(tmp_path: Path) -> None:
    layout = Layout.under(tmp_path / "data")
    plan = plan_services(layout, "tiny-sd", BASE_ENV)
    assert plan.notes == []
    assert [s.address for s in plan.services.values()] == [
        "127.0.0.1:50052",
        "127.0.0.1:50051",
        "127.0.0.1:50053",
    ]
    for name, service in plan.services.items():
        env = service.env
        assert env[f"DREAMBOOTH_{name.upper()}_PORT"] == str(DEFAULT_PORTS[name])
        assert env["DREAMBOOTH_STORE_DIR"] == str(tmp_path / "data" / "store")
        assert env["DREAMBOOTH_CACHE_DIR"] == str(tmp_path / "data" / "cache" / name)
        assert env["RAY_USAGE_STATS_ENABLED"] == "0" and env["GLOO_SOCKET_IFNAME"] == "lo"
        assert env["PATH"] == "/usr/bin" and env["DREAMBOOTH_TRAINER_LOG_LEVEL"] == "DEBUG"
    trainer, inference = plan.services["trainer"].env, plan.services["inference"].env
    assert trainer["DREAMBOOTH_TRAINER_PRIORGEN_ADDRESS"] == "127.0.0.1:50052"
    assert trainer["HOME"] == str(tmp_path / "data" / "ray-home")
    assert "HOME" not in plan.services["priorgen"].env
    assert inference["DREAMBOOTH_INFERENCE_DEFAULT_MODEL"] == "tiny-sd"


def test_ports_from_the_environment_and_zero_picks_a_free_one(tmp_path: Path) -> None:
    env = {**BASE_ENV, "DREAMBOOTH_TRAINER_PORT": "6001", "DREAMBOOTH_PRIORGEN_PORT": "0"}
    env["DREAMBOOTH_INFERENCE_PORT"] = "0"
    plan = plan_services(Layout.under(tmp_path), "m", env, pick_port=ports(7002, 7003))
    assert {n: s.port for n, s in plan.services.items()} == {
        "priorgen": 7002,
        "trainer": 6001,
        "inference": 7003,
    }
    assert plan.services["trainer"].env["DREAMBOOTH_TRAINER_PRIORGEN_ADDRESS"] == "127.0.0.1:7002"
    assert plan.services["inference"].env["DREAMBOOTH_INFERENCE_PORT"] == "7003"


def test_offline_switches_are_defaults_and_remote_settings_are_dropped(tmp_path: Path) -> None:
    env = {
        **BASE_ENV,
        "RAY_USAGE_STATS_ENABLED": "1",  # an explicit choice wins
        "DREAMBOOTH_S3_ENDPOINT": "minio:9000",
        "RAY_ADDRESS": "ray://cluster:10001",
        "DREAMBOOTH_STORE_DIR": "/elsewhere",
    }
    plan = plan_services(Layout.under(tmp_path), "m", env)
    for service in plan.services.values():
        assert service.env["RAY_USAGE_STATS_ENABLED"] == "1"
        assert "DREAMBOOTH_S3_ENDPOINT" not in service.env and "RAY_ADDRESS" not in service.env
        assert service.env["DREAMBOOTH_STORE_DIR"] == str(tmp_path / "store")
    assert len(plan.notes) == 3
    assert any(n.startswith("DREAMBOOTH_S3_ENDPOINT is ignored") for n in plan.notes)
    assert any("DREAMBOOTH_STORE_DIR is ignored" in n and "--data-dir" in n for n in plan.notes)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"DREAMBOOTH_INFERENCE_PORT": "http"}, "DREAMBOOTH_INFERENCE_PORT: expected a port number"),
        ({"DREAMBOOTH_TRAINER_PORT": "70000"}, "is not a port number"),
        ({"DREAMBOOTH_TRAINER_PORT": "50052"}, "priorgen and trainer are both set to port 50052"),
        ({"DREAMBOOTH_PRIORGEN_TLS_CERT_FILE": "/c.pem"}, "up serves plaintext"),
    ],
)
def test_refused_settings(tmp_path: Path, env: dict[str, str], message: str) -> None:
    with pytest.raises(PlanError, match=message):
        plan_services(Layout.under(tmp_path), "m", {**BASE_ENV, **env})


@pytest.mark.parametrize(
    ("host", "address"),
    [("127.0.0.1", "127.0.0.1:1"), ("0.0.0.0", "127.0.0.1:1"), ("::", "[::1]:1"), ("::1", "[::1]:1")],
)
def test_dial_address_of_a_bind_host(host: str, address: str) -> None:
    assert ServicePlan("trainer", host, 1, {}).address == address


def test_layout_prepare_writes_a_local_ray_bootstrap(tmp_path: Path) -> None:
    layout = Layout.under(tmp_path / "d")
    layout.prepare()
    layout.prepare()  # idempotent
    assert layout.store_dir.is_dir() and layout.cache_root.is_dir()
    assert "type: local" in (layout.ray_home / "ray_bootstrap_config.yaml").read_text()


def test_default_ports_are_the_services_own_defaults(monkeypatch) -> None:
    assert DEFAULT_PORTS["inference"] == InferenceSettings().server.port
    assert DEFAULT_PORTS["priorgen"] == PriorGenSettings().server.port
    # Reach the trainer's settings through its entry point (its modules may move around).
    monkeypatch.delenv("DREAMBOOTH_TRAINER_PORT", raising=False)
    trainer_main = importlib.import_module(cli.COMMANDS["trainer"][0])
    assert DEFAULT_PORTS["trainer"] == trainer_main.load_settings().server.port
    assert set(DEFAULT_PORTS) == set(SERVICES)


def test_up_is_a_server_command() -> None:
    assert cli.COMMANDS["up"][0] == "services.launcher.up"
    assert "up" in cli.usage()


def test_up_exits_2_on_a_refused_setting(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("DREAMBOOTH_TRAINER_PORT", "nope")
    assert up.main(["--data-dir", str(tmp_path)]) == 2
    assert "[up]" in capsys.readouterr().out.splitlines()[0]
    assert not (tmp_path / "store").exists()  # nothing started, nothing written


def test_usage_lines_name_addresses_only_when_not_the_default(tmp_path: Path) -> None:
    default = plan_services(Layout.under(tmp_path), "tiny-sd", BASE_ENV)
    assert up.usage_lines(default, "tiny-sd")[0] == "try:  dreambooth models list"
    moved = plan_services(Layout.under(tmp_path), "tiny-sd", {**BASE_ENV, "DREAMBOOTH_TRAINER_PORT": "6001"})
    assert "dreambooth --trainer 127.0.0.1:6001 models list" in up.usage_lines(moved, "tiny-sd")[0]
