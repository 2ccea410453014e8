"""Per-row LoRA deltas on a resident base: y = Wx + s_i * B_i(A_i x), each batch row its own adapter.

How requests for different LoRA models of one base share UNet calls (as S-LoRA / Punica serve
LLM adapters): the base's Linear layers that some adapter adapts are patched once, in place, to
look for a `RowPlan` of the calling thread. Without one (base-model requests, full fine-tunes,
the warm-up) they run exactly as before. With one, each row of the call gets its own adapter's
low-rank delta: the rows' A and B matrices are stacked once per batch, and a layer adds
`bmm(bmm(x, A_rows^T), B_rows^T) * s_rows` to the base output for all of them in two batched
GEMMs, whatever the number of different adapters (rows without an adapter are left out with
index_select / index_add_; adapters of different ranks get a pair each). CFG rows carry their
request's adapter. The base weights are never changed, so loading an adapter costs its own few
MB and never a reload of the base.

Byte-identical to a request running alone, and to diffusers' `load_lora_weights` (peft): a
batched GEMM computes each row as its own (tokens x features) product, which on CPU gives the
bits of peft's `F.linear(F.linear(x, A), B) * scaling` over the rows of one request (measured:
the same on every shape of the UNet and text encoder), and the delta is added to the base output
as peft adds it (where every row is adapted at scale 1, by the second GEMM itself: `baddbmm_`
with beta 1 gives the bits of the product added afterwards, measured on every shape here). A
2-D input (one token per row, where GEMM bits do depend on the row count) is computed per group
of rows sharing an adapter instead, with peft's very ops.

DoRA rows (lora.py) add peft's DoRA term instead: (g - 1) * (base output - bias) + g * s * B(Ax),
with their own factors g stacked like their A and B (DoRA and plain rows get separate stacks).
A request scale of 0 is the base alone for DoRA too (peft would still apply the magnitudes).
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

from services.inference.lora import LoraAdapter, LoraLayer

_MARK = "_dreambooth_row_adapter_key"
_ACTIVE: ContextVar[RowPlan | None] = ContextVar("dreambooth_row_plan", default=None)


@dataclasses.dataclass(frozen=True)
class _Group:
    """Rows sharing one adapter and scale (the path for 2-D inputs)."""

    rows: torch.Tensor | None  # None: every row of the call
    down: torch.Tensor  # (rank, in)
    up: torch.Tensor  # (out, rank)
    scaling: float  # alpha / rank x the request's adapter scale
    dora: torch.Tensor | None = None  # (1, out): DoRA's factor g at this scaling


@dataclasses.dataclass(frozen=True)
class _Stack:
    """Rows of one rank, each with its own adapter: one pair of batched GEMMs for all of them."""

    rows: torch.Tensor | None  # None: every row of the call
    down_t: torch.Tensor  # (rows, in, rank): a transposed view, as F.linear multiplies by A^T
    up_t: torch.Tensor  # (rows, rank, out)
    scales: torch.Tensor | None  # (rows, 1, 1); None when every scaling is 1
    dora: torch.Tensor | None = None  # (rows, 1, out): DoRA's factors g (a stack of DoRA rows)


@dataclasses.dataclass(frozen=True)
class _LayerDeltas:
    groups: tuple[_Group, ...]
    stacks: tuple[_Stack, ...]


@dataclasses.dataclass(frozen=True)
class RowPlan:
    """What every patched layer adds during one call: layer key -> its rows' deltas."""

    deltas: Mapping[str, _LayerDeltas]


RowAdapter = tuple[LoraAdapter, float] | None  # a row's adapter and scale (None: the base alone)
_Entry = tuple[int, LoraLayer, float]  # (row, the layer's adapter weights, scaling)


def row_plan(component: str, row_adapters: Sequence[RowAdapter]) -> RowPlan | None:
    """The plan of one call of `component` whose row i runs `row_adapters[i]`; None when no row
    has an adapter (the call then runs the plain base)."""
    by_layer: dict[str, list[_Entry]] = {}
    for row, assigned in enumerate(row_adapters):
        if assigned is None or assigned[1] == 0.0:  # scale 0 adds exactly nothing
            continue
        adapter, scale = assigned
        for path, layer in adapter.layers.get(component, {}).items():
            by_layer.setdefault(path, []).append((row, layer, layer.alpha_scale * scale))
    if not by_layer:
        return None
    rows = len(row_adapters)
    return RowPlan(
        {
            _key(component, path): _LayerDeltas(_groups(entries, rows), _stacks(entries, rows))
            for path, entries in by_layer.items()
        }
    )


def _index(rows: list[int], total: int, device: torch.device) -> torch.Tensor | None:
    return None if len(rows) == total else torch.tensor(rows, dtype=torch.long, device=device)


def _groups(entries: list[_Entry], total: int) -> tuple[_Group, ...]:
    grouped: dict[tuple[int, float], list[_Entry]] = {}
    for entry in entries:
        grouped.setdefault((id(entry[1]), entry[2]), []).append(entry)
    return tuple(
        _Group(
            _index([r for r, _, _ in group], total, layer.down.device),
            layer.down,
            layer.up,
            scaling,
            None if layer.dora is None else layer.dora.factor(scaling).view(1, -1),
        )
        for group in grouped.values()
        for _, layer, scaling in group[:1]
    )


def _stacks(entries: list[_Entry], total: int) -> tuple[_Stack, ...]:
    by_kind: dict[tuple[int, bool], list[_Entry]] = {}
    for entry in entries:
        by_kind.setdefault((entry[1].down.shape[0], entry[1].dora is not None), []).append(entry)
    stacks = []
    for (_, is_dora), group in by_kind.items():
        down = group[0][1].down
        scalings = [scaling for _, _, scaling in group]
        scales = None
        if any(scaling != 1.0 for scaling in scalings):
            scales = torch.tensor(scalings, dtype=down.dtype, device=down.device).view(-1, 1, 1)
        stacks.append(
            _Stack(
                rows=_index([row for row, _, _ in group], total, down.device),
                down_t=torch.stack([layer.down for _, layer, _ in group]).transpose(1, 2),
                up_t=torch.stack([layer.up for _, layer, _ in group]).transpose(1, 2),
                scales=scales,
                dora=_dora_factors(group) if is_dora else None,
            )
        )
    return tuple(stacks)


def _dora_factors(group: list[_Entry]) -> torch.Tensor:
    factors = [layer.dora.factor(scaling) for _, layer, scaling in group if layer.dora is not None]
    return torch.stack(factors).unsqueeze(1)


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
    deltas = plan.deltas.get(getattr(self, _MARK))
    if deltas is None:
        return result
    if x.dim() == 3:
        for stack in deltas.stacks:
            if stack.dora is None and stack.rows is None and stack.scales is None:
                result.baddbmm_(torch.bmm(x, stack.down_t), stack.up_t)  # every row, scale 1: in the GEMM
                continue
            rows = x if stack.rows is None else x.index_select(0, stack.rows)
            update = torch.bmm(torch.bmm(rows, stack.down_t), stack.up_t)
            if stack.dora is not None:
                update = _dora_update(self, result, stack.rows, update, stack.dora, stack.scales)
            elif stack.scales is not None:
                update = update * stack.scales
            _add(result, stack.rows, update)
        return result
    for group in deltas.groups:  # as peft: result + lora_B(lora_A(x)) * scaling
        rows = x if group.rows is None else x.index_select(0, group.rows)
        update = F.linear(F.linear(rows, group.down), group.up)
        if group.dora is not None:
            update = _dora_update(self, result, group.rows, update, group.dora, group.scaling)
        elif group.scaling != 1.0:
            update = update * group.scaling
        _add(result, group.rows, update)
    return result


def _dora_update(
    layer: Any,
    result: torch.Tensor,
    rows: torch.Tensor | None,
    lora_result: torch.Tensor,
    factor: torch.Tensor,
    scaling: torch.Tensor | float | None,
) -> torch.Tensor:
    """peft's DoRA term for these rows: (g - 1) * (base output - bias) + g * B(Ax) * scaling."""
    base = result if rows is None else result.index_select(0, rows)
    if layer.bias is not None:
        base = base - layer.bias
    scaled = factor * lora_result
    if scaling is not None:
        scaled = scaled * scaling
    return (factor - 1) * base + scaled


def _add(result: torch.Tensor, rows: torch.Tensor | None, update: torch.Tensor) -> None:
    """result[rows] += update: the same bits as peft's out-of-place `result + update`."""
    if rows is None:
        result.add_(update)
    else:
        result.index_add_(0, rows, update)
