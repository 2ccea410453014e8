"""Training checkpoints in the store: a complete round trip without pickle, and only complete
checkpoints count."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers.optimization import get_scheduler
from safetensors.torch import load as load_safetensors

from services.common.errors import DataCorruption
from services.common.local_store import LocalObjectStore
from services.trainer.worker import checkpoints


def _trained_optimizer(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer, object]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(
        [{"params": model[0].parameters(), "lr": 1e-3}, {"params": model[1].parameters(), "lr": 5e-4}]
    )
    schedule = get_scheduler("cosine", optimizer=optimizer, num_warmup_steps=2, num_training_steps=10)
    for _ in range(3):
        model(torch.randn(5, 4)).pow(2).mean().backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
    return model, optimizer, schedule


def _state(step: int) -> checkpoints.TrainingState:
    model, optimizer, schedule = _trained_optimizer()
    return checkpoints.TrainingState(
        step=step,
        trainable={f"unet.{k}": v for k, v in model.state_dict().items()},
        optimizer=optimizer.state_dict(),
        lr_scheduler=schedule.state_dict(),
        grad_scaler={},
        rng={"torch": torch.get_rng_state()},
        info={"job_id": "job-1"},
    )


@pytest.fixture
def store(tmp_path: Path) -> LocalObjectStore:
    return LocalObjectStore(tmp_path / "store")


def test_optimizer_state_splits_into_tensors_and_json_and_back() -> None:
    _, optimizer, _ = _trained_optimizer()
    tensors, meta = checkpoints.split_optimizer_state(optimizer.state_dict())
    meta = json.loads(json.dumps(meta))  # what really happens: it is stored as JSON
    restored = checkpoints.join_optimizer_state(tensors, meta)

    _, fresh, _ = _trained_optimizer(seed=1)
    fresh.load_state_dict(restored)
    original = optimizer.state_dict()
    for index, values in original["state"].items():
        for name, value in values.items():
            assert torch.equal(fresh.state_dict()["state"][index][name], value)
    assert fresh.state_dict()["param_groups"] == original["param_groups"]


def test_a_checkpoint_round_trips_through_the_store(store: LocalObjectStore) -> None:
    state = _state(step=20)
    checkpoints.save(store, "job-1", state)
    loaded = checkpoints.load(store, "job-1", 20)

    assert loaded.step == 20
    assert loaded.trainable.keys() == state.trainable.keys()
    assert all(torch.equal(loaded.trainable[k], v) for k, v in state.trainable.items())
    assert torch.equal(loaded.rng["torch"], state.rng["torch"])
    assert loaded.lr_scheduler == json.loads(json.dumps(state.lr_scheduler))
    _, optimizer, schedule = _trained_optimizer(seed=3)
    optimizer.load_state_dict(loaded.optimizer)
    schedule.load_state_dict(loaded.lr_scheduler)
    assert schedule.get_last_lr() == pytest.approx(state.lr_scheduler["_last_lr"])


def test_checkpoints_hold_only_safetensors_and_json(store: LocalObjectStore) -> None:
    checkpoints.save(store, "job-1", _state(step=5))
    keys = [info.key for info in store.list(checkpoints.checkpoint_prefix("job-1", 5))]
    assert sorted(key.rsplit("/", 1)[1] for key in keys) == [
        "checkpoint.json",
        "optimizer.safetensors",
        "rng.safetensors",
        "trainable.safetensors",
    ]
    for key in keys:
        raw = store.get_bytes(key)
        if key.endswith(".json"):
            json.loads(raw)
        else:
            load_safetensors(raw)


def test_only_complete_checkpoints_count(store: LocalObjectStore) -> None:
    assert checkpoints.newest_step(store, "job-1") is None
    checkpoints.save(store, "job-1", _state(step=10))
    # A process killed mid-upload: tensor files but no checkpoint.json.
    store.put_bytes(checkpoints.checkpoint_prefix("job-1", 20) + checkpoints.TRAINABLE_FILE, b"partial")
    assert checkpoints.newest_step(store, "job-1") == 10
    assert checkpoints.list_steps(store, "job-1") == ([10], [20])
    assert checkpoints.newest_step(store, "job-2") is None


def test_old_checkpoints_are_pruned(store: LocalObjectStore) -> None:
    store.put_bytes(checkpoints.checkpoint_prefix("job-1", 5) + checkpoints.TRAINABLE_FILE, b"partial")
    for step in (10, 20, 30):
        checkpoints.save(store, "job-1", _state(step=step))
    complete, incomplete = checkpoints.list_steps(store, "job-1")
    assert complete == [20, 30]
    assert incomplete == []


def test_a_malformed_checkpoint_is_data_corruption(store: LocalObjectStore) -> None:
    checkpoints.save(store, "job-1", _state(step=10))
    store.put_json(checkpoints.checkpoint_prefix("job-1", 10) + checkpoints.COMMIT_FILE, {"step": 10})
    with pytest.raises(DataCorruption, match="job-1"):
        checkpoints.load(store, "job-1", 10)


def test_delete_all_removes_a_jobs_checkpoints(store: LocalObjectStore) -> None:
    checkpoints.save(store, "job-1", _state(step=10))
    checkpoints.save(store, "job-2", _state(step=10))
    assert checkpoints.delete_all(store, "job-1") == 4
    assert checkpoints.newest_step(store, "job-1") is None
    assert checkpoints.newest_step(store, "job-2") == 10
