"""Per-row LoRA deltas on a resident base: y = Wx + s_i * B_i(A_i x), each batch row its own adapter.

How requests for different LoRA models of one base share UNet calls (as S-LoRA / Punica serve
LLM adapters): the base's Linear layers that some adapter adapts are patched once, in place, to
look for a `RowPlan` of the calling thread. Without one (base-model requests, full fine-tunes,
the warm-up) they run exactly as before. With one, the layer adds, for each group of rows that
share an adapter and a scale, that group's low-rank delta: the rows are gathered (index_select),
the delta computed for them alone, and added back in place (index_add_). CFG rows carry their
request's adapter. The base weights are never changed, so loading an adapter costs its own few
MB and never a reload of the base.

Byte-identical to a request running alone, and to diffusers' `load_lora_weights` (peft): the
delta is computed with the very ops peft uses (`F.linear(F.linear(x, A), B) * scaling`, then
added to the base output), on the request's own rows in the same order as its solo run, so
every GEMM sees the same rows (batch_invariance.py has why row counts otherwise matter).
"""

from __future__ import annotations

import contextlib
import dataclasses
import types
from collections.abc import Iterator, Mapping, Sequence
from contextvars import ContextVar
from typing import Any

import torch
import torch.nn.functional as F

from services.inference.lora import LoraAdapter

_MARK = "_dreambooth_row_adapter_key"
_ACTIVE: ContextVar[RowPlan | None] = ContextVar("dreambooth_row_plan", default=None)


@dataclasses.dataclass(frozen=True)
class _Delta:
    rows: torch.Tensor | None  # the rows of this group (None: every row of the call)
    down: torch.Tensor
    up: torch.Tensor
    scaling: float  # alpha / rank x the request's adapter scale


@dataclasses.dataclass(frozen=True)
class RowPlan:
    """What every patched layer adds during one call: layer key -> the groups' deltas."""

    deltas: Mapping[str, tuple[_Delta, ...]]


RowAdapter = tuple[LoraAdapter, float] | None  # a row's adapter and scale (None: the base alone)


def row_plan(component: str, row_adapters: Sequence[RowAdapter]) -> RowPlan | None:
    """The plan of one call of `component` whose row i runs `row_adapters[i]`; None when no row
    has an adapter (the call then runs the plain base)."""
    groups: dict[tuple[int, float], tuple[LoraAdapter, float, list[int]]] = {}
    for row, assigned in enumerate(row_adapters):
        if assigned is None or assigned[1] == 0.0:  # scale 0 adds exactly nothing
            continue
        adapter, scale = assigned
        groups.setdefault((id(adapter), scale), (adapter, scale, []))[2].append(row)
    deltas: dict[str, list[_Delta]] = {}
    for adapter, scale, rows in groups.values():
        index = None if len(rows) == len(row_adapters) else torch.tensor(rows, dtype=torch.long)
        for path, layer in adapter.layers.get(component, {}).items():
            delta = _Delta(index, layer.down, layer.up, layer.alpha_scale * scale)
            deltas.setdefault(_key(component, path), []).append(delta)
    if not deltas:
        return None
    return RowPlan({key: tuple(values) for key, values in deltas.items()})


@contextlib.contextmanager
def applied(plan: RowPlan | None) -> Iterator[None]:
    """Run the calls inside with `plan` (this thread only; None: the plain base)."""
    token = _ACTIVE.set(plan)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def patch_layers(module: Any, component: str, adapter: LoraAdapter) -> None:
    """Make the layers `adapter` adapts in `module` (its base's `component`) look for a plan.

    Idempotent, in place, and harmless to everyone else: without a plan a patched layer is the
    plain Linear. Modules shared between models (same files) are patched once for all of them.
    """
    for path in adapter.layers.get(component, {}):
        linear = module.get_submodule(path)
        if getattr(linear, _MARK, None) is None:
            setattr(linear, _MARK, _key(component, path))
            linear.forward = types.MethodType(_forward_with_row_deltas, linear)


def _key(component: str, path: str) -> str:
    return f"{component}:{path}"


def _forward_with_row_deltas(self: Any, x: torch.Tensor) -> torch.Tensor:
    result = F.linear(x, self.weight, self.bias)  # nn.Linear.forward
    plan = _ACTIVE.get()
    if plan is None:
        return result
    for delta in plan.deltas.get(getattr(self, _MARK), ()):
        # As peft: result + lora_B(lora_A(x)) * scaling. Multiplying by 1.0 and adding in place
        # give the same bits as peft's out-of-place ops, so both are skipped where they can be.
        rows = x if delta.rows is None else x.index_select(0, delta.rows)
        update = F.linear(F.linear(rows, delta.down), delta.up)
        if delta.scaling != 1.0:
            update = update * delta.scaling
        if delta.rows is None:
            result.add_(update)
        else:
            result.index_add_(0, delta.rows, update)
    return result
