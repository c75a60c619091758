"""The ``dylora`` ops: registration, validation, autograd and backend dispatch, written once.

    dylora_linear(...)            validates once, normalises the rank to an integer tensor
      -> torch.ops.dylora.forward  y and the fp32 low-rank intermediate u
      -> torch.ops.dylora.backward dx, dA, dB (the autograd registration below calls it)

Each op forwards to a kernel module: ``_C`` (the C++ extension, CPU tensors) or ``triton``
(CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``). Both modules expose
``forward(x, weight, bias, lora_A, lora_B, rank, alpha) -> (y, u)`` and
``backward(grad, x, weight, lora_A, lora_B, u, rank, alpha, frozen_prefix, compute_dx) -> (dx, dA, dB)``
with the contract below, and neither re-validates its inputs.

Kernel contract (x and grad are 2-D: (M, K) and (M, N)):
- ``rank`` is an integer tensor on x's device: 0-d (one rank for every row) or (M,) (one per row).
- ``u`` is (M, r_max) float32 (float64 for float64 inputs): x · A[:b_m]ᵀ in slots < b_m, exactly
  zero beyond.
- ``dA`` (r_max, K) and ``dB`` (N, r_max) in the adapter dtype, exactly zero outside the trained
  slots: slots < b_m in full mode, slot b_m - 1 only in frozen-prefix mode.
- ``dx`` is (M, K) in x's dtype, or an empty tensor when ``compute_dx`` is False.
The backend choice travels in the op's arguments so that the backward runs the forward's backend.
"""
from __future__ import annotations

import importlib
import math
import numbers
import os
from typing import Optional

import torch
from torch import Tensor

from . import reference

BACKENDS = ("auto", "cpp", "triton", "reference")
# The dtypes each kernel backend computes in. tl.dot has no float64; the C++ path has no float16 GEMM worth using.
DTYPES = {
    "cpp": (torch.float32, torch.float64, torch.bfloat16),
    "triton": (torch.float32, torch.float16, torch.bfloat16),
    "reference": (torch.float32, torch.float64, torch.bfloat16, torch.float16),
}
_KERNEL_MODULES = {"cpp": "dylora_kernels._C", "triton": "dylora_kernels.triton"}


def _kernels(backend: str):
    try:
        return importlib.import_module(_KERNEL_MODULES[backend])
    except ImportError as e:
        hint = ("the C++ extension is not built: run `pip install --no-build-isolation -e .`"
                if backend == "cpp" else "install triton")
        raise RuntimeError(f"backend={backend!r} is unavailable ({e}); {hint}") from e


def intermediate_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the rank-b intermediates u and v: float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------------
# Ops
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("dylora::forward", mutates_args=())
def forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
            rank: Tensor, alpha: float, frozen_prefix: bool, backend: str) -> tuple[Tensor, Tensor]:
    """y = x·Wᵀ + bias + (alpha/b)·u·B[:, :b]ᵀ and u (fp32). ``frozen_prefix`` only steers the backward."""
    if backend == "triton":  # the Triton contract: + base (none here), need_u, variant (default)
        return _kernels(backend).forward(x, weight, bias, None, lora_A, lora_B, rank, alpha, True)
    return _kernels(backend).forward(x, weight, bias, lora_A, lora_B, rank, alpha)


@forward.register_fake
def _(x, weight, bias, lora_A, lora_B, rank, alpha, frozen_prefix, backend):
    M, N, r_max = x.shape[0], weight.shape[0], lora_A.shape[0]
    return x.new_empty(M, N), x.new_empty(M, r_max, dtype=intermediate_dtype(x.dtype))


@torch.library.custom_op("dylora::backward", mutates_args=())
def backward(grad: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, u: Tensor,
             rank: Tensor, alpha: float, frozen_prefix: bool, compute_dx: bool,
             backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """dx (empty unless ``compute_dx``), dA and dB for the rank(s) in ``rank``."""
    if backend == "triton":  # the Triton contract: + compute_lora, variant (default)
        return _kernels(backend).backward(grad, x, weight, lora_A, lora_B, u, rank, alpha,
                                          frozen_prefix, compute_dx, True)
    return _kernels(backend).backward(grad, x, weight, lora_A, lora_B, u, rank, alpha,
                                      frozen_prefix, compute_dx)


@backward.register_fake
def _(grad, x, weight, lora_A, lora_B, u, rank, alpha, frozen_prefix, compute_dx, backend):
    dx = x.new_empty(x.shape) if compute_dx else x.new_empty(0)
    return dx, lora_A.new_empty(lora_A.shape), lora_B.new_empty(lora_B.shape)


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, rank, alpha, frozen_prefix, backend = inputs
    # The rank is cloned (a few integers) so that setting a new rank before backward() is harmless.
    ctx.save_for_backward(x, weight, lora_A, lora_B, output[1], rank.clone())
    ctx.mark_non_differentiable(output[1])  # u is saved for the backward, not a result
    ctx.alpha, ctx.frozen_prefix, ctx.backend = alpha, frozen_prefix, backend


def _backward(ctx, grad_y, _grad_u):
    x, weight, lora_A, lora_B, u, rank = ctx.saved_tensors
    need_x, need_w, need_bias, need_A, need_B = ctx.needs_input_grad[:5]
    grad_y = grad_y.contiguous()
    dx = dA = dB = dW = dbias = None
    if need_x or need_A or need_B:
        dx, dA, dB = backward(grad_y, x, weight, lora_A, lora_B, u, rank, ctx.alpha,
                              ctx.frozen_prefix, need_x, ctx.backend)
    # The base layer is normally frozen; when it is not, its gradients are plain GEMMs.
    if need_w:
        dW = grad_y.t() @ x
    if need_bias:
        dbias = grad_y.sum(0)
    return (dx if need_x else None, dW, dbias, dA if need_A else None, dB if need_B else None,
            None, None, None, None)


forward.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# Public entry point: validation happens here and nowhere below.
# --------------------------------------------------------------------------------------------
def dylora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
                  rank: int | Tensor, alpha: float, *, frozen_prefix: bool = False,
                  backend: str = "auto") -> Tensor:
    """``y = x·Wᵀ + bias + (alpha/b)·(x·A[:b]ᵀ)·B[:, :b]ᵀ`` with a rank b chosen at run time.

    Args:
        x: (..., K) input.
        weight: (N, K) frozen base weight; bias: (N,) or None.
        lora_A: (r_max, K); lora_B: (N, r_max).
        rank: an int in [1, r_max], a 0-d integer tensor, or a 1-D integer tensor with one rank
            per row of ``x.reshape(-1, K)``.
        alpha: the LoRA alpha; the low-rank term is scaled by alpha / b.
        frozen_prefix: in the backward, train only row b-1 of A and column b-1 of B (DyLoRA's
            frozen mode) instead of all rows/columns < b.
        backend: "auto" (C++ on CPU, Triton on CUDA), "cpp", "triton" or "reference".
    Returns:
        (..., N) tensor in x's dtype.
    """
    _check_tensors(x, weight, bias, lora_A, lora_B)
    backend = _resolve_backend(backend, x)
    rows = math.prod(x.shape[:-1])
    rank = check_rank(rank, lora_A.shape[0], x.device, rows=rows)
    alpha = check_alpha(alpha)
    if backend == "reference":
        return reference.dylora_linear(x, weight, bias, lora_A, lora_B, rank, alpha, frozen_prefix)
    y, _ = forward(x.reshape(rows, x.shape[-1]), weight, bias, lora_A, lora_B, rank, alpha,
                   bool(frozen_prefix), backend)
    return y.view(*x.shape[:-1], weight.shape[0])


def _resolve_backend(backend: str, x: Tensor) -> str:
    """The concrete backend for x's device and dtype ("auto" resolved), or a clear error."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    device = x.device.type
    if backend == "auto":
        if device == "cpu":
            return "cpp"
        if device == "cuda":
            return "triton"
        raise ValueError(f"backend='auto' has no kernel for {device} tensors; "
                         "use backend='reference' (plain PyTorch) on this device")
    if backend == "cpp" and device != "cpu":
        raise ValueError(f"backend='cpp' runs on CPU tensors only, got x on {x.device}")
    if backend == "triton" and device != "cuda" and not (device == "cpu" and _triton_interpreter()):
        raise ValueError(f"backend='triton' needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), "
                         f"got x on {x.device}")
    if x.dtype not in DTYPES[backend]:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in DTYPES[backend])
        raise TypeError(f"backend={backend!r} supports dtypes {allowed}; got {x.dtype}")
    return backend


def _triton_interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _check_tensors(x, weight, bias, lora_A, lora_B) -> None:
    named = {"x": x, "weight": weight, "lora_A": lora_A, "lora_B": lora_B}
    if bias is not None:
        named["bias"] = bias
    for name, t in named.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (N, K), got shape {tuple(weight.shape)}")
    N, K = weight.shape
    if x.dim() < 1 or x.shape[-1] != K:
        raise ValueError(f"x must have shape (..., K) with K = weight.shape[1] = {K}, got {tuple(x.shape)}")
    if lora_A.dim() != 2 or lora_A.shape[1] != K:
        raise ValueError(f"lora_A must have shape (r_max, K) with K = {K}, got {tuple(lora_A.shape)}")
    r_max = lora_A.shape[0]
    if r_max == 0:
        raise ValueError("lora_A has r_max = 0 rows: DyLoRA needs r_max >= 1")
    if lora_B.shape != (N, r_max):
        raise ValueError(f"lora_B must have shape (N, r_max) = ({N}, {r_max}), got {tuple(lora_B.shape)}")
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"bias must have shape (N,) = ({N},) or be None, got {tuple(bias.shape)}")
    dtypes = {name: t.dtype for name, t in named.items()}
    if len(set(dtypes.values())) != 1:
        raise TypeError(f"x, weight, bias, lora_A and lora_B must share one dtype, got {dtypes}")
    devices = {name: t.device for name, t in named.items()}
    if len(set(devices.values())) != 1:
        raise ValueError(f"x, weight, bias, lora_A and lora_B must be on one device, got {devices}")


def check_rank(rank, r_max: int, device: torch.device, rows: int | None = None) -> Tensor:
    """Return the rank as an integer tensor on ``device`` (0-d or 1-D), after checking it.

    A 1-D tensor must have ``rows`` entries (unchecked when ``rows`` is None). Values are checked on
    the host for CPU tensors and with ``torch._assert_async`` on accelerators (no host sync).
    """
    if isinstance(rank, bool) or not isinstance(rank, (int, Tensor)):
        raise TypeError(f"rank must be an int or an integer tensor, got {type(rank).__name__}")
    if isinstance(rank, int):
        if not 1 <= rank <= r_max:
            raise ValueError(f"rank must be in [1, r_max] = [1, {r_max}], got {rank}")
        return torch.full((), rank, dtype=torch.int64, device=device)
    if rank.dtype.is_floating_point or rank.dtype.is_complex or rank.dtype == torch.bool:
        raise TypeError(f"rank tensor must have an integer dtype, got {rank.dtype}")
    if rank.dim() > 1 or (rank.dim() == 1 and rows is not None and rank.shape[0] != rows):
        expected = "" if rows is None else f" ({rows} rows)"
        raise ValueError(f"rank tensor must be 0-d or 1-D with one rank per row of x.reshape(-1, K)"
                         f"{expected}, got shape {tuple(rank.shape)}")
    if rank.device != device:
        if rank.device.type != "cpu" or rank.dim() != 0:
            raise ValueError(f"rank tensor must be on x's device {device}, got {rank.device}")
        rank = rank.to(device, non_blocking=True)  # a 0-d CPU rank is a host scalar
    in_range = (rank >= 1) & (rank <= r_max)
    if rank.device.type == "cpu" and not torch.compiler.is_compiling():
        if rank.numel() and not bool(in_range.all()):
            raise ValueError(f"rank values must be in [1, r_max] = [1, {r_max}], got "
                             f"min {int(rank.min())}, max {int(rank.max())}")
    else:  # no host sync on an accelerator, no graph break under torch.compile
        torch._assert_async(in_range.all(), f"dylora: rank values must be in [1, r_max] = [1, {r_max}]")
    return rank


def check_alpha(alpha) -> float:
    """alpha as a float: a finite real scalar (Python or NumPy), not a tensor (reading one would sync)."""
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not math.isfinite(alpha):
        raise ValueError(f"alpha must be a finite number (a Python or NumPy scalar), got {alpha!r}")
    return float(alpha)
