"""DyLoRALinear: a drop-in nn.Linear; torch.compile; import cost."""
import subprocess
import sys

import pytest
import torch
from torch import nn

import dylora_kernels
from dylora_kernels import DyLoRALinear, reference
from conftest import rel_err


def randomised(layer: DyLoRALinear, seed=0) -> DyLoRALinear:
    """Give lora_B random values: LoRA's zero init would hide the low-rank path."""
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=torch.Generator().manual_seed(seed)))
    return layer


def test_defaults_and_init():
    layer = DyLoRALinear(20, 12, r_max=6, alpha=4.0)
    assert layer.rank == 6 and layer.r_max == 6 and layer.alpha == 4.0 and layer.frozen_prefix
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    assert layer.lora_A.requires_grad and layer.lora_B.requires_grad
    assert layer.lora_A.shape == (6, 20) and layer.lora_B.shape == (12, 6)
    assert torch.count_nonzero(layer.lora_B) == 0
    bound = 1 / 20**0.5  # kaiming_uniform(a=sqrt(5)) on fan_in 20, as nn.Linear and PEFT
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.std() > bound / 4
    x = torch.randn(3, 20)
    torch.testing.assert_close(layer(x), nn.functional.linear(x, layer.weight, layer.bias))  # B = 0
    text = repr(layer)
    for part in ("r_max=6", "alpha=4.0", "rank=6", "mode=frozen_prefix"):
        assert part in text
    layer.set_rank(torch.tensor([1, 2, 3]))
    assert "rank=per-row(3,)" in repr(layer)


def test_from_linear_shares_and_freezes_the_weight():
    linear = nn.Linear(10, 7)
    layer = DyLoRALinear.from_linear(linear, r_max=4, alpha=8, frozen_prefix=False)
    assert layer.weight is linear.weight and layer.bias is linear.bias  # no copy
    assert not linear.weight.requires_grad and not layer.frozen_prefix
    no_bias = DyLoRALinear.from_linear(nn.Linear(10, 7, bias=False), r_max=4, alpha=8)
    assert no_bias.bias is None and no_bias(torch.randn(2, 10)).shape == (2, 7)
    with pytest.raises(TypeError, match="from_linear expects an nn.Linear, got Conv1d"):
        DyLoRALinear.from_linear(nn.Conv1d(2, 2, 1), r_max=4, alpha=8)


@pytest.mark.parametrize("r_max,alpha,error", [(0, 1.0, "r_max must be an int >= 1, got 0"),
                                               (2.0, 1.0, "r_max must be an int >= 1, got 2.0"),
                                               (4, float("nan"), "alpha must be a finite real number")])
def test_bad_construction(r_max, alpha, error):
    with pytest.raises(ValueError, match=error):
        DyLoRALinear(4, 4, r_max=r_max, alpha=alpha)


def test_set_rank_validates_and_keeps_the_buffer():
    layer = DyLoRALinear(8, 8, r_max=5, alpha=1.0)
    buffer = layer._rank
    layer.set_rank(2)
    assert layer.rank == 2 and layer._rank is buffer  # filled in place
    layer.set_rank(torch.tensor(4))
    assert layer.rank == 4
    for bad, error in ((0, ValueError), (6, ValueError), (torch.tensor([1, 7]), ValueError),
                       (torch.tensor(1.0), TypeError), (2.5, TypeError)):
        with pytest.raises(error, match="rank"):
            layer.set_rank(bad)
    assert layer.rank == 4  # unchanged by the refused calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("x_shape", [(9, 24), (2, 5, 24)], ids=["2d", "3d"])
def test_forward_backward_matches_reference(dtype, x_shape):
    layer = randomised(DyLoRALinear(24, 18, r_max=8, alpha=16.0, dtype=dtype))
    layer.set_rank(3)
    x = torch.randn(x_shape, dtype=dtype, requires_grad=True)
    y = layer(x)
    y.float().square().sum().backward()
    ref_params = [t.detach().double().requires_grad_(True) for t in (x, layer.lora_A, layer.lora_B)]
    ref = reference.dylora_linear(ref_params[0], layer.weight.double(), layer.bias.double(), ref_params[1],
                                  ref_params[2], 3, 16.0, frozen_prefix=True)
    ref.square().sum().backward()
    tol = 1e-5 if dtype != torch.bfloat16 else 2e-2
    assert rel_err(y.detach(), ref.detach()) <= tol
    for ours, theirs in zip((x.grad, layer.lora_A.grad, layer.lora_B.grad), ref_params):
        assert rel_err(ours, theirs.grad) <= tol
    assert torch.count_nonzero(layer.lora_A.grad[[0, 1, 3, 4, 5, 6, 7]]) == 0  # frozen prefix: row 2 only


def test_per_sample_rank_on_batch_first_input():
    """A 1-D rank with one entry per sample of a (batch, seq, K) input applies to every token."""
    layer = randomised(DyLoRALinear(16, 10, r_max=4, alpha=2.0))
    x = torch.randn(3, 7, 16)
    layer.set_rank(torch.tensor([1, 4, 2]))
    y = layer(x)
    for i, b in enumerate((1, 4, 2)):
        layer.set_rank(b)
        torch.testing.assert_close(y[i], layer(x[i]))


def test_state_dict_round_trip():
    src = randomised(DyLoRALinear(12, 6, r_max=3, alpha=1.0))
    dst = DyLoRALinear(12, 6, r_max=3, alpha=1.0)
    missing, unexpected = dst.load_state_dict(src.state_dict())
    assert not missing and not unexpected
    assert set(src.state_dict()) == {"weight", "bias", "lora_A", "lora_B"}
    x = torch.randn(4, 12)
    torch.testing.assert_close(dst(x), src(x))


def test_compile_fullgraph_no_recompile_on_rank_change():
    """Forward + backward under torch.compile(fullgraph=True); ranks 1..r_max and a per-row rank
    reuse the compiled graphs (the rank is a tensor read at run time)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    layer = randomised(DyLoRALinear(32, 24, r_max=8, alpha=8.0))
    counter = CompileCounterWithBackend("inductor")
    step = torch.compile(lambda x: layer(x).square().sum(), backend=counter, fullgraph=True)
    x = torch.randn(10, 32)
    for b in range(1, 9):
        layer.set_rank(b)
        layer.lora_A.grad = layer.lora_B.grad = None
        step(x).backward()
        ref = dylora_kernels.dylora_linear(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, b, 8.0,
                                           frozen_prefix=True, backend="reference")
        grads = torch.autograd.grad(ref.square().sum(), [layer.lora_A, layer.lora_B])
        assert rel_err(layer.lora_A.grad, grads[0]) <= 1e-5 and rel_err(layer.lora_B.grad, grads[1]) <= 1e-5
    assert counter.frame_count == 1
    layer.set_rank(torch.randint(1, 9, (10,)))  # a per-row rank is a new input shape: one more graph
    step(x).backward()
    layer.set_rank(torch.randint(1, 9, (10,)))
    step(x).backward()
    assert counter.frame_count == 2


def test_import_is_cheap_and_compiles_nothing():
    code = ("import time, sys, torch; t = time.perf_counter(); import dylora_kernels; "
            "print(time.perf_counter() - t, 'triton' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert float(out[0]) < 0.5 and out[1] == "False"  # on top of torch's own import


def test_set_rank_never_writes_into_the_callers_tensor():
    layer = DyLoRALinear(8, 8, r_max=4, alpha=1.0)
    mine = torch.tensor(3)
    layer.set_rank(mine)
    saved = layer.rank_tensor
    layer.set_rank(2)
    assert int(mine) == 3 and int(saved) == 3
    layer.set_rank(saved)
    assert layer.rank == 3


def test_rank_may_change_between_forward_and_backward():
    """The autograd node keeps its own copy of the rank: the backward uses the forward's rank."""
    layer = randomised(DyLoRALinear(12, 9, r_max=6, alpha=3.0))
    x = torch.randn(5, 12)
    layer.set_rank(2)
    layer(x).sum().backward()
    expected = layer.lora_A.grad.clone()
    layer.lora_A.grad = None
    y = layer(x)
    layer.set_rank(5)
    y.sum().backward()
    assert torch.equal(layer.lora_A.grad, expected)


def test_alpha_and_r_max_accept_what_wrappers_hold():
    import numpy as np

    assert DyLoRALinear(4, 4, r_max=2, alpha=np.float32(2.0)).alpha == 2.0
    assert DyLoRALinear(4, 4, r_max=2, alpha=torch.tensor(2.0)).alpha == 2.0  # a CPU tensor (LyCORIS's buffer)
    assert DyLoRALinear(4, 4, r_max=np.int64(3), alpha=1.0).r_max == 3
    with pytest.raises(TypeError, match="alpha is a tensor on meta: reading it would synchronise"):
        DyLoRALinear(4, 4, r_max=2, alpha=torch.tensor(2.0, device="meta"))
    with pytest.raises(TypeError, match="frozen_prefix must be a bool, got str"):
        DyLoRALinear(4, 4, r_max=2, alpha=1.0, frozen_prefix="no")


def test_rank_buffer_keeps_one_dtype():
    """A narrow rank dtype never becomes the buffer's: set_rank(uint8) then set_rank(300) works."""
    layer = DyLoRALinear(4, 4, r_max=300, alpha=1.0)
    layer.set_rank(torch.tensor(5, dtype=torch.uint8))
    assert layer._rank.dtype == torch.int64 and layer.rank == 5
    layer.set_rank(300)
    assert layer.rank == 300
    layer.set_rank(torch.tensor([7, 250], dtype=torch.uint8))
    assert layer._rank.dtype == torch.int64 and layer.rank.tolist() == [7, 250]


@pytest.mark.parametrize("shape", [(0, 3, 5), (2, 0, 5), (4, 0)], ids=["empty-batch", "empty-seq", "K=0"])
def test_empty_inputs(shape):
    """An empty batch with a per-sample rank, an empty sequence, and K = 0 (y = bias) all work."""
    K = shape[-1]
    layer = randomised(DyLoRALinear(K, 6, r_max=4, alpha=2.0))
    if shape[0] == 0:
        layer.set_rank(torch.zeros(0, dtype=torch.long))
    elif len(shape) == 3:
        layer.set_rank(torch.tensor([1, 3]))
    x = torch.randn(shape, requires_grad=True)
    y = layer(x)
    assert y.shape == (*shape[:-1], 6)
    expected = layer.bias.expand(*shape[:-1], 6) if K == 0 else nn.functional.linear(x, layer.weight, layer.bias)
    torch.testing.assert_close(y, expected)
    y.sum().backward()
    assert x.grad.shape == x.shape
