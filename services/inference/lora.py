"""LoRA models: the adapter weights of a published LoRA folder, read for use on a resident base.

The trainer publishes a LoRA model as diffusers' LoRA folder (`pytorch_lora_weights.safetensors`,
see services/trainer/worker/publish.py): per adapted Linear layer of the UNet (and, when the text
encoder was trained, of the text encoder) a down projection A (rank x in) and an up projection
B (out x rank). `read_adapter` turns that file into plain tensors keyed by the layer's module
path, checked against the base's modules, and never touches the base: row_adapters.py applies
them at run time (y = Wx + s * B(Ax)), exactly as diffusers' `load_lora_weights` (peft) does.

Accepted key spellings (all diffusers writes): `{component}.{path}.lora.down.weight` /
`.lora.up.weight`, `.lora_linear_layer.down.weight` / `.up.weight` and peft's `.lora_A.weight` /
`.lora_B.weight`; an optional `{component}.{path}.alpha` sets the layer's scale to alpha / rank
(else 1, as diffusers does when a file has no alphas).

DoRA adapters (`use_dora`: a layer also has `.lora_magnitude_vector`, one magnitude m per output
feature) are served exactly as peft computes them: with s the layer's scaling and
g = m / ||W + s B A|| (the norm of each output row of the adapted weight, held constant),
y = Wx + b + (g - 1) * Wx + g * s * B(Ax). `DoraScale` holds g for the adapter at full
strength (computed with peft's very ops, so the result has peft's bits) and the row norms'
three terms, from which g at another request scale follows without keeping the base's weights.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from services.common.errors import FailedPrecondition

LORA_WEIGHTS_FILE = "pytorch_lora_weights.safetensors"
LORA_COMPONENTS = ("unet", "text_encoder")
_SUFFIXES = (
    (".lora.down.weight", "down"),
    (".lora.up.weight", "up"),
    (".lora_linear_layer.down.weight", "down"),
    (".lora_linear_layer.up.weight", "up"),
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
    (".lora_magnitude_vector", "magnitude"),
    (".alpha", "alpha"),
)


@dataclasses.dataclass(frozen=True, eq=False)
class DoraScale:
    """DoRA's per-output factor g = m / ||W + s B A|| of one layer, for any scaling s."""

    magnitude: torch.Tensor  # m, (out_features,)
    at_alpha: torch.Tensor  # g at s = alpha_scale (a request scale of 1), with peft's ops
    alpha_scale: float
    norm_terms: torch.Tensor  # (3, out): ||W_j||^2, <W_j, (BA)_j>, ||(BA)_j||^2

    def factor(self, scaling: float) -> torch.Tensor:
        if scaling == self.alpha_scale:
            return self.at_alpha
        squared, cross, delta = self.norm_terms
        norm = (squared + 2.0 * scaling * cross + scaling * scaling * delta).clamp_min(0.0).sqrt()
        return self.magnitude / norm

    @property
    def size_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.magnitude, self.at_alpha, self.norm_terms))


@dataclasses.dataclass(frozen=True, eq=False)
class LoraLayer:
    """One adapted Linear layer: delta(x) = alpha_scale * up(down(x)) (DoRA: see `dora`)."""

    down: torch.Tensor  # (rank, in_features)
    up: torch.Tensor  # (out_features, rank)
    alpha_scale: float  # alpha / rank: peft's `scaling` before any request scale
    dora: DoraScale | None = None  # a DoRA layer's magnitude factors

    @property
    def size_bytes(self) -> int:
        own = sum(t.numel() * t.element_size() for t in (self.down, self.up))
        return own + (self.dora.size_bytes if self.dora is not None else 0)


@dataclasses.dataclass(frozen=True, eq=False)
class LoraAdapter:
    """A LoRA model's adapters, ready to apply to its base's modules (compared by identity)."""

    model_id: str
    digest: str  # the LoRA model's manifest digest
    layers: Mapping[str, Mapping[str, LoraLayer]]  # component -> module path -> weights

    @property
    def size_bytes(self) -> int:
        return sum(layer.size_bytes for by_path in self.layers.values() for layer in by_path.values())

    def components(self) -> tuple[str, ...]:
        return tuple(name for name in LORA_COMPONENTS if self.layers.get(name))


def read_adapter(
    weights: Path,
    base_modules: Mapping[str, Any],
    *,
    model_id: str,
    digest: str,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> LoraAdapter:
    """The adapters in a LoRA model's verified `pytorch_lora_weights.safetensors`, checked
    against the base's `unet` and `text_encoder` modules (every adapted layer must be a Linear of
    matching shape)."""
    from safetensors.torch import load_file

    parts = _group_keys(load_file(str(weights)), model_id)
    layers: dict[str, dict[str, LoraLayer]] = {}
    for (component, layer_path), tensors in sorted(parts.items()):
        module_path, linear = _find_linear(base_modules[component], layer_path, model_id, component)
        layers.setdefault(component, {})[module_path] = _layer(
            tensors, linear, f"{component}.{layer_path}", model_id, device, dtype
        )
    if not layers:
        raise FailedPrecondition(f"LoRA model {model_id!r} adapts no layer of the UNet or text encoder")
    return LoraAdapter(model_id=model_id, digest=digest, layers=layers)


def _group_keys(state: Mapping[str, torch.Tensor], model_id: str) -> dict[tuple[str, str], dict[str, Any]]:
    """(component, layer path) -> {"down", "up", "alpha"} tensors."""
    parts: dict[tuple[str, str], dict[str, Any]] = {}
    for key, tensor in state.items():
        component, _, rest = key.partition(".")
        match = next(((rest[: -len(s)], role) for s, role in _SUFFIXES if rest.endswith(s)), None)
        if component not in LORA_COMPONENTS or match is None:
            raise FailedPrecondition(
                f"LoRA model {model_id!r} has a weight this server cannot apply: {key!r} "
                "(supported: diffusers-format LoRA on Linear layers of the UNet and text encoder)"
            )
        parts.setdefault((component, match[0]), {})[match[1]] = tensor
    return parts


def _find_linear(module: Any, layer_path: str, model_id: str, component: str) -> tuple[str, Any]:
    candidates = [layer_path]
    if component == "text_encoder" and layer_path.startswith("text_model."):
        candidates.append(layer_path.removeprefix("text_model."))  # older transformers layouts
    for candidate in candidates:
        try:
            found = module.get_submodule(candidate)
        except AttributeError:
            continue
        if isinstance(found, torch.nn.Linear):
            return candidate, found
    raise FailedPrecondition(
        f"LoRA model {model_id!r} does not fit its base: {component} has no Linear layer {layer_path!r}"
    )


def _layer(
    tensors: dict[str, Any],
    linear: Any,
    name: str,
    model_id: str,
    device: str | torch.device,
    dtype: torch.dtype,
) -> LoraLayer:
    down, up = tensors.get("down"), tensors.get("up")
    if down is None or up is None:
        raise FailedPrecondition(f"LoRA model {model_id!r}: layer {name!r} lacks its down or up weights")
    rank = down.shape[0]
    shapes_fit = (
        down.dim() == 2
        and up.dim() == 2
        and down.shape[1] == linear.in_features
        and up.shape == (linear.out_features, rank)
    )
    if not shapes_fit:
        raise FailedPrecondition(
            f"LoRA model {model_id!r} does not fit its base: layer {name!r} has shapes "
            f"{tuple(down.shape)} and {tuple(up.shape)} for a Linear {linear.in_features} -> "
            f"{linear.out_features}"
        )
    alpha = tensors.get("alpha")
    # peft's scaling is the Python float lora_alpha / r; diffusers sets lora_alpha = r without alphas.
    alpha_scale = float(alpha.item()) / rank if alpha is not None else rank / rank
    down = down.to(device=device, dtype=dtype).contiguous()
    up = up.to(device=device, dtype=dtype).contiguous()
    dora = None
    magnitude = tensors.get("magnitude")
    if magnitude is not None:
        if tuple(magnitude.shape) != (linear.out_features,):
            raise FailedPrecondition(
                f"LoRA model {model_id!r} does not fit its base: layer {name!r} has a DoRA magnitude "
                f"of shape {tuple(magnitude.shape)} for {linear.out_features} output features"
            )
        dora = _dora_scale(magnitude.to(device=device, dtype=dtype), down, up, alpha_scale, linear.weight)
    return LoraLayer(down=down, up=up, alpha_scale=alpha_scale, dora=dora)


@torch.no_grad()
def _dora_scale(
    magnitude: torch.Tensor, down: torch.Tensor, up: torch.Tensor, alpha_scale: float, weight: torch.Tensor
) -> DoraScale:
    """peft's DoraLinearLayer: lora_weight = B(A(I))^T, norm = ||W + scaling * lora_weight|| by row."""
    import torch.nn.functional as F

    weight = weight.to(device=down.device, dtype=down.dtype)
    eye = torch.eye(down.shape[1], device=down.device, dtype=down.dtype)
    delta = F.linear(F.linear(eye, down), up).T
    norm = torch.linalg.norm(weight + alpha_scale * delta, dim=1).to(weight.dtype)
    terms = torch.stack([(weight * weight).sum(1), (weight * delta).sum(1), (delta * delta).sum(1)])
    return DoraScale(
        magnitude=magnitude, at_alpha=magnitude / norm, alpha_scale=alpha_scale, norm_terms=terms
    )
