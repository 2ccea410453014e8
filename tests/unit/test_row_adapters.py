"""Per-row LoRA deltas on one patched Linear: each row gets exactly peft's result for its own
adapter and scale (DoRA adapters included), rows without one get the plain layer, and no plan
means no change at all."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from services.inference.lora import LoraAdapter, LoraLayer, read_adapter
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


def dora_pair(tmp_path: Path, seed: int, rank: int) -> tuple[Holder, torch.nn.Module, LoraAdapter]:
    """A plain layer, the same layer with a peft DoRA adapter (trained-looking weights), and that
    adapter as the server reads it from diffusers' file format."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    plain = Holder()
    with_dora = inject_adapter_in_model(
        LoraConfig(r=rank, lora_alpha=rank, target_modules=["proj"], use_dora=True), copy.deepcopy(plain)
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in with_dora.named_parameters():
            if "lora_" in name:
                noise = torch.randn(parameter.shape, generator=generator)
                parameter.copy_(parameter * (1 + 0.2 * noise) if "magnitude" in name else noise * 0.3)
    weights = tmp_path / f"dora-{seed}.safetensors"
    save_file({f"unet.{k}": v.contiguous() for k, v in get_peft_model_state_dict(with_dora).items()}, weights)
    lora = read_adapter(weights, {"unet": plain}, model_id=f"dora-{seed}", digest=str(seed))
    assert lora.layers["unet"]["proj"].dora is not None
    return plain, with_dora, lora


def peft_dora(peft_layer: torch.nn.Module, x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """peft's DoRA result for rows `x` whose base output (bias included) is `base`."""
    term = peft_layer.lora_magnitude_vector["default"](
        x,
        lora_A=peft_layer.lora_A["default"],
        lora_B=peft_layer.lora_B["default"],
        scaling=peft_layer.scaling["default"],
        base_layer=peft_layer.base_layer,
        base_result=base,
    )
    return base + term


def test_dora_rows_get_peft_dora_output_beside_plain_lora_rows(tmp_path: Path) -> None:
    plain, with_dora, dora = dora_pair(tmp_path, seed=3, rank=4)
    lora = adapter(1, rank=4)  # a plain LoRA of the same rank: DoRA rows must get their own stack
    patch_layers(plain, "unet", dora)
    patch_layers(plain, "unet", lora)
    rows = [(dora, 1.0), (lora, 1.0), None, (dora, 1.0), (dora, 0.0)]
    dora_rows = torch.tensor([0, 3])
    for shape in ((len(rows), 16, IN), (len(rows), IN)):
        x = torch.randn(shape)
        with torch.inference_mode():
            base = plain.proj(x)
            with applied(row_plan("unet", rows)):
                mixed = plain.proj(x)
            expected = peft_dora(with_dora.proj, x[dora_rows], base[dora_rows])
            assert not torch.equal(expected, base[dora_rows])  # the adapter does change the layer
            assert torch.equal(mixed[dora_rows], expected), shape  # DoRA at full strength: peft's bits
            if len(shape) == 3:  # whole rows of tokens: also peft's layer on the whole batch
                assert torch.equal(mixed[dora_rows], with_dora.proj(x)[dora_rows])
            one = slice(1, 2)
            assert torch.equal(mixed[1], (base[one] + delta(x[one], lora, 1.0))[0])
            assert torch.equal(mixed[2], base[2]) and torch.equal(mixed[4], base[4])  # scale 0: the base


def test_dora_at_another_scale_is_peft_with_that_scaling(tmp_path: Path) -> None:
    plain, with_dora, dora = dora_pair(tmp_path, seed=4, rank=2)
    patch_layers(plain, "unet", dora)
    x = torch.randn(2, 16, IN)
    for scale in (0.3, 1.7):
        with_dora.proj.scaling["default"] = scale  # what diffusers' set_adapters(weights) sets
        with torch.inference_mode():
            expected = with_dora.proj(x)
            with applied(row_plan("unet", [(dora, scale), (dora, scale)])):
                served = plain.proj(x)
        torch.testing.assert_close(served, expected, rtol=1e-5, atol=1e-6)
