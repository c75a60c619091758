"""DyLoRAConv1d/2d/3d and the model helpers on convolutions: inject, merge/unmerge, evaluate_ranks,
freeze_untrained_slots, and PEFT I/O against the real peft LoRA Conv layers."""
import copy

import pytest
import torch
from torch import nn

import dylora_kernels as dk
from dylora_kernels import reference
from dylora_kernels.ops import _C
from conftest import rel_err

pytestmark = pytest.mark.skipif(_C is None, reason="the conv ops need the C++ extension")


class TinyUNetBlock(nn.Module):
    """Convolutions as a diffusion UNet has them (3×3 with padding, a strided 3×3, a 1×1), plus a linear."""

    def __init__(self):
        super().__init__()
        self.conv_in = nn.Conv2d(3, 8, 3, padding=1)
        self.down = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.proj = nn.Conv2d(8, 6, 1)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        h = self.proj(torch.relu(self.down(torch.relu(self.conv_in(x)))))
        return self.head(h.mean((2, 3)))


def randomize_adapters(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) / 3)


def model_and_input(dtype=torch.float64):
    torch.manual_seed(0)
    return TinyUNetBlock().to(dtype), torch.randn(2, 3, 9, 10, dtype=dtype)


@pytest.mark.parametrize("cls,base", [(dk.DyLoRAConv1d, nn.Conv1d(5, 7, 3, stride=2, padding=1)),
                                      (dk.DyLoRAConv2d, nn.Conv2d(5, 7, (3, 2), padding="same", dilation=(1, 1))),
                                      (dk.DyLoRAConv3d, nn.Conv3d(5, 7, 3, padding="valid"))],
                         ids=["1d", "2d-same", "3d-valid"])
def test_module_is_a_drop_in(cls, base):
    """A fresh layer equals its base (B = 0); with random adapters it equals the reference at every rank,
    per-sample ranks and unbatched input included; the base weight is shared and frozen."""
    base = base.double()
    if cls is dk.DyLoRAConv2d:  # 'same' with an even kernel side needs asymmetric padding: refused
        with pytest.raises(ValueError, match="asymmetric"):
            dk.DyLoRAConv2d.from_conv(base, r_max=4, alpha=2.0)
        base = nn.Conv2d(5, 7, (3, 5), padding="same").double()
    layer = dk.DyLoRAConvNd.from_conv(base, r_max=4, alpha=2.0)
    assert type(layer) is cls and layer.weight is base.weight and not layer.weight.requires_grad
    spatial = {dk.DyLoRAConv1d: (11,), dk.DyLoRAConv2d: (8, 9), dk.DyLoRAConv3d: (5, 6, 5)}[cls]
    x = torch.randn(3, 5, *spatial, dtype=torch.float64)
    assert rel_err(layer(x), base(x)) <= 1e-14  # B = 0 (the base conv runs with A's channels: rounding)
    randomize_adapters(layer)
    for rank in (1, 4, torch.tensor([2, 4, 1])):
        layer.set_rank(rank)
        expected = reference.dylora_conv(x, base.weight, base.bias, layer.lora_A, layer.lora_B, rank, 2.0,
                                         layer.stride, layer.padding, layer.dilation)
        assert rel_err(layer(x), expected) <= 1e-12
    layer.set_rank(3)
    with torch.no_grad():
        assert rel_err(layer(x[0]), layer(x[:1])[0]) == 0  # unbatched input


def test_inject_merge_unmerge_and_evaluate_ranks():
    model, x = model_and_input()
    reference_model = copy.deepcopy(model)
    names = dk.inject(model, ["conv_in", "down", "proj", "head"], r_max=6, alpha=3.0)
    assert names == ["conv_in", "down", "proj", "head"]
    assert isinstance(model.conv_in, dk.DyLoRAConv2d) and isinstance(model.head, dk.DyLoRALinear)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        f"{m}.lora_{ab}" for m in names for ab in "AB"]
    assert rel_err(model(x), reference_model(x)) <= 1e-14  # B = 0: the base model
    randomize_adapters(model)
    outputs = dk.evaluate_ranks(model, x, [1, 3, 6])
    for b in (1, 3, 6):
        dk.set_rank(model, b)
        assert rel_err(outputs[b], model(x)) <= 1e-12
    dk.set_rank(model, 4)
    y = model(x)
    dk.merge(model)
    assert type(model.down) is dk.MergedConv2d and isinstance(model.down, nn.Conv2d)
    assert rel_err(model(x), y) <= 1e-12  # the plain convolution with the merged weight
    assert set(model.state_dict()) == set(reference_model.state_dict())
    dk.unmerge(model)
    assert isinstance(model.down, dk.DyLoRAConv2d)
    assert rel_err(model.down.weight, reference_model.down.weight) <= 1e-14


def test_inject_refuses_grouped_convolution_and_changes_nothing():
    model = nn.Sequential(nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ValueError, match="groups=1 only"):
        dk.inject(model, ["0", "1"], r_max=2, alpha=1.0)
    assert type(model[0]) is nn.Conv2d


def test_freeze_untrained_slots_on_conv():
    model, x = model_and_input(torch.float32)
    dk.inject(model, ["down"], r_max=5, alpha=2.0)
    randomize_adapters(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1, weight_decay=0.1)
    hooks = dk.freeze_untrained_slots(opt, model)
    A0, B0 = model.down.lora_A.detach().clone(), model.down.lora_B.detach().clone()
    dk.set_rank(model, 3)
    model(x).sum().backward()
    opt.step()
    hooks.remove()
    A1, B1 = model.down.lora_A.detach(), model.down.lora_B.detach()
    untouched = torch.ones(5, dtype=torch.bool)
    untouched[2] = False
    assert torch.equal(A1[untouched], A0[untouched]) and torch.equal(B1[:, untouched], B0[:, untouched])
    assert not torch.equal(A1[2], A0[2]) and not torch.equal(B1[:, 2], B0[:, 2])


peft = pytest.importorskip("peft", reason="peft is not installed (a test dependency: pip install -e '.[test]')")


def test_export_peft_loads_in_peft_and_computes_the_same(tmp_path):
    model, x = model_and_input()
    base = copy.deepcopy(model)
    dk.inject(model, ["conv_in", "down", "proj"], r_max=6, alpha=3.0)
    randomize_adapters(model)
    dk.set_rank(model, 4)
    expected = model(x)
    dk.export_peft(model, tmp_path, rank=4)
    peft_model = peft.PeftModel.from_pretrained(base, tmp_path).double()
    lora = peft_model.base_model.model.down
    assert isinstance(lora, peft.tuners.lora.Conv2d) and lora.lora_B["default"].weight.shape == (8, 4, 1, 1)
    assert rel_err(peft_model(x), expected) <= 1e-12


def test_load_peft_from_a_peft_conv_adapter(tmp_path):
    model, x = model_and_input()
    config = peft.LoraConfig(r=5, lora_alpha=7, target_modules=["conv_in", "down", "proj"])
    peft_model = peft.get_peft_model(copy.deepcopy(model), config)
    randomize_adapters(peft_model)
    expected = peft_model(x)
    peft_model.save_pretrained(tmp_path)
    names = dk.load_peft(model, tmp_path)
    assert names == ["conv_in", "down", "proj"] and isinstance(model.proj, dk.DyLoRAConv2d)
    assert model.down.r_max == 5 and model.down.lora_B.shape == (8, 5)
    assert rel_err(model(x), expected) <= 1e-12  # at rank r: PEFT's own output
    # and a lower rank is the truncated adapter at scale alpha/b
    dk.set_rank(model, 2)
    down = model.down
    y = down(torch.randn(1, 8, 5, 5, dtype=torch.float64))
    assert y.shape == (1, 8, 3, 3)


def test_export_peft_refuses_dilated_convolution(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3, dilation=2))
    dk.inject(model, ["0"], r_max=2, alpha=1.0)
    with pytest.raises(ValueError, match="dilated"):
        dk.export_peft(model, tmp_path, rank=2)
