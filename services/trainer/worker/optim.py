"""The optimizer and LR schedule of a run, and DDP's gradient-sync switch for accumulation."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from services.common.errors import FailedPrecondition
from services.trainer.job_spec import JobSpec

ADAM_WEIGHT_DECAY = 1e-2  # diffusers' train_dreambooth.py defaults
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


def make_optimizer(modules: dict[str, torch.nn.Module], spec: JobSpec) -> tuple[Any, Any]:
    """The spec's optimizer (one parameter group per trained module, each with its learning
    rate) and the LR schedule (diffusers' get_scheduler: constant, constant_with_warmup, cosine,
    linear)."""
    from diffusers.optimization import get_scheduler

    rates = {"unet": spec.learning_rate, "text_encoder": spec.text_encoder_learning_rate}
    groups = [
        {"params": [p for p in module.parameters() if p.requires_grad], "lr": rates[name]}
        for name, module in modules.items()
    ]
    optimizer = _optimizer(spec, groups)
    scheduler = get_scheduler(
        spec.lr_schedule,
        optimizer=optimizer,
        num_warmup_steps=spec.lr_warmup_steps,
        num_training_steps=spec.max_train_steps,
    )
    return optimizer, scheduler


def _optimizer(spec: JobSpec, groups: list[dict[str, Any]]) -> Any:
    adam = {"betas": ADAM_BETAS, "weight_decay": ADAM_WEIGHT_DECAY, "eps": ADAM_EPS}
    name = spec.optimizer
    if name == "prodigy":
        from prodigyopt import Prodigy

        # The group "lr" scales Prodigy's own step-size estimate `d`. Decoupled weight decay and
        # bias correction as its authors advise for diffusion models. Their warm-up safeguard only
        # with a warm-up: without one it held d near its start for the whole of a short run
        # (tiny model, LoRA: d 1e-6 -> 1.4e-6 in 40 steps, against 2.3e-5 by step 28 without it).
        return Prodigy(
            groups,
            **adam,
            decouple=True,
            use_bias_correction=True,
            safeguard_warmup=spec.lr_warmup_steps > 0,
        )
    if name == "adamw_8bit":
        return _bitsandbytes().optim.AdamW8bit(groups, **adam)
    if name == "adamw":
        return torch.optim.AdamW(groups, **adam)
    raise ValueError(f"unknown optimizer {name!r}")  # validation refuses it first


def step_sizes(optimizer: Any) -> list[float]:
    """Each parameter group's step size this step used (the UNet's first): its learning rate
    (x Prodigy's estimate `d`). Read after optimizer.step() and before the LR schedule's step."""
    return [float(group["lr"]) * float(group.get("d", 1.0)) for group in optimizer.param_groups]


def _bitsandbytes() -> Any:
    try:
        import bitsandbytes
    except ImportError:  # validation refuses adamw_8bit on a trainer without it; a worker may differ
        raise FailedPrecondition(
            "spec.optimizer: adamw_8bit needs the bitsandbytes package on every Ray worker"
        ) from None
    return bitsandbytes


@contextlib.contextmanager
def no_sync(modules: Iterable[torch.nn.Module], enabled: bool) -> Iterator[None]:
    """Skip DDP's gradient all-reduce on all but the last micro-batch of an accumulated step."""
    with contextlib.ExitStack() as stack:
        if enabled:
            for module in modules:
                if isinstance(module, torch.nn.parallel.DistributedDataParallel):
                    stack.enter_context(module.no_sync())
        yield
