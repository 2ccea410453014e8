"""The demo's pieces that need no servers: its subject photos and the services' environment."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image

from demo import journey, services, subject
from services.launcher.plan import SERVICES


def test_subject_photos_are_the_held_out_subjects_photos(tmp_path: Path) -> None:
    paths = subject.write_subject_photos(tmp_path / "subject", 10)
    assert len(paths) == subject.SUBJECT.photo_count  # never more than the subject has
    for path, photo in zip(paths, subject.SUBJECT.photos(), strict=True):
        assert path.read_bytes() == _png(photo)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_write_subject_photos(tmp_path: Path) -> None:
    paths = subject.write_subject_photos(tmp_path / "subject", 3)
    assert [p.name for p in paths] == ["ball-0.png", "ball-1.png", "ball-2.png"]
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in paths)


def test_service_environment(tmp_path: Path) -> None:
    """`up`'s plan on free ports, the demo's store, caches and Ray's HOME in its work folder."""
    environ = {
        "DREAMBOOTH_S3_ENDPOINT": "somewhere:9000",
        "RAY_ADDRESS": "ray://cluster:10001",
        "DREAMBOOTH_TRAINER_PORT": "50051",
    }
    plan = services.demo_plan(journey.BASE_MODEL, tmp_path / "store", tmp_path / "work", environ)
    assert len({service.port for service in plan.services.values()}) == 3
    for name, service in plan.services.items():
        env = service.env
        prefix = f"DREAMBOOTH_{name.upper()}_"
        assert service.port not in (50051, 50052, 50053)  # free ports, whatever the environment says
        assert env[f"{prefix}PORT"] == str(service.port)
        assert env[f"{prefix}METRICS_PORT"] == "0"
        assert env["DREAMBOOTH_STORE_DIR"] == str(tmp_path / "store")
        assert env["DREAMBOOTH_CACHE_DIR"] == str(tmp_path / "work" / "cache" / name)
        assert "DREAMBOOTH_S3_ENDPOINT" not in env and "RAY_ADDRESS" not in env
        assert env["RAY_USAGE_STATS_ENABLED"] == "0" and env["GLOO_SOCKET_IFNAME"] == "lo"
    trainer = plan.services["trainer"].env
    assert trainer["DREAMBOOTH_TRAINER_PRIORGEN_ADDRESS"] == plan.services["priorgen"].address
    assert trainer["DREAMBOOTH_TRAINER_MAX_CONCURRENT_JOBS"] == "1"
    assert trainer["HOME"] == str(tmp_path / "work" / "ray-home")
    assert plan.services["inference"].env["DREAMBOOTH_INFERENCE_DEFAULT_MODEL"] == journey.BASE_MODEL
    assert list(plan.services) == list(SERVICES)


def test_log_files_one_per_process(tmp_path: Path) -> None:
    with services.LogFiles(tmp_path / "logs") as logs:
        logs.write("trainer", "one")
        logs.write("inference", "two")
        logs.write("trainer", "three")
    assert (tmp_path / "logs" / "trainer.log").read_text() == "one\nthree\n"
    assert (tmp_path / "logs" / "inference.log").read_text() == "two\n"
