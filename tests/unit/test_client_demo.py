"""The demo's pieces that need no servers: its subject photos and the services' environment."""

from __future__ import annotations

import socket
from pathlib import Path

from services import demo


def test_subject_photos_are_deterministic_and_vary() -> None:
    first = demo.subject_photo(0)
    assert first.size == (128, 128) and first.mode == "RGB"
    assert first.tobytes() == demo.subject_photo(0).tobytes()
    assert len({demo.subject_photo(i).tobytes() for i in range(6)}) == 6


def test_write_subject_photos(tmp_path: Path) -> None:
    paths = demo.write_subject_photos(tmp_path / "subject", 3)
    assert [p.name for p in paths] == ["ball-0.png", "ball-1.png", "ball-2.png"]
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in paths)


def test_service_environment(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("DREAMBOOTH_S3_ENDPOINT", "somewhere:9000")
    monkeypatch.setenv("RAY_ADDRESS", "ray://cluster:10001")
    services = {
        name: demo.Service(name, 1000 + i, tmp_path / f"{name}.log") for i, name in enumerate(demo.SERVICES)
    }
    envs = demo.service_env(services, tmp_path / "store", tmp_path / "cache", tmp_path / "ray-home")
    for name, env in envs.items():
        prefix = f"DREAMBOOTH_{name.upper()}_"
        assert env[f"{prefix}PORT"] == str(services[name].port)
        assert env[f"{prefix}METRICS_PORT"] == "0"
        assert env["DREAMBOOTH_STORE_DIR"] == str(tmp_path / "store")
        assert env["DREAMBOOTH_CACHE_DIR"] == str(tmp_path / "cache" / name)
        assert "DREAMBOOTH_S3_ENDPOINT" not in env and "RAY_ADDRESS" not in env
        assert env["RAY_USAGE_STATS_ENABLED"] == "0" and env["GLOO_SOCKET_IFNAME"] == "lo"
    assert envs["trainer"]["DREAMBOOTH_TRAINER_PRIORGEN_ADDRESS"] == services["priorgen"].address
    assert envs["trainer"]["HOME"] == str(tmp_path / "ray-home")
    assert envs["inference"]["DREAMBOOTH_INFERENCE_DEFAULT_MODEL"] == demo.BASE_MODEL


def test_free_port_can_be_bound() -> None:
    port = demo.free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
