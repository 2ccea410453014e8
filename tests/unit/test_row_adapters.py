"""Per-row LoRA deltas on one patched Linear: each row gets exactly peft's result for its own
adapter and scale, rows without one get the plain layer, and no plan means no change at all."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from services.inference.lora import LoraAdapter, LoraLayer
from services.inference.row_adapters import applied, patch_layers, row_plan

IN, OUT = 32, 24


class Holder(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(IN, OUT)


def adapter(seed: int, rank: int) -> LoraAdapter:
    generator = torch.Generator().manual_seed(seed)
    layer = LoraLayer(
        down=torch.randn(rank, IN, generator=generator),
        up=torch.randn(OUT, rank, generator=generator),
        alpha_scale=1.0,
    )
    return LoraAdapter(model_id=f"lora-{seed}", digest=str(seed), layers={"unet": {"proj": layer}})


def delta(x: torch.Tensor, lora: LoraAdapter, scale: float) -> torch.Tensor:
    """What diffusers' load_lora_weights (peft) adds to the layer's output: B(A x) * scaling."""
    layer = lora.layers["unet"]["proj"]
    return F.linear(F.linear(x, layer.down), layer.up) * scale


def test_each_row_gets_its_own_adapters_delta_exactly_as_peft_computes_it() -> None:
    torch.manual_seed(0)
    module = Holder()
    first, second = adapter(1, rank=4), adapter(2, rank=8)
    for lora in (first, second):
        patch_layers(module, "unet", lora)
    rows = [(first, 1.0), (second, 1.0), None, (first, 0.3), (second, 0.0)]
    for shape in ((len(rows), 16, IN), (len(rows), IN)):  # tokens per row (batched GEMMs), or 2-D
        x = torch.randn(shape)
        with torch.inference_mode():
            plain = module.proj(x)
            with applied(row_plan("unet", rows)):
                mixed = module.proj(x)
            for index, assigned in enumerate(rows):
                if assigned is None or assigned[1] == 0.0:  # the base alone, bit for bit
                    assert torch.equal(mixed[index], plain[index])
                    continue
                one = slice(index, index + 1)
                assert torch.equal(mixed[index], (plain[one] + delta(x[one], *assigned))[0]), (shape, index)
                if len(shape) == 3:  # whole rows of tokens: also what the row gets alone, base included
                    with applied(row_plan("unet", [assigned])):
                        alone = module.proj(x[one])
                    assert torch.equal(mixed[index], alone[0])
                    base = F.linear(x[one], module.proj.weight, module.proj.bias)
                    assert torch.equal(alone, base + delta(x[one], *assigned))  # peft's result


def test_without_a_plan_a_patched_layer_is_the_plain_linear() -> None:
    module = Holder()
    x = torch.randn(3, 16, IN)
    before = module.proj(x)
    patch_layers(module, "unet", adapter(1, rank=4))
    assert torch.equal(module.proj(x), before)
    assert row_plan("unet", [None, None]) is None
    assert row_plan("text_encoder", [(adapter(1, rank=4), 1.0)]) is None  # adapts no text-encoder layer
