"""What wrappers need: adapters in another dtype than the base (mixed precision), torch.autocast, and
the delta-only op (with and without a given base output), on every backend this machine runs."""
import pytest
import torch
import torch.nn.functional as F

import dylora_kernels
from conftest import BACKENDS, device_of, make_inputs, per_row_ranks, reference_run, rel_err, tolerance

ALPHA = 4.0


def mixed_params():
    """(backend, x dtype, adapter dtype): a low-precision base with float32 adapters (PEFT's default) and
    the reverse, for every backend's dtypes."""
    params = []
    for backend, (_, dtypes) in BACKENDS.items():
        half = [d for d in dtypes if d in (torch.bfloat16, torch.float16)]
        for low in half:
            for x_dtype, a_dtype in ((low, torch.float32), (torch.float32, low)):
                name = lambda d: str(d).removeprefix("torch.")
                params.append(pytest.param(backend, x_dtype, a_dtype, id=f"{backend}-x{name(x_dtype)}-A{name(a_dtype)}"))
    return params


@pytest.mark.usefixtures("poisoned_allocations")
@pytest.mark.parametrize("backend,x_dtype,a_dtype", mixed_params())
@pytest.mark.parametrize("rank_kind", ["0-d", "per-row"])
@pytest.mark.parametrize("frozen_prefix", [False, True], ids=["full", "frozen"])
def test_mixed_precision(backend, x_dtype, a_dtype, rank_kind, frozen_prefix):
    """y and dx in x's dtype, dA and dB in the adapters' dtype, all against float64."""
    device = device_of(backend)
    M, K, N, r_max = 19, 24, 17, 6
    inputs = make_inputs((M, K), N, r_max, True, "contiguous", torch.float64, device)
    inputs = {k: None if v is None else v.to(a_dtype if k.startswith("lora") else x_dtype) for k, v in inputs.items()}
    rank = torch.tensor(4, device=device) if rank_kind == "0-d" else per_row_ranks(M, r_max).to(device)
    grad = torch.randn(M, N, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items() if k in ("x", "lora_A", "lora_B")}
    y = dylora_kernels.dylora_linear(leaves["x"], inputs["weight"], inputs["bias"], leaves["lora_A"], leaves["lora_B"],
                                     rank, ALPHA, frozen_prefix=frozen_prefix, backend=backend)
    y.backward(grad.to(device, x_dtype))
    ours = (y.detach(), leaves["x"].grad, leaves["lora_A"].grad, leaves["lora_B"].grad)
    assert [t.dtype for t in ours] == [x_dtype, x_dtype, a_dtype, a_dtype]
    expected = reference_run(inputs, rank, ALPHA, frozen_prefix, grad)
    tol = tolerance(backend, min(x_dtype, a_dtype, key=lambda d: torch.finfo(d).bits))
    for name, out, ref in zip(("y", "dx", "dA", "dB"), ours, expected):
        assert rel_err(out.cpu(), ref) <= tol, f"{name}: {rel_err(out.cpu(), ref):.2e}"


def peer(x, W, bias, A, B, b, alpha):
    """The plain-PyTorch peer: F.linear and the low-rank term through two matmuls."""
    return F.linear(x, W, bias) + (alpha / b) * ((x @ A[:b].t()) @ B[:, :b].t())


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_autocast_behaves_like_the_peer(backend):
    """Under torch.autocast (bfloat16 on CPU, float16 on CUDA) every floating input is cast to the
    autocast dtype, like F.linear: y comes out in that dtype and matches the peer under the same
    autocast; gradients reach the float32 parameters in float32."""
    device = device_of(backend)
    dtype = torch.float16 if device == "cuda" else torch.bfloat16
    if dtype not in BACKENDS[backend][1]:
        pytest.skip(f"{backend} has no {dtype}")
    inputs = make_inputs((2, 9, 32), 24, 8, True, "contiguous", torch.float32, device)
    x, W, bias, A, B = (inputs[k] for k in ("x", "weight", "bias", "lora_A", "lora_B"))
    A.requires_grad_(True)
    B.requires_grad_(True)
    with torch.autocast(device_type=device, dtype=dtype):
        ours = dylora_kernels.dylora_linear(x, W, bias, A, B, 5, ALPHA, backend=backend)
        theirs = peer(x, W, bias, A, B, 5, ALPHA)
        mixed = dylora_kernels.dylora_linear(x.to(dtype), W, bias, A, B, 5, ALPHA, backend=backend)
    assert ours.dtype == theirs.dtype == mixed.dtype == dtype
    assert rel_err(ours.float(), theirs.float()) <= 1e-2 and torch.equal(ours, mixed)
    ours.float().square().sum().backward()
    assert A.grad.dtype == torch.float32 and B.grad.dtype == torch.float32 and B.grad.abs().sum() > 0


def delta_reference(x, A, B, rank, alpha, frozen_prefix, base):
    return dylora_kernels.reference.dylora_linear(x, None, None, A, B, rank, alpha, frozen_prefix, base=base)


@pytest.mark.usefixtures("poisoned_allocations")
@pytest.mark.parametrize("backend,dtype", [pytest.param(b, d, id=f"{b}-{str(d).removeprefix('torch.')}")
                                           for b, (_, ds) in BACKENDS.items() for d in ds])
@pytest.mark.parametrize("rank_kind", ["int", "0-d", "per-row"])
@pytest.mark.parametrize("with_base", [False, True], ids=["no-base", "base"])
@pytest.mark.parametrize("frozen_prefix", [False, True], ids=["full", "frozen"])
def test_delta(backend, dtype, rank_kind, with_base, frozen_prefix):
    """dylora_delta = (alpha/b)·(x·A[:b]ᵀ)·B[:, :b]ᵀ (+ base): values and the gradients of x, A, B and
    base against float64; base's gradient is the output gradient unchanged."""
    device = device_of(backend)
    M, K, N, r_max = 2 * 11, 20, 13, 7
    inputs = make_inputs((2, 11, K), N, r_max, False, "contiguous", dtype, device)
    rank = {"int": 3, "0-d": torch.tensor(5, device=device), "per-row": per_row_ranks(M, r_max).to(device)}[rank_kind]
    base = torch.randn(2, 11, N, generator=torch.Generator().manual_seed(7)).to(device, dtype) if with_base else None
    grad = torch.randn(2, 11, N, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    names = ("x", "lora_A", "lora_B") + (("base",) if with_base else ())
    tensors = {"x": inputs["x"], "lora_A": inputs["lora_A"], "lora_B": inputs["lora_B"], "base": base}

    def run(tensors, backend, grad):
        leaves = {k: tensors[k].detach().clone().requires_grad_(True) for k in names}
        out = dylora_kernels.dylora_delta(leaves["x"], leaves["lora_A"], leaves["lora_B"], rank_for(backend), ALPHA,
                                          frozen_prefix=frozen_prefix, base=leaves.get("base"), backend=backend)
        out.backward(grad)
        return out.detach(), [leaves[k].grad for k in names]

    rank_for = lambda b: rank.cpu() if (b == "reference" and isinstance(rank, torch.Tensor)) else rank
    y, grads = run(tensors, backend, grad.to(device, dtype))
    ref_y, ref_grads = run({k: None if v is None else v.cpu().double() for k, v in tensors.items()}, "reference", grad)
    tol = tolerance(backend, dtype)
    assert y.dtype == dtype and rel_err(y.cpu(), ref_y) <= tol
    for name, ours, ref in zip(names, grads, ref_grads):
        assert rel_err(ours.cpu(), ref) <= tol, name
    if with_base:
        assert torch.equal(grads[-1].cpu(), grad.to(dtype))


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_delta_on_a_base_equals_the_linear(backend):
    """dylora_delta(x, A, B, base=F.linear(x, W, bias)) is dylora_linear(x, W, bias, A, B) within rounding."""
    device = device_of(backend)
    t = make_inputs((31, 40), 28, 8, True, "contiguous", torch.float32, device)
    base = F.linear(t["x"], t["weight"], t["bias"])
    via_delta = dylora_kernels.dylora_delta(t["x"], t["lora_A"], t["lora_B"], 6, ALPHA, base=base, backend=backend)
    direct = dylora_kernels.dylora_linear(t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], 6, ALPHA,
                                          backend=backend)
    assert rel_err(via_delta, direct) <= tolerance(backend, torch.float32)
