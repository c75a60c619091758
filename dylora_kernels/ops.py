"""The public functions, their validation (written once) and the Python side of the ``dylora`` ops.

    dylora_linear(x, W, bias, A, B, rank, alpha)       y = x·Wᵀ + bias + (α/b)·(x·A[:b]ᵀ)·B[:, :b]ᵀ
    dylora_delta(x, A, B, rank, alpha, base=None)      [base +] (α/b)·(x·A[:b]ᵀ)·B[:, :b]ᵀ
      validate (here, once) → torch.ops.dylora.linear (csrc/dylora.cpp: reshape, autograd, autocast)
        → torch.ops.dylora.forward / backward, dispatched on the device:
             CPU   the C++ kernels (csrc/dylora.cpp)
             CUDA  backends.py: the Triton kernels or the ATen composition on cuBLAS, chosen per
                   shape by measurement (CPU tensors with a Triton backend go there too: Triton's
                   interpreter, how CI tests the kernels)

The schemas, the CPU kernels, the autograd and the autocast kernels are C++ (csrc/dylora.cpp); this
module adds the fake implementations (torch.compile), the CUDA kernels and the checks. Without the
C++ extension (a failed build) the forward/backward ops are defined here instead, with a Python
autograd: CUDA (Triton) and the reference still work, per call slower, without autocast support.

Kernel contract (x and grad 2-D: (M, K) and (M, N); weight, bias, base optional):
- ``rank`` is an integer tensor, 0-d (one rank for every row) or (M,) (one per row), on x's device
  (read there without a host sync: rows out of [1, r_max] come out NaN), or a 0-d CPU tensor (a host
  value: read and checked on the host).
- ``u`` is (M, r_max), float32 (float64 when x or the adapters are): x·A[:b_m]ᵀ in slots < b_m,
  exactly zero beyond; empty when ``need_u`` is False (no autograd).
- ``dropout_p`` in [0, 1), ``dropout_seed`` (a 0-d int64 tensor on x's device; None when p = 0): adapter dropout,
  the low-rank term sees dropout(x) = x ⊙ keep / (1 − p) with the mask of ``reference.dropout_keep`` regenerated
  from the seed (never stored). Then u = (x ⊙ keep)·A[:b_m]ᵀ and every kernel folds 1/(1 − p) into alpha; the
  backward gets the forward's p and seed.
- ``dA`` (r_max, K) and ``dB`` (N, r_max) in the adapters' dtype, exactly zero outside the trained
  slots (slots < b_m; slot b_m − 1 only in frozen-prefix mode); y and dx in x's dtype. Outputs that
  are not asked for (``compute_dx`` / ``compute_lora`` False) are empty tensors.
"""
from __future__ import annotations

import math
import numbers

import numpy as np
import torch
from torch import Tensor

from . import backends, reference

try:
    from . import _C  # registers the dylora ops: schemas, CPU kernels, autograd, autocast
except ImportError as error:  # the extension did not build: see _define_ops_without_extension
    _C, _C_ERROR = None, error

BACKENDS = ("auto", "cpp", "cublas", "triton", "triton-tma", "triton-decode", "reference")
# The dtypes each backend computes in (x's and the adapters'; they may differ). tl.dot has no float64;
# the C++ CPU kernels have no float16 GEMM worth using.
DTYPES = {
    "cpp": (torch.float32, torch.float64, torch.bfloat16),
    "cublas": (torch.float32, torch.float64, torch.bfloat16, torch.float16),
    "triton": (torch.float32, torch.bfloat16, torch.float16),
    "reference": (torch.float32, torch.float64, torch.bfloat16, torch.float16),
}
RANK_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
_FLOAT32_MAX = torch.finfo(torch.float32).max

# The op schemas, as csrc/dylora.cpp declares them (the no-extension fallback defines the last two;
# tests/test_ops.py checks that both agree).
SCHEMAS = {
    "linear": "linear(Tensor x, Tensor? weight, Tensor? bias, Tensor? base, Tensor lora_A, Tensor lora_B, "
              "Tensor rank, float alpha, bool frozen_prefix, str backend, float dropout_p=0., "
              "Tensor? dropout_seed=None) -> Tensor",
    "forward": "forward(Tensor x, Tensor? weight, Tensor? bias, Tensor? base, Tensor lora_A, Tensor lora_B, "
               "Tensor rank, float alpha, bool need_u, str backend, float dropout_p=0., "
               "Tensor? dropout_seed=None) -> (Tensor, Tensor)",
    "backward": "backward(Tensor grad, Tensor x, Tensor? weight, Tensor lora_A, Tensor lora_B, Tensor u, "
                "Tensor rank, float alpha, bool frozen_prefix, bool compute_dx, bool compute_lora, "
                "str backend, float dropout_p=0., Tensor? dropout_seed=None) -> (Tensor, Tensor, Tensor)",
}


def intermediate_dtype(dtype: torch.dtype, adapter_dtype: torch.dtype | None = None) -> torch.dtype:
    """The dtype of the rank-b intermediates u and v: float64 when x or the adapters are, else float32."""
    return torch.float64 if torch.float64 in (dtype, adapter_dtype) else torch.float32


# --------------------------------------------------------------------------------------------
# Public entry points: every check happens here and nowhere below.
# --------------------------------------------------------------------------------------------
def dylora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
                  rank, alpha, *, frozen_prefix: bool = False, backend: str = "auto", dropout_p: float = 0.0,
                  dropout_seed=None) -> Tensor:
    """``y = x·Wᵀ + bias + (alpha/b)·(x·A[:b]ᵀ)·B[:, :b]ᵀ`` with a rank b chosen at run time.

    Args:
        x: (..., K) input.
        weight: (N, K) frozen base weight; bias: (N,) or None. Same dtype as x.
        lora_A: (r_max, K); lora_B: (N, r_max). Their dtype may differ from x's (e.g. float32
            adapters on a bfloat16 model): y is in x's dtype, dA/dB in the adapters'.
        rank: an int in [1, r_max] (Python or NumPy), a 0-d integer tensor, or a 1-D integer tensor
            with one rank per row of ``x.reshape(-1, K)``.
        alpha: the LoRA alpha (Python/NumPy scalar, 0-d NumPy array or 0-d CPU tensor); the low-rank
            term is scaled by alpha / b.
        frozen_prefix: in the backward, train only row b-1 of A and column b-1 of B (DyLoRA's
            frozen mode) instead of all rows/columns < b.
        backend: "auto" (C++ on CPU; on CUDA the fastest of Triton and the cuBLAS composition, measured
            per shape), "cpp", "cublas", "triton", "triton-tma", "triton-decode" or "reference".
        dropout_p: adapter dropout (PEFT's ``lora_dropout``): the low-rank term sees dropout(x), the base layer
            x. Fused: the mask is generated inside the kernels and regenerated in the backward, never stored.
            In [0, 1); pass 0 outside training (as ``nn.Dropout`` in eval mode).
        dropout_seed: the mask's seed: None (drawn from torch's generator on x's device: one small launch, safe
            under CUDA-graph capture), an int, or a 0-d integer tensor. A fixed seed gives a fixed mask.
    Returns:
        (..., N) tensor in x's dtype.
    """
    return _call(x, weight, bias, None, lora_A, lora_B, rank, alpha, frozen_prefix, backend, dropout_p, dropout_seed)


def dylora_delta(x: Tensor, lora_A: Tensor, lora_B: Tensor, rank, alpha, *, frozen_prefix: bool = False,
                 base: Tensor | None = None, backend: str = "auto", dropout_p: float = 0.0,
                 dropout_seed=None) -> Tensor:
    """The low-rank term alone, ``(alpha/b)·(x·A[:b]ᵀ)·B[:, :b]ᵀ``, for base layers a wrapper computes
    itself (a quantized linear, a fused QKV, a 1×1 convolution as a linear).

    ``base`` (..., N): a base output the term is added to inside the same kernel (base is read once
    and the sum written once, to a new tensor: base is not modified); autograd passes the gradient
    of ``base`` through unchanged. Other arguments as in :func:`dylora_linear` (``dropout_p``: dropout on the x
    this term sees; the base output is given, so it is PEFT's lora_dropout exactly).
    """
    return _call(x, None, None, base, lora_A, lora_B, rank, alpha, frozen_prefix, backend, dropout_p, dropout_seed)


def _call(x, weight, bias, base, lora_A, lora_B, rank, alpha, frozen_prefix, backend, dropout_p=0.0,
          dropout_seed=None) -> Tensor:
    backend = _check_tensors(x, weight, bias, base, lora_A, lora_B, backend)
    if type(frozen_prefix) is not bool:
        raise TypeError(f"frozen_prefix must be a bool, got {type(frozen_prefix).__name__} {frozen_prefix!r}")
    rank = _rank_argument(rank, lora_A.shape[0], x, backend)
    accumulator = intermediate_dtype(x.dtype, lora_A.dtype)
    alpha = check_alpha(alpha, accumulator)
    dropout_p = check_dropout(dropout_p)
    if dropout_p:
        check_alpha(alpha / (1.0 - dropout_p), accumulator)  # what the kernels compute with
        dropout_seed = _dropout_seed(dropout_seed, x.device)
    else:
        dropout_seed = None
    if backend == "reference":
        return reference.dylora_linear(x, weight, bias, lora_A, lora_B, rank, alpha, frozen_prefix, base=base,
                                       dropout_p=dropout_p, dropout_seed=dropout_seed)
    return _linear(x, weight, bias, base, lora_A, lora_B, rank, alpha, frozen_prefix, backend, dropout_p,
                   dropout_seed)


def check_dropout(p) -> float:
    """The dropout probability as a float in [0, 1): a real Python/NumPy scalar, else a TypeError / ValueError."""
    if type(p) is not float:
        if isinstance(p, bool) or not isinstance(p, numbers.Real):
            raise TypeError(f"dropout_p must be a float in [0, 1), got {type(p).__name__} {p!r}")
        p = float(p)
    if not 0.0 <= p < 1.0:  # NaN fails too
        raise ValueError(f"dropout_p must be in [0, 1) (the probability of dropping an element), got {p!r}")
    return p


def _dropout_seed(seed, device: torch.device) -> Tensor:
    """The mask's seed as the kernels take it: a 0-d int64 tensor on x's device (drawn from torch's generator
    there when None: a device-side draw, so a CUDA graph draws a new seed on every replay)."""
    if seed is None:
        return torch.randint(1 << 62, (), dtype=torch.int64, device=device)
    if isinstance(seed, Tensor):
        if seed.dim() != 0 or seed.dtype not in RANK_DTYPES:
            raise TypeError(f"dropout_seed must be an int or a 0-d integer tensor, got a {seed.dtype} tensor of "
                            f"shape {tuple(seed.shape)}")
        return seed.to(device=device, dtype=torch.int64)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"dropout_seed must be None, an int or a 0-d integer tensor, got {type(seed).__name__}")
    if not -(1 << 63) <= int(seed) < (1 << 63):
        raise ValueError(f"dropout_seed must fit in 64 bits, got {seed}")
    return torch.full((), int(seed), dtype=torch.int64, device=device)


def _check_tensors(x, weight, bias, base, lora_A, lora_B, backend) -> str:
    """Shapes, devices, the backend and dtypes: the concrete backend name, or a clear error. Plain
    attribute comparisons, about 2 µs for a valid call (this runs on every call)."""
    for name, t, optional in (("x", x, False), ("weight", weight, True), ("bias", bias, True),
                              ("base", base, True), ("lora_A", lora_A, False), ("lora_B", lora_B, False)):
        if not (isinstance(t, Tensor) or (optional and t is None)):
            raise TypeError(f"{name} must be a torch.Tensor{' or None' if optional else ''}, got {type(t).__name__}")
    if lora_A.ndim != 2:
        raise ValueError(f"lora_A must be 2-D (r_max, K), got shape {tuple(lora_A.shape)}")
    r_max, K = lora_A.shape
    if r_max == 0:
        raise ValueError("lora_A has r_max = 0 rows: DyLoRA needs r_max >= 1")
    if weight is None:
        N, k_from = lora_B.shape[0] if lora_B.ndim else 0, "lora_A.shape[1]"
    else:
        if weight.ndim != 2:
            raise ValueError(f"weight must be 2-D (N, K), got shape {tuple(weight.shape)}")
        N, k_from = weight.shape[0], "weight.shape[1]"
        if weight.shape[1] != K:
            raise ValueError(f"lora_A must have shape (r_max, K) with K = weight.shape[1] = {weight.shape[1]}, "
                             f"got {tuple(lora_A.shape)}")
    if x.ndim < 1 or x.shape[-1] != K:
        raise ValueError(f"x must have shape (..., K) with K = {k_from} = {K}, got {tuple(x.shape)}")
    if lora_B.shape != (N, r_max):
        raise ValueError(f"lora_B must have shape (N, r_max) = ({N}, {r_max}), got {tuple(lora_B.shape)}")
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"bias must have shape (N,) = ({N},) or be None, got {tuple(bias.shape)}")
    if base is not None and base.shape != (*x.shape[:-1], N):
        raise ValueError(f"base must have x's shape with the last dimension N = {N}: "
                         f"{(*x.shape[:-1], N)}, got {tuple(base.shape)}")
    device = x.device
    if (lora_A.device != device or lora_B.device != device or (weight is not None and weight.device != device)
            or (bias is not None and bias.device != device) or (base is not None and base.device != device)):
        devices = {n: str(t.device) for n, t in (("x", x), ("weight", weight), ("bias", bias), ("base", base),
                                                 ("lora_A", lora_A), ("lora_B", lora_B)) if t is not None}
        raise ValueError(f"x, weight, bias, base, lora_A and lora_B must be on one device, got {devices}")
    backend = _resolve_backend(backend, x)
    dtype, a_dtype = x.dtype, lora_A.dtype
    if ((weight is not None and weight.dtype != dtype) or (bias is not None and bias.dtype != dtype)
            or (base is not None and base.dtype != dtype) or lora_B.dtype != a_dtype):
        _check_mixed_dtypes(x, weight, bias, base, lora_A, lora_B)
    allowed = _allowed_dtypes(backend)
    if dtype not in allowed or a_dtype not in allowed or lora_B.dtype not in allowed:
        for name, t in (("x", x), ("weight", weight), ("bias", bias), ("base", base), ("lora_A", lora_A),
                        ("lora_B", lora_B)):
            if t is not None and t.dtype not in allowed:
                names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
                raise TypeError(f"backend={backend!r} on {device.type} supports dtypes {names}; got {name} {t.dtype}")
    return backend


def _check_mixed_dtypes(x, weight, bias, base, lora_A, lora_B) -> None:
    """x, weight, bias and base share one dtype; lora_A and lora_B share one (maybe another). Under
    torch.autocast the op casts every floating input itself (as F.linear would), so mixing is fine."""
    if x.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(x.device.type):
        return
    base_group = {n: str(t.dtype) for n, t in (("x", x), ("weight", weight), ("bias", bias), ("base", base))
                  if t is not None}
    if len(set(base_group.values())) > 1:
        raise TypeError(f"x, weight, bias and base must share one dtype, got {base_group}")
    if lora_B.dtype != lora_A.dtype:
        raise TypeError(f"lora_A and lora_B must share one dtype, got {lora_A.dtype} and {lora_B.dtype}")


def _allowed_dtypes(backend: str) -> tuple:
    if backend == "auto":  # CUDA: what any candidate computes in
        return DTYPES["cublas"] if _C is not None else DTYPES["triton"]
    return DTYPES["triton" if backend.startswith("triton") else backend]


def _resolve_backend(backend: str, x: Tensor) -> str:
    """The concrete backend for x's device ("auto" resolved on CPU; kept on CUDA, where the router
    measures), or a clear error."""
    if x.is_cpu and backend == "auto" and _C is not None:  # the common CPU call, decided at once
        return "cpp"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    device = x.device
    if backend == "auto":
        if x.is_cuda:
            return "auto"
        if not x.is_cpu:
            raise ValueError(f"backend='auto' has no kernel for {device.type} tensors; "
                             "use backend='reference' (plain PyTorch) on this device")
        backend = "cpp"
    if backend in ("cpp", "cublas") and _C is None:
        raise RuntimeError(f"backend={backend!r} needs the C++ extension, which failed to import ({_C_ERROR}); "
                           "build it with `pip install --no-build-isolation -e .`")
    if backend == "cpp" and not x.is_cpu:
        raise ValueError(f"backend='cpp' runs on CPU tensors; on {device.type} use 'cublas' (the same ATen composition)")
    if backend == "cublas" and not x.is_cuda:
        raise ValueError(f"backend='cublas' runs on CUDA tensors, got x on {device}; on CPU use 'cpp'")
    if backend.startswith("triton") and not backends.triton_available(device):
        raise ValueError(f"backend={backend!r} needs triton and CUDA tensors (or CPU tensors with "
                         f"TRITON_INTERPRET=1), got x on {device}")
    return backend


def _rank_argument(rank, r_max: int, x: Tensor, backend: str) -> Tensor:
    """The rank as the integer tensor the ops take: a Python/NumPy int becomes a cached 0-d CPU tensor
    (a host value: no device copy, no sync); a tensor's type, shape and device are checked here. Its
    values: a CPU tensor's on the host, whatever the backend (ValueError): by the C++ kernel that reads it
    for backend "cpp", here for every other one (the Triton interpreter, a host rank with CUDA tensors);
    a device tensor's by the kernel that reads it (NaN rows, never garbage), the reference's here."""
    if isinstance(rank, Tensor):
        _check_rank_tensor(rank, x.device, "x's device", lambda: math.prod(x.shape[:-1]))
        if backend == "reference" or (rank.is_cpu and backend != "cpp"):
            check_rank_values(rank, r_max)
        return rank
    return _host_rank(check_int_rank(rank, r_max))


_HOST_RANKS: dict[int, Tensor] = {}


def _host_rank(b: int) -> Tensor:
    """A 0-d int64 CPU tensor holding b, cached per value (the ops never write to their rank)."""
    if torch.compiler.is_compiling():
        return torch.tensor(b)
    t = _HOST_RANKS.get(b)
    if t is None:
        t = _HOST_RANKS[b] = torch.tensor(b)
    return t


def check_int_rank(rank, r_max: int) -> int:
    """A Python/NumPy integer rank, range-checked on the host: the int, or a TypeError / ValueError."""
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral):
        raise TypeError(f"rank must be an int or an integer tensor, got {type(rank).__name__}")
    b = int(rank)
    if not 1 <= b <= r_max:
        raise ValueError(f"rank must be in [1, r_max] = [1, {r_max}], got {b}")
    return b


def _check_rank_tensor(rank: Tensor, device: torch.device, where: str, rows) -> Tensor:
    """A rank tensor's dtype, shape and device (not its values): an integer dtype, 0-d or 1-D with
    ``rows()`` entries (``rows`` None: any length), on ``device`` or a 0-d CPU tensor (a host value)."""
    if rank.dtype not in RANK_DTYPES:
        raise TypeError(f"rank tensor must have an integer dtype, got {rank.dtype} "
                        f"(allowed: {', '.join(str(d).removeprefix('torch.') for d in RANK_DTYPES)})")
    if rank.dim() > 1 or (rank.dim() == 1 and rows is not None and rank.shape[0] != rows()):
        expected = "" if rows is None or rank.dim() > 1 else f" ({rows()} rows)"
        raise ValueError(f"rank tensor must be 0-d or 1-D with one rank per row of x.reshape(-1, K)"
                         f"{expected}, got shape {tuple(rank.shape)}")
    if rank.device != device and not (rank.dim() == 0 and rank.device.type == "cpu"):
        raise ValueError(f"rank tensor must be on {where} {device} (or be a 0-d CPU tensor), got {rank.device}")
    return rank


def check_rank(rank, r_max: int, device: torch.device, rows: int | None = None) -> Tensor:
    """``rank`` (an int, a 0-d or a 1-D integer tensor) as a new int64 tensor on ``device``, checked:
    type and shape always, values on the host for CPU tensors (with ``torch._assert_async`` on an
    accelerator: no host sync). For DyLoRALinear.set_rank and the model helpers, not per call."""
    if not isinstance(rank, Tensor):
        return torch.full((), check_int_rank(rank, r_max), dtype=torch.int64, device=device)
    _check_rank_tensor(rank, device, "the layer's device", None if rows is None else lambda: rows)
    rank = rank.to(device, torch.int64, copy=True)  # a copy in one dtype: never the caller's tensor
    check_rank_values(rank, r_max)
    return rank


def check_rank_values(rank: Tensor, r_max: int) -> None:
    """Values in [1, r_max], compared in int64 (a narrow rank dtype never wraps r_max). Host check for
    CPU tensors; ``torch._assert_async`` (a device-side check, no sync) otherwise and when compiling."""
    if not rank.numel():
        return
    wide = rank.to(torch.int64)
    if rank.device.type == "cpu" and not torch.compiler.is_compiling():
        lo, hi = (int(v) for v in torch.aminmax(wide))
        if lo < 1 or hi > r_max:
            raise ValueError(f"rank values must be in [1, r_max] = [1, {r_max}], got min {lo}, max {hi}")
    else:
        torch._assert_async(((wide >= 1) & (wide <= r_max)).all(),
                            f"dylora: rank values must be in [1, r_max] = [1, {r_max}]")


def check_alpha(alpha, accumulator: torch.dtype = torch.float64) -> float:
    """alpha as a float: a finite real Python/NumPy scalar, 0-d NumPy array or 0-d CPU tensor whose
    value is finite in ``accumulator`` (float32 unless x or the adapters are float64). A tensor on an
    accelerator is refused: reading it would synchronise with the device on every call."""
    value = alpha
    if type(alpha) is not float:
        if isinstance(alpha, Tensor):
            if alpha.dim() != 0 or alpha.dtype.is_complex or alpha.dtype == torch.bool:
                raise ValueError(f"alpha tensor must be a real 0-d tensor, got {alpha.dtype} of shape "
                                 f"{tuple(alpha.shape)}")
            if alpha.device.type != "cpu":
                raise TypeError(f"alpha is a tensor on {alpha.device}: reading it would synchronise with the "
                                "device on every call; pass float(alpha) (once, outside the loop) or a CPU tensor")
            alpha = alpha.item()
        elif isinstance(alpha, np.ndarray) and alpha.ndim == 0 and alpha.dtype.kind in "iuf":
            alpha = alpha.item()
        if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
            raise ValueError(f"alpha must be a finite real number (a Python or NumPy scalar, a 0-d NumPy array "
                             f"or a 0-d CPU tensor), got {value!r}")
        try:
            value = float(alpha)
        except OverflowError:
            value = math.inf
    if not math.isfinite(value):
        raise ValueError(f"alpha must be a finite real number, got {alpha!r}")
    if accumulator != torch.float64 and abs(value) > _FLOAT32_MAX:
        raise ValueError(f"alpha = {value:g} is not finite in float32, the kernels' accumulator for these dtypes: "
                         f"use |alpha| <= {_FLOAT32_MAX:.3g} (or float64 inputs)")
    return value


# --------------------------------------------------------------------------------------------
# Fake implementations (torch.compile, opcheck) and the CUDA kernels
# --------------------------------------------------------------------------------------------
def _out_features(weight, lora_B) -> int:
    return weight.shape[0] if weight is not None else lora_B.shape[0]


def _fake_forward(x, weight, bias, base, lora_A, lora_B, rank, alpha, need_u, backend, dropout_p=0.0,
                  dropout_seed=None):
    u_shape = (x.shape[0], lora_A.shape[0]) if need_u else (0,)
    return (x.new_empty(x.shape[0], _out_features(weight, lora_B)),
            x.new_empty(u_shape, dtype=intermediate_dtype(x.dtype, lora_A.dtype)))


def _fake_backward(grad, x, weight, lora_A, lora_B, u, rank, alpha, frozen_prefix, compute_dx, compute_lora,
                   backend, dropout_p=0.0, dropout_seed=None):
    empty_or = lambda t, wanted: t.new_empty(t.shape if wanted else (0,))
    return empty_or(x, compute_dx), empty_or(lora_A, compute_lora), empty_or(lora_B, compute_lora)


def _define_ops_without_extension() -> torch.library.Library:
    """The forward and backward ops without the C++ extension: schemas defined here, the Python kernels
    of backends.py for CPU (the Triton interpreter; CUDA is registered below for both cases).
    ``linear`` is then _PyLinear."""
    lib = torch.library.Library("dylora", "DEF")
    for name in ("forward", "backward"):
        lib.define(SCHEMAS[name])
        lib.impl(name, getattr(backends, name), "CPU")
    return lib


if _C is None:
    _DEF_LIBRARY = _define_ops_without_extension()
else:
    torch.library.register_fake("dylora::linear")(
        lambda x, weight, bias, base, lora_A, lora_B, rank, alpha, frozen_prefix, backend, dropout_p=0.0,
        dropout_seed=None: x.new_empty(*x.shape[:-1], _out_features(weight, lora_B)))
torch.library.register_fake("dylora::forward")(_fake_forward)
torch.library.register_fake("dylora::backward")(_fake_backward)
if _C is not None:  # the C++ CUDA executor (csrc/plan.cpp) asks backends.plan on a new key, else runs without Python
    _C.set_python_side(backends.plan, backends.forward, backends.backward)
if _C is None or not _C.CUDA_BUILD:  # the CPU build: CUDA calls go through Python (backends.py)
    _IMPL_LIBRARY = torch.library.Library("dylora", "IMPL")
    _IMPL_LIBRARY.impl("forward", backends.forward, "CUDA")
    _IMPL_LIBRARY.impl("backward", backends.backward, "CUDA")


class _PyLinear(torch.autograd.Function):
    """dylora::linear's autograd in Python: used only when the C++ extension is missing."""

    @staticmethod
    def forward(ctx, x, weight, bias, base, lora_A, lora_B, rank, alpha, frozen_prefix, backend, dropout_p=0.0,
                dropout_seed=None):
        x2 = x.reshape(-1, x.shape[-1])
        base2 = None if base is None else base.reshape(x2.shape[0], -1)
        need_u = any(ctx.needs_input_grad)  # grad mode is off inside forward(); this says what backward needs
        y, u = torch.ops.dylora.forward(x2, weight, bias, base2, lora_A, lora_B, rank, alpha, need_u, backend,
                                        dropout_p, dropout_seed)
        ctx.save_for_backward(x2, weight, lora_A, lora_B, u, rank.clone(), dropout_seed)
        ctx.alpha, ctx.frozen_prefix, ctx.backend, ctx.x_shape = alpha, frozen_prefix, backend, x.shape
        ctx.dropout_p = dropout_p
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_y):
        x2, weight, lora_A, lora_B, u, rank, dropout_seed = ctx.saved_tensors
        need_x, need_w, need_bias, need_base, need_A, need_B = ctx.needs_input_grad[:6]
        g = grad_y.reshape(x2.shape[0], -1)
        dx = dA = dB = None
        if need_x or need_A or need_B:
            dx, dA, dB = torch.ops.dylora.backward(g, x2, weight, lora_A, lora_B, u, rank, ctx.alpha,
                                                   ctx.frozen_prefix, need_x, need_A or need_B, ctx.backend,
                                                   ctx.dropout_p, dropout_seed)
        return (dx.view(ctx.x_shape) if need_x else None, g.t() @ x2 if need_w else None,
                g.sum(0) if need_bias else None, grad_y if need_base else None,
                dA if need_A else None, dB if need_B else None, None, None, None, None, None, None)


_linear = torch.ops.dylora.linear.default if _C is not None else _PyLinear.apply
