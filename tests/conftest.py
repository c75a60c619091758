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

CUDA = torch.cuda.is_available()
HAS_TRITON = (importlib.util.find_spec("triton") is not None
              and importlib.util.find_spec("dylora_kernels.triton") is not None
              and (CUDA or os.environ.get("TRITON_INTERPRET") == "1"))

# backend -> (device, dtypes). The interpreter is slow: Triton tests on CPU use small shapes.
BACKENDS = {"cpp": ("cpu", (torch.float32, torch.float64, torch.bfloat16))}
if HAS_TRITON:
    BACKENDS["triton"] = (("cuda", (torch.float32, torch.float16, torch.bfloat16)) if CUDA
                          else ("cpu", (torch.float32, torch.float16)))


def tolerance(backend: str, dtype: torch.dtype) -> float:
    """Relative error ‖out − ref‖ / ‖ref‖ allowed against the float64 reference (DESIGN §3)."""
    if dtype == torch.float64:
        return 1e-12
    if dtype == torch.float32:
        return 2e-3 if (backend == "triton" and CUDA) else 1e-5  # tf32 dots on the GPU
    return 1e-2


def backend_dtype_params():
    return [pytest.param(b, d, id=f"{b}-{str(d).removeprefix('torch.')}")
            for b, (_, dtypes) in BACKENDS.items() for d in dtypes]


def device_of(backend: str) -> str:
    return BACKENDS[backend][0]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double()
    return float((out.double() - ref).norm() / ref.norm().clamp_min(1e-300))


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
