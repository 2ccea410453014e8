"""The optimizer and LR schedule of a run, and DDP's gradient-sync switch for accumulation."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from services.trainer.job_spec import JobSpec

ADAM_WEIGHT_DECAY = 1e-2  # diffusers' train_dreambooth.py defaults
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


def make_optimizer(modules: dict[str, torch.nn.Module], spec: JobSpec) -> tuple[Any, Any]:
    """AdamW (one parameter group per trained module, each with its learning rate) and the
    LR schedule (diffusers' get_scheduler: constant, constant_with_warmup, cosine, linear)."""
    from diffusers.optimization import get_scheduler

    rates = {"unet": spec.learning_rate, "text_encoder": spec.text_encoder_learning_rate}
    groups = [
        {"params": [p for p in module.parameters() if p.requires_grad], "lr": rates[name]}
        for name, module in modules.items()
    ]
    optimizer = torch.optim.AdamW(groups, betas=ADAM_BETAS, weight_decay=ADAM_WEIGHT_DECAY, eps=ADAM_EPS)
    scheduler = get_scheduler(
        spec.lr_schedule,
        optimizer=optimizer,
        num_warmup_steps=spec.lr_warmup_steps,
        num_training_steps=spec.max_train_steps,
    )
    return optimizer, scheduler


@contextlib.contextmanager
def no_sync(modules: Iterable[torch.nn.Module], enabled: bool) -> Iterator[None]:
    """Skip DDP's gradient all-reduce on all but the last micro-batch of an accumulated step."""
    with contextlib.ExitStack() as stack:
        if enabled:
            for module in modules:
                if isinstance(module, torch.nn.parallel.DistributedDataParallel):
                    stack.enter_context(module.no_sync())
        yield
