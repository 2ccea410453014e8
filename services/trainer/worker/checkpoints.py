"""Resumable training checkpoints in the object store, without a single pickle.

Layout (DESIGN §5), one folder per checkpoint:

    jobs/{job_id}/checkpoints/step-{n:08d}/trainable.safetensors   trained weights (full or LoRA)
    jobs/{job_id}/checkpoints/step-{n:08d}/optimizer.safetensors   optimizer tensors (Adam moments)
    jobs/{job_id}/checkpoints/step-{n:08d}/rng.safetensors         torch RNG states
    jobs/{job_id}/checkpoints/step-{n:08d}/ema.safetensors         averaged weights (ema_decay only)
    jobs/{job_id}/checkpoints/step-{n:08d}/checkpoint.json         everything else; written LAST

A checkpoint exists only once its checkpoint.json does (like a model's manifest), so a process
killed mid-upload leaves an incomplete folder that is ignored and later pruned. The optimizer's
state dict is split into tensors (safetensors) and plain values (JSON), so loading it never
runs pickle: the store is not trusted to hold code.
"""

from __future__ import annotations

import json
import re
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from services.common.errors import DataCorruption
from services.common.object_store import ObjectStore

FORMAT_VERSION = 1
KEEP_NEWEST = 2  # complete checkpoints kept per job; older ones are deleted after a new one lands
COMMIT_FILE = "checkpoint.json"
TRAINABLE_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"
EMA_FILE = "ema.safetensors"
_STEP_DIR = re.compile(r"^step-(\d{8})$")


def checkpoints_prefix(job_id: str) -> str:
    return f"jobs/{job_id}/checkpoints/"


def checkpoint_prefix(job_id: str, step: int) -> str:
    return f"{checkpoints_prefix(job_id)}step-{step:08d}/"


@dataclass
class TrainingState:
    """What a checkpoint holds, in memory. Tensors are on the CPU."""

    step: int
    trainable: dict[str, torch.Tensor]  # "unet.<param>" / "text_encoder.<param>"
    optimizer: dict[str, Any]  # torch optimizer state_dict
    lr_scheduler: dict[str, Any]  # torch LR scheduler state_dict (plain values)
    grad_scaler: dict[str, Any]  # torch.amp.GradScaler state_dict ({} when unused)
    rng: dict[str, torch.Tensor]  # "torch" and, on GPU, "cuda"
    info: dict[str, Any]  # job id, world size, spec digest: for humans and sanity checks
    ema: dict[str, torch.Tensor] = field(default_factory=dict)  # averaged weights ({} without EMA)
    ema_updates: int = 0  # updates folded into `ema`


def list_steps(store: ObjectStore, job_id: str) -> tuple[list[int], list[int]]:
    """(complete, incomplete) checkpoint steps of a job, each ascending."""
    complete, seen = set(), set()
    for info in store.list(checkpoints_prefix(job_id)):
        rest = info.key[len(checkpoints_prefix(job_id)) :]
        folder, _, name = rest.partition("/")
        match = _STEP_DIR.match(folder)
        if not match:
            continue
        step = int(match.group(1))
        seen.add(step)
        if name == COMMIT_FILE:
            complete.add(step)
    return sorted(complete), sorted(seen - complete)


def newest_step(store: ObjectStore, job_id: str) -> int | None:
    """The step of the job's newest complete checkpoint, or None when it has none."""
    complete, _ = list_steps(store, job_id)
    return complete[-1] if complete else None


def save(store: ObjectStore, job_id: str, state: TrainingState) -> float:
    """Upload a checkpoint (tensor files first, checkpoint.json last), prune old ones; seconds taken."""
    started = time.monotonic()
    prefix = checkpoint_prefix(job_id, state.step)
    optimizer_tensors, optimizer_meta = split_optimizer_state(state.optimizer)
    with tempfile.TemporaryDirectory(prefix="dreambooth-ckpt-") as tmp:
        files = {
            TRAINABLE_FILE: state.trainable,
            OPTIMIZER_FILE: optimizer_tensors,
            RNG_FILE: state.rng,
        }
        if state.ema:
            files[EMA_FILE] = state.ema
        for name, tensors in files.items():
            path = Path(tmp) / name
            save_file(_unshared(tensors), str(path))
            store.put_file(prefix + name, path)
    store.put_json(
        prefix + COMMIT_FILE,
        {
            "format_version": FORMAT_VERSION,
            "step": state.step,
            "optimizer": optimizer_meta,
            "lr_scheduler": _jsonable(state.lr_scheduler),
            "grad_scaler": _jsonable(state.grad_scaler),
            "info": state.info,
            **({"ema_updates": state.ema_updates} if state.ema else {}),
        },
    )
    prune(store, job_id)
    return time.monotonic() - started


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU tensors for safetensors, which refuses tensors sharing memory (bitsandbytes' optimizer
    states share their quantisation maps): a tensor whose memory was seen already is copied."""
    seen: set[int] = set()
    result = {}
    for key, value in tensors.items():
        value = value.detach().cpu().contiguous()
        if value.untyped_storage().data_ptr() in seen:
            value = value.clone()
        seen.add(value.untyped_storage().data_ptr())
        result[key] = value
    return result


def load(store: ObjectStore, job_id: str, step: int) -> TrainingState:
    prefix = checkpoint_prefix(job_id, step)
    try:
        meta = store.get_json(prefix + COMMIT_FILE)
        if meta.get("format_version") != FORMAT_VERSION or meta.get("step") != step:
            raise ValueError(f"unexpected format {meta.get('format_version')!r} or step {meta.get('step')!r}")
        with tempfile.TemporaryDirectory(prefix="dreambooth-ckpt-") as tmp:
            tensors = {}
            has_ema = "ema_updates" in meta
            for name in (TRAINABLE_FILE, OPTIMIZER_FILE, RNG_FILE, *([EMA_FILE] if has_ema else [])):
                path = Path(tmp) / name
                store.get_file(prefix + name, path)
                tensors[name] = load_file(str(path))  # safetensors: data only, never code
        return TrainingState(
            step=step,
            trainable=tensors[TRAINABLE_FILE],
            optimizer=join_optimizer_state(tensors[OPTIMIZER_FILE], meta["optimizer"]),
            lr_scheduler=meta["lr_scheduler"],
            grad_scaler=meta["grad_scaler"],
            rng=tensors[RNG_FILE],
            info=meta.get("info", {}),
            ema=tensors.get(EMA_FILE, {}),
            ema_updates=int(meta.get("ema_updates", 0)),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise DataCorruption(f"checkpoint {prefix} of job {job_id!r} is malformed: {err}") from err


def prune(store: ObjectStore, job_id: str, keep: int = KEEP_NEWEST) -> None:
    """Delete all but the newest `keep` complete checkpoints, and incomplete ones older than those."""
    complete, incomplete = list_steps(store, job_id)
    if not complete:
        return
    kept = complete[-keep:]
    doomed = [s for s in complete if s not in kept] + [s for s in incomplete if s < kept[-1]]
    for step in doomed:
        # checkpoint.json first: a half-deleted checkpoint must never look complete.
        store.delete(checkpoint_prefix(job_id, step) + COMMIT_FILE)
        store.delete_prefix(checkpoint_prefix(job_id, step))


def delete_all(store: ObjectStore, job_id: str) -> int:
    return store.delete_prefix(checkpoints_prefix(job_id))


# Optimizer state <-> (tensors, JSON). torch's state_dict is {"state": {param_index: {name: value}},
# "param_groups": [{...hyper-parameters, "params": [indices]}]}. A value may itself be a dict
# (bitsandbytes keeps its 8-bit state in one): its entries are stored under "name/inner".


def split_optimizer_state(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in state_dict["state"].items():
        for name, value in _flatten(values):
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{name}"] = value
            else:
                scalars.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": _jsonable(state_dict["param_groups"]), "scalars": scalars}


def join_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        index, _, name = key.partition(".")
        _nest(state.setdefault(int(index), {}), name, tensor)
    for index, values in meta["scalars"].items():
        for name, value in values.items():
            _nest(state.setdefault(int(index), {}), name, value)
    groups = []
    for group in meta["param_groups"]:
        group = dict(group)
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
        groups.append(group)
    return {"state": state, "param_groups": groups}


def _flatten(values: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for name, value in values.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{name}/")
        else:
            yield f"{prefix}{name}", value


def _nest(target: dict[str, Any], path: str, value: Any) -> None:
    *outer, name = path.split("/")
    for part in outer:
        target = target.setdefault(part, {})
    target[name] = value


def _jsonable(value: Any) -> Any:
    """Round-trip through JSON so what we store is exactly what we will read back."""
    return json.loads(json.dumps(value, default=_json_default))


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"cannot store {type(value).__name__} in a checkpoint")
