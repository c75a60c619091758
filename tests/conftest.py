"""Shared test setup: which backends run here, on which device and dtypes, and with what tolerance.

Without CUDA, the Triton kernels run on CPU tensors in Triton's interpreter (TRITON_INTERPRET=1 must
be set before triton is imported, hence here). The interpreter's tl.dot is wrong for bfloat16, so
bfloat16 Triton runs only on a GPU.
"""
import importlib.util
import os

if importlib.util.find_spec("torch") is not None:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
from torch import nn

import dylora_kernels

CUDA = torch.cuda.is_available()
HAS_TRITON = (importlib.util.find_spec("triton") is not None
              and importlib.util.find_spec("dylora_kernels.triton") is not None
              and (CUDA or os.environ.get("TRITON_INTERPRET") == "1"))
HAS_EXTENSION = dylora_kernels.ops._C is not None
if not HAS_EXTENSION and os.environ.get("DYLORA_ALLOW_NO_EXTENSION") != "1":
    # A failed build must fail the suite, not skip the C++ tests (bench/gpu_check.sh sets this variable
    # when it goes on without the extension on purpose).
    raise RuntimeError(f"the C++ extension dylora_kernels._C did not import ({dylora_kernels.ops._C_ERROR}); "
                       "build it with `pip install --no-build-isolation -e .`")

# backend -> (device, dtypes). The interpreter is slow: Triton tests on CPU use small shapes.
BACKENDS = {}
if HAS_EXTENSION:
    BACKENDS["cpp"] = ("cpu", (torch.float32, torch.float64, torch.bfloat16))
if HAS_EXTENSION and CUDA:  # the same ATen composition on cuBLAS, with the rank read on the device
    BACKENDS["cublas"] = ("cuda", (torch.float32, torch.float64, torch.bfloat16, torch.float16))
if HAS_TRITON:
    BACKENDS["triton"] = (("cuda", (torch.float32, torch.float16, torch.bfloat16)) if CUDA
                          else ("cpu", (torch.float32, torch.float16)))
if CUDA and (HAS_TRITON or HAS_EXTENSION):  # whatever the dispatcher measures fastest, per shape
    BACKENDS["auto"] = ("cuda", (torch.float32, torch.float16, torch.bfloat16))


def tolerance(backend: str, dtype: torch.dtype) -> float:
    """Relative error ‖out − ref‖ / ‖ref‖ allowed against the float64 reference (DESIGN §3)."""
    if dtype == torch.float64:
        return 1e-12
    if dtype == torch.float32:
        return 2e-3 if (backend in ("triton", "auto") and CUDA) else 1e-5  # tf32 dots in Triton on the GPU
    return 1e-2


def backend_dtype_params():
    return [pytest.param(b, d, id=f"{b}-{str(d).removeprefix('torch.')}")
            for b, (_, dtypes) in BACKENDS.items() for d in dtypes]


def device_of(backend: str) -> str:
    return BACKENDS[backend][0]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double()
    scale = ref.abs().max().clamp_min(1e-300) if ref.numel() else 1.0  # norms of values near 1e300 overflow
    return float(((out.double() - ref) / scale).norm() / (ref / scale).norm().clamp_min(1e-300))


@pytest.fixture
def poisoned_allocations(monkeypatch):
    """Every tensor the Python launchers allocate with torch.empty* starts as NaN, so an element a
    kernel forgets to write fails the comparison instead of passing by luck (ATen-allocated outputs
    of the C++ kernels are always fully written by the ATen call that creates them)."""
    def poison(fn):
        def wrapped(*args, **kwargs):
            t = fn(*args, **kwargs)
            if t.is_floating_point():
                t.fill_(float("nan"))
            return t
        return wrapped

    monkeypatch.setattr(torch, "empty", poison(torch.empty))
    monkeypatch.setattr(torch, "empty_like", poison(torch.empty_like))
    monkeypatch.setattr(torch.Tensor, "new_empty", poison(torch.Tensor.new_empty))


# --------------------------------------------------------------------------------------------
# Inputs, runs and the float64 reference shared by the op tests of every backend
# --------------------------------------------------------------------------------------------
LAYOUTS = ("contiguous", "strided", "row-strided", "column-padded", "transposed")


def with_layout(t, layout, step=2):
    """t's values (same dtype and device) in a memory layout, as a view of a larger buffer whose other elements are
    NaN, so a kernel that reads memory the view skips fails: "contiguous" (t itself), "strided" (every ``step``-th
    column), "row-strided" (every ``step``-th row), "column-padded" (rows padded by 3 elements), "transposed"
    (column-major; 2-D). Applied after any dtype cast: ``.to(dtype)`` of a strided view returns a contiguous copy."""
    if layout == "contiguous":
        return t
    *lead, K = t.shape
    if layout == "transposed":
        assert t.dim() == 2, "the transposed layout is 2-D"
        out = t.new_full((K, lead[0]), float("nan")).t()
    elif layout == "strided":
        out = t.new_full((*lead, step * K), float("nan"))[..., ::step]
    elif layout == "row-strided":
        assert t.dim() >= 2, "the row-strided layout needs rows"
        out = t.new_full((*lead[:-1], step * lead[-1], K), float("nan"))[..., ::step, :]
    elif layout == "column-padded":
        out = t.new_full((*lead, K + 3), float("nan"))[..., :K]
    else:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    out.copy_(t)
    rows = t.numel() // K if K else 0
    # Non-contiguous whenever the shape allows it (one row, or one element, is contiguous in any layout).
    can_be_strided = t.numel() > 1 and (layout == "strided" or (rows > 1 and (layout != "transposed" or K > 1)))
    assert out.is_contiguous() != can_be_strided, (layout, tuple(t.shape), out.stride())
    return out


def make_inputs(x_shape, N, r_max, bias, layout, dtype, device, seed=0):
    """Random x, W, bias, A and B (B is never LoRA's zeros: that would hide the low-rank path); x in ``layout``
    (LAYOUTS), made in the final dtype and device."""
    g = torch.Generator().manual_seed(seed)
    K = x_shape[-1]
    rnd = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)
    tensors = dict(x=rnd(*x_shape), weight=rnd(N, K) / K**0.5, bias=rnd(N) if bias else None,
                   lora_A=rnd(r_max, K) / K**0.5, lora_B=rnd(N, r_max))
    out = {k: None if v is None else v.to(device, dtype) for k, v in tensors.items()}
    out["x"] = with_layout(out["x"], layout)
    return out


def per_row_ranks(rows, r_max, seed=0, sorted_=False):
    """Mixed per-row ranks with both ends present (sorted: each block of rows has its own largest rank)."""
    ranks = torch.randint(1, r_max + 1, (rows,), generator=torch.Generator().manual_seed(seed))
    ranks[0], ranks[-1] = 1, r_max
    return ranks.sort().values if sorted_ else ranks


def pick_rank(kind, r_max, rows, device, seed=0):
    if kind == "1":
        return 1
    if kind == "r_max":
        return r_max
    if kind == "mid":
        return torch.tensor((r_max + 1) // 2, device=device)  # a 0-d tensor
    return per_row_ranks(rows, r_max, seed).to(device)


LORA_LEAVES = ("x", "lora_A", "lora_B")


def run(inputs, rank, alpha, frozen_prefix, backend, grad_out, wrt=LORA_LEAVES):
    """y and the gradients of the inputs named in ``wrt`` (in that order), for one backend."""
    leaves = {k: v.detach().clone().requires_grad_(k in wrt) for k, v in inputs.items() if v is not None}
    if not inputs["x"].is_contiguous():  # keep the caller's layout (clone() would pack a row-strided view)
        leaves["x"] = inputs["x"].detach().requires_grad_("x" in wrt)
    y = dylora_kernels.dylora_linear(leaves["x"], leaves["weight"], leaves.get("bias"), leaves["lora_A"],
                                     leaves["lora_B"], rank, alpha, frozen_prefix=frozen_prefix, backend=backend)
    y.backward(grad_out.to(y.dtype))
    return (y.detach(), *(leaves[k].grad for k in wrt))


def reference_run(inputs, rank, alpha, frozen_prefix, grad_out, wrt=LORA_LEAVES):
    cpu64 = {k: None if v is None else v.detach().cpu().double() for k, v in inputs.items()}
    rank = rank.cpu() if isinstance(rank, torch.Tensor) else rank
    return run(cpu64, rank, alpha, frozen_prefix, "reference", grad_out.double().cpu(), wrt)


def trained_slots(rank, r_max, rows, frozen_prefix):
    """Boolean (r_max,): the slots of dA rows / dB columns that may be non-zero."""
    b = torch.as_tensor(rank).cpu().reshape(-1).expand(rows)
    slots = torch.arange(r_max)
    if frozen_prefix:
        return (slots[None, :] == b[:, None] - 1).any(0)
    return (slots[None, :] < b[:, None]).any(0)


# --------------------------------------------------------------------------------------------
# Tiny models shared by the model-level tests and the distributed workers
# --------------------------------------------------------------------------------------------
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            vocab_size=100, max_position_embeddings=64)  # a transformers config small enough for CPU tests


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 20), nn.ReLU(), nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 5))


def randomise(model: nn.Module, seed=0) -> nn.Module:
    """Random lora_B everywhere (LoRA's zero init would hide the low-rank path)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, dylora_kernels.DyLoRALinear):
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.3)
    return model
