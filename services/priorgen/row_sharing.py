"""Compute the timestep path of a UNet once per call instead of once per batch row.

In Stable Diffusion sampling every row of a UNet call has the same timestep, so the timestep
embedding and each resnet's `time_emb_proj` see identical rows. Small-row-count GEMMs are where
batched float results vary with a row's position (measured with MKL here: 6 or 10 rows give
position-dependent results, 4, 8 and >= 12 do not), which would make an image depend on its slot
in the batch. Computing the shared row once (a 1-row GEMM, whatever the batch) and broadcasting
it removes that dependence, and saves a little work.
"""

from __future__ import annotations

import torch


class SharedRowLinear(torch.nn.Module):
    """A Linear that, given identical rows, computes one and broadcasts it."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and x.shape[0] > 1 and torch.equal(x, x[:1].expand_as(x)):
            return self.linear(x[:1]).expand(x.shape[0], -1)
        return self.linear(x)


def share_timestep_rows(unet: torch.nn.Module) -> int:
    """Wrap the timestep-embedding Linears of `unet` (in place); returns how many were wrapped."""
    targets: list[tuple[torch.nn.Module, str]] = []
    for name, module in unet.named_modules():
        if isinstance(module, SharedRowLinear):
            return 0  # already done (the pipeline is cached and shared)
        for child_name, child in module.named_children():
            is_time_path = name == "time_embedding" or child_name == "time_emb_proj"
            if is_time_path and isinstance(child, torch.nn.Linear):
                targets.append((module, child_name))
    for parent, child_name in targets:
        setattr(parent, child_name, SharedRowLinear(getattr(parent, child_name)))
    return len(targets)
