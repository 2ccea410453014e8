"""An exponential moving average (EMA) of the trained weights: rank 0 keeps it, checkpoints it,
and previews and publishes it instead of the raw weights when the spec's `ema_decay` is set.

The decay follows diffusers' `EMAModel` (without `use_ema_warmup`): the first update copies the
weights, the n-th uses min(ema_decay, (1 + n') / (10 + n')) with n' = n - 1, so a short
DreamBooth run is not averaged toward the base model it started from.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from services.common.errors import FailedPrecondition
from services.trainer.job_spec import JobSpec
from services.trainer.worker.checkpoints import TrainingState
from services.trainer.worker.models import unwrap


class WeightAverage:
    """The EMA of every trained parameter of `modules` (full weights, or LoRA/DoRA adapters)."""

    def __init__(self, modules: dict[str, torch.nn.Module], decay: float) -> None:
        self.decay = decay
        self.updates = 0
        self._params = {
            f"{name}.{key}": param
            for name, module in modules.items()
            for key, param in unwrap(module).named_parameters()
            if param.requires_grad
        }
        self._shadow = {key: param.detach().clone() for key, param in self._params.items()}

    def decay_at(self, update: int) -> float:
        """The decay of the `update`-th update (1 = the first)."""
        step = update - 1
        if step <= 0:
            return 0.0
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self) -> None:
        """Fold the current weights in; call after every optimizer step."""
        self.updates += 1
        weight = 1.0 - self.decay_at(self.updates)
        for key, param in self._params.items():
            self._shadow[key].lerp_(param.detach(), weight)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged weights, on the CPU (the update count is kept beside them: `updates`)."""
        return {key: value.detach().cpu() for key, value in self._shadow.items()}

    def load_state_dict(self, weights: dict[str, torch.Tensor], updates: int) -> None:
        if sorted(weights) != sorted(self._shadow):
            raise FailedPrecondition("the checkpoint's averaged weights do not match the trained ones")
        for key, value in weights.items():
            self._shadow[key].copy_(value)
        self.updates = updates

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The modules hold the averaged weights inside (previews, publishing), the raw ones after."""
        self._swap()
        try:
            yield
        finally:
            self._swap()

    @torch.no_grad()
    def _swap(self) -> None:
        for key, param in self._params.items():  # swapping storage: no copy of the weights
            param.data, self._shadow[key] = self._shadow[key], param.data


def make_average(
    modules: dict[str, torch.nn.Module], spec: JobSpec, resumed: TrainingState | None
) -> WeightAverage | None:
    """The average of the trained weights (None without ema_decay), as of the checkpoint if any."""
    if not spec.ema_decay:
        return None
    average = WeightAverage(modules, spec.ema_decay)
    if resumed is not None:
        if not resumed.ema:
            raise FailedPrecondition("the checkpoint has no averaged weights: was the job's spec changed?")
        average.load_state_dict(resumed.ema, resumed.ema_updates)
    return average


def maybe_applied(average: WeightAverage | None) -> contextlib.AbstractContextManager[None]:
    return average.applied() if average is not None else contextlib.nullcontext()
