"""Make a request's images independent of the batch it runs in (measured on CPU, MKL + oneDNN).

Dynamic batching must not change a request's bytes. Measured here (torch 2.13 CPU): every op of
the UNet gives a row the same bits whatever the batch size, except
- small 2-D GEMMs: the time-embedding Linear layers see an input of `batch` rows, and MKL computes
  rows that do not fill its 4-row kernel along another path (a 1e-7 difference that grows to a
  1-level pixel difference over 20 steps);
- convolutions with a batch of exactly one (oneDNN picks another kernel than for batch >= 2).
When every row of a UNet call has the same timestep (diffusers expands a scalar timestep to the
batch: a view with stride 0), the time embedding is the same for every row. Computing it on one
row and letting the ResNet blocks broadcast it is exact, cheaper, and the same for every batch
size. The sampler pads a one-row UNet batch to two. Verified by tests that compare batched and
solo runs byte for byte; on GPUs, cuBLAS/cuDNN kernel choice by batch size may still move bits.
"""

from __future__ import annotations

import types
from typing import Any

import torch

_MARK = "_dreambooth_shared_time_embedding"


def _one_row_when_shared(self: Any, timesteps: torch.Tensor) -> torch.Tensor:
    shared = timesteps.dim() == 1 and timesteps.shape[0] > 1 and timesteps.stride(0) == 0
    return type(self).forward(self, timesteps[:1] if shared else timesteps)


def share_time_embedding_rows(unet: Any) -> None:
    """Patch the UNet in place (idempotent): one time-embedding row when all rows share a timestep."""
    time_proj = unet.time_proj
    if not getattr(time_proj, _MARK, False):
        time_proj.forward = types.MethodType(_one_row_when_shared, time_proj)
        setattr(time_proj, _MARK, True)
