"""A service that would be open to the network, or whose keys file is wrong, does not start.

The real `dreambooth-server trainer` process is run (it checks before connecting Ray, so it exits
in seconds); every service's server class is also built in this process with the same settings.
Nothing ever listens on 0.0.0.0: the refusal comes before any port is bound.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from services.common.settings import AuthSettings, ConfigError, ServerSettings, StoreSettings
from services.inference.settings import InferenceSettings
from services.priorgen.settings import PriorGenSettings
from services.trainer.settings import TrainerSettings

ROOT = Path(__file__).resolve().parents[2]
BAD_KEYS = """# a hand edit gone wrong
[tenants.acme]
max_concurrent_jobs = 2

[[keys]]
id = "0123456789ab"
tenant = "acme"
hash = "not-a-hash"
created = 2025-06-01T12:00:00Z
"""


def start_trainer_process(tmp_path: Path, **env: str) -> subprocess.Popen[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DREAMBOOTH_")}
    clean.update(
        PYTHONPATH=os.pathsep.join(
            [str(ROOT), str(ROOT / "clients/python/src"), clean.get("PYTHONPATH", "")]
        ),
        DREAMBOOTH_TRAINER_PORT="0",
        DREAMBOOTH_TRAINER_METRICS_PORT="0",
        DREAMBOOTH_STORE_DIR=str(tmp_path / "store"),
        RAY_ADDRESS="127.0.0.1:1",  # were it to get that far, it must not start a Ray of its own
        **env,
    )
    return subprocess.Popen(
        [sys.executable, "-m", "services.cli", "trainer"],
        env=clean,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture(scope="module")
def refused_starts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[int, str]]:
    """Both refused starts at once (each process takes seconds to import): (exit code, stderr)."""
    tmp = tmp_path_factory.mktemp("refuse")
    (tmp / "keys.toml").write_text(BAD_KEYS)
    processes = {
        "public": start_trainer_process(tmp, DREAMBOOTH_TRAINER_HOST="0.0.0.0"),
        "bad keys": start_trainer_process(tmp, DREAMBOOTH_API_KEYS_FILE=str(tmp / "keys.toml")),
    }
    results = {}
    for name, process in processes.items():
        try:
            _, err = process.communicate(timeout=120)
        finally:
            if process.poll() is None:
                process.kill()
        results[name] = (process.returncode, err)
    return results


def test_a_public_bind_without_keys_exits_with_one_clear_line(
    refused_starts: dict[str, tuple[int, str]],
) -> None:
    code, err = refused_starts["public"]
    assert code == 2
    assert err.count("\n") == 1, err
    assert err.startswith("dreambooth-server trainer: refusing to serve 0.0.0.0 without authentication")
    assert "DREAMBOOTH_API_KEYS_FILE" in err and "DREAMBOOTH_ALLOW_UNAUTHENTICATED=true" in err


def test_a_malformed_keys_file_stops_the_start_naming_line_and_field(
    refused_starts: dict[str, tuple[int, str]],
) -> None:
    code, err = refused_starts["bad keys"]
    assert code == 2
    assert err.count("\n") == 1, err
    assert "keys.toml, line 8: keys[0].hash: must be sha256$" in err


def _trainer(settings: Any) -> Any:
    from services.trainer.main import TrainerServer

    return TrainerServer(settings)


def _priorgen(settings: Any) -> Any:
    from services.priorgen.main import PriorGenServer

    return PriorGenServer(settings)


def _inference(settings: Any) -> Any:
    from services.inference.main import InferenceServer

    return InferenceServer(settings)


@pytest.mark.parametrize(
    ("build", "settings_class"),
    [(_trainer, TrainerSettings), (_priorgen, PriorGenSettings), (_inference, InferenceSettings)],
)
def test_every_service_refuses_a_public_bind_without_authentication(
    build: Callable[[Any], Any], settings_class: type, tmp_path: Path
) -> None:
    store = StoreSettings(store_dir=str(tmp_path / "store"), cache_dir=str(tmp_path / "cache"))
    public = ServerSettings(host="0.0.0.0", port=0, metrics_port=0)
    with pytest.raises(ConfigError, match=r"refusing to serve 0\.0\.0\.0 without authentication"):
        build(settings_class(server=public, store=store))
    with pytest.raises(ConfigError, match="cannot be read"):
        build(
            settings_class(
                server=public, store=store, auth=AuthSettings(api_keys_file=str(tmp_path / "none"))
            )
        )
