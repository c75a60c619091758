"""The Python kernels of ``dylora::forward`` and ``dylora::backward``: every CUDA call, and CPU calls
that name a Triton backend (CI runs those in Triton's interpreter, ``TRITON_INTERPRET=1``).

Each call picks one implementation among

    "cublas"          the ATen composition of the C++ extension (dylora_kernels._C) on cuBLAS
    "triton"          the fused Triton kernels (pointer tiles; every GPU and the interpreter)
    "triton-<v>"      other Triton variants where they apply (e.g. "triton-tma" on sm_90+,
                      "triton-decode" for M ≤ 16), as ``dylora_kernels.triton.variants`` lists them

and for the backward also the pairs "<dx>/<lora>" (dx from one, dA and dB from another). With
``backend="auto"`` the choice is measured on the first call per key (dispatch.py) and remembered; a named
backend restricts the choice to itself (``"triton"``: to the Triton variants). The key is everything that
changes which one is fastest and nothing that changes per call: the op, device, dtypes, which optional
operands are present, per-row vs shared rank, where the rank lives, the mode, M rounded up to a power of
two, N, K, r_max, whether the GEMM's operands suit TMA and whether the others' rows are contiguous. After
the first call for a key the cost of choosing is one dictionary lookup.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from collections.abc import Callable

import torch
from torch import Tensor

from .dispatch import DISPATCHER, forced_family, in_family

try:  # the ATen composition; absent when the C++ extension did not build (then Triton only)
    from . import _C
except ImportError:  # pragma: no cover - exercised by the no-extension test in a subprocess
    _C = None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _triton():
    """The Triton backend module, or None when triton is not installed."""
    try:
        return importlib.import_module("dylora_kernels.triton")
    except ImportError:
        return None


_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None  # found without importing it


def triton_available(device: torch.device) -> bool:
    return _TRITON_INSTALLED and (device.type == "cuda" or (device.type == "cpu" and _interpreting()))


def available(device: torch.device) -> list[str]:
    """The backends that can run on ``device`` (a CUDA device): the cuBLAS composition with the C++ extension, the
    Triton variants with triton (TMA on sm_90+ only), and the reference."""
    names = ["cublas"] if _C is not None else []
    if triton_available(device):
        names += ["triton", "triton-decode"] + (["triton-tma"] if torch.cuda.get_device_capability(device)[0] >= 9
                                                else [])
    return names + ["reference"]


@functools.cache
def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


_DEVICE_RANKS: dict[tuple[int, torch.device], Tensor] = {}


def _rank_on(rank: Tensor, device: torch.device) -> Tensor:
    """The rank as a tensor on ``device``: a 0-d CPU rank (a host value, e.g. a Python int the caller
    passed) becomes one cached device tensor per value, so no copy is made per call."""
    if rank.device == device:
        return rank
    key = (int(rank), device)
    cached = _DEVICE_RANKS.get(key)
    if cached is None:
        cached = _DEVICE_RANKS[key] = rank.to(device, torch.int64)
    return cached


def _bucket(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def tma_ready(t: Tensor | None) -> bool:
    """Unit last stride and 16-byte aligned base and row stride (what a TMA descriptor needs; triton/hopper.py
    checks its operands with this too), or no operand."""
    return t is None or (t.stride(-1) == 1 and not (t.data_ptr() | t.stride(0) * t.element_size()) & 15)


def _rows(t: Tensor | None) -> bool:
    """Whether rows are contiguous (pointer loads along them coalesce), or the operand is absent."""
    return t is None or t.stride(-1) == 1


# ---------------------------------------------------------------------------------------------
# Candidates
# ---------------------------------------------------------------------------------------------
def _triton_forward(x, weight, bias, base, lora_A, lora_B, rank, alpha, need_u, variant):
    return _triton().forward(x, weight, bias, base, lora_A, lora_B, _rank_on(rank, x.device), alpha, need_u,
                             variant=variant)


def _triton_backward(grad, x, weight, lora_A, lora_B, u, rank, alpha, frozen_prefix, compute_dx, compute_lora,
                     variant):
    return _triton().backward(grad, x, weight, lora_A, lora_B, u, _rank_on(rank, x.device), alpha, frozen_prefix,
                              compute_dx, compute_lora, variant=variant)


def _implementations(op: str, x: Tensor, weight, lora_A, lora_B, backend: str) -> dict[str, Callable]:
    """name -> kernel for ``op`` ("forward" / "backward") on these operands, restricted by ``backend``
    (or, for "auto", by DYLORA_DISPATCH). The cuBLAS composition comes first (the capture default)."""
    family = forced_family() if backend == "auto" else backend
    found: dict[str, Callable] = {}
    if x.is_cuda and _C is not None and in_family("cublas", family):
        found["cublas"] = _C.forward if op == "forward" else _C.backward
    if triton_available(x.device) and (family == "auto" or family.startswith("triton")):
        kernel = _triton_forward if op == "forward" else _triton_backward
        for variant in _triton().variants(op, x, weight, lora_A, lora_B):
            name = "triton" if variant == "pointer" else f"triton-{variant}"
            if name == family or (in_family(name, family) and (x.is_cuda or variant == "pointer")):
                found[name] = functools.partial(kernel, variant=variant)
        if op == "backward" and family.startswith("triton-") and not found:
            found["triton"] = functools.partial(kernel, variant="pointer")  # e.g. "triton-decode": forward only
    if not found:
        raise ValueError(f"backend={backend!r} (DYLORA_DISPATCH={forced_family()!r}) has no {op} kernel for "
                         f"{x.dtype} tensors of shape {tuple(x.shape)} on {x.device} here (is the C++ extension "
                         "built? is triton installed? triton-tma needs sm_90+, fp16/bf16 and 16-byte aligned x and "
                         f"weight; triton-decode runs forwards with M <= 16 and r_max <= 64)")
    return found


def _pairs(kernels: dict[str, Callable]) -> dict[str, Callable]:
    """Backward candidates: each kernel alone (v = g·B shared by dx and dA/dB), and each pair from two
    families "<dx kernel>/<lora kernel>" (dx from the first, dA and dB from the second)."""
    candidates = dict(kernels)
    family = lambda name: name.split("-")[0]
    for dx_name, dx_kernel in kernels.items():
        for lora_name, lora_kernel in kernels.items():
            if family(dx_name) != family(lora_name) and lora_name == family(lora_name):
                candidates[f"{dx_name}/{lora_name}"] = functools.partial(_pair, dx_kernel, lora_kernel)
    return candidates


def _pair(dx_kernel, lora_kernel, grad, x, weight, lora_A, lora_B, u, rank, alpha, frozen_prefix, compute_dx,
          compute_lora):
    dx = dx_kernel(grad, x, weight, lora_A, lora_B, u, rank, alpha, frozen_prefix, True, False)[0]
    _, dA, dB = lora_kernel(grad, x, weight, lora_A, lora_B, u, rank, alpha, frozen_prefix, False, True)
    return dx, dA, dB


# ---------------------------------------------------------------------------------------------
# The kernels registered for dylora::forward / dylora::backward (CUDA key)
# ---------------------------------------------------------------------------------------------
_CHOSEN: dict[tuple, Callable] = {}


def _choose(key: tuple, candidates: dict[str, Callable], args: tuple, device: torch.device) -> tuple[str, bool]:
    """(name of the fastest candidate, whether that choice is final). Measured on a GPU (dispatch.py); the first
    candidate in the interpreter or when there is one. Not final when made during a CUDA-graph capture without
    a remembered measurement (the first candidate, used once: the next eager call measures)."""
    if len(candidates) > 1 and device.type == "cuda":
        portable = tuple(k for k in key if not isinstance(k, torch.device))  # the GPU's name stands for it
        runs = {name: functools.partial(kernel, *args) for name, kernel in candidates.items()}
        name = DISPATCHER.choose(_device_name(device), portable, runs)
        return name, (_device_name(device), *portable) in DISPATCHER.memory
    return next(iter(candidates)), True  # one candidate, or the interpreter: nothing worth timing


def _forward_key(backend, x, weight, bias, base, lora_A, lora_B, rank) -> tuple:
    (M, K), (N, R) = x.shape, lora_B.shape
    return ("forward", backend, x.device, x.dtype, lora_A.dtype, weight is None, bias is None, base is None,
            rank.dim(), rank.is_cpu, _bucket(M), N, K, R, tma_ready(x), tma_ready(weight), _rows(base),
            _rows(lora_A), _rows(lora_B))


def _backward_key(backend, grad, x, weight, lora_A, lora_B, rank, frozen_prefix, compute_dx, compute_lora) -> tuple:
    (M, K), (N, R) = x.shape, lora_B.shape
    return ("backward", backend, x.device, x.dtype, lora_A.dtype, weight is None, rank.dim(), rank.is_cpu,
            frozen_prefix, compute_dx, compute_lora, _bucket(M), N, K, R, tma_ready(grad), tma_ready(weight),
            _rows(x), _rows(lora_A), _rows(lora_B))


def _candidates(op: str, backend: str, args: tuple) -> dict[str, Callable]:
    """name -> kernel for one call's arguments (the backward's include the "<dx>/<lora>" pairs when both are asked)."""
    if op == "forward":
        x, weight, _, _, lora_A, lora_B = args[:6]
        return _implementations("forward", x, weight, lora_A, lora_B, backend)
    grad, x, weight, lora_A, lora_B = args[:5]
    candidates = _implementations("backward", x, weight, lora_A, lora_B, backend)
    compute_dx, compute_lora = args[9], args[10]
    return _pairs(candidates) if compute_dx and compute_lora else candidates


def _key(op: str, backend: str, args: tuple) -> tuple:
    if op == "forward":
        x, weight, bias, base, lora_A, lora_B, rank = args[:7]
        return _forward_key(backend, x, weight, bias, base, lora_A, lora_B, rank)
    grad, x, weight, lora_A, lora_B, _, rank, _, frozen_prefix, compute_dx, compute_lora = args
    return _backward_key(backend, grad, x, weight, lora_A, lora_B, rank, frozen_prefix, compute_dx, compute_lora)


def _run(op: str, backend: str, args: tuple):
    """The Python path of one call: the kernel chosen for its key (chosen on the key's first call)."""
    key = _key(op, backend, args)
    kernel = _CHOSEN.get(key)
    if kernel is None:
        candidates = _candidates(op, backend, args)
        name, final = _choose(key, candidates, args, args[1].device if op == "backward" else args[0].device)
        kernel = candidates[name]
        if final:
            _CHOSEN[key] = kernel
    return kernel(*args)


def forward(x, weight, bias, base, lora_A, lora_B, rank, alpha, need_u, backend):
    """(y, u) for dylora::forward on CUDA tensors through Python (the CPU build, ``DYLORA_CUDA_PATH=python``) or
    CPU tensors in the Triton interpreter."""
    return _run("forward", backend, (x, weight, bias, base, lora_A, lora_B, rank, alpha, need_u))


def backward(grad, x, weight, lora_A, lora_B, u, rank, alpha, frozen_prefix, compute_dx, compute_lora, backend):
    """(dx, dA, dB) for dylora::backward, through Python (as ``forward``)."""
    return _run("backward", backend,
                (grad, x, weight, lora_A, lora_B, u, rank, alpha, frozen_prefix, compute_dx, compute_lora))


def plan(op: str, backend: str, args: tuple) -> tuple[list[tuple], bool]:
    """The C++ executor's planner (csrc/plan.cpp), called once per new key with that call's arguments: the chosen
    implementation as parts ``(name, Triton description or None, kernel)`` — one, or for a backward pair two (dx
    from the first, dA and dB from the second) — and whether the choice is final (see ``_choose``). The C++ side
    runs "cublas" itself, a Triton part from its description (``triton/cplan.py``) when its launcher takes it,
    and anything else by calling the kernel."""
    device = args[1].device if op == "backward" else args[0].device
    candidates = _candidates(op, backend, args)
    name, final = _choose(_key(op, backend, args), candidates, args, device)
    # a pair's parts are candidates themselves (_pairs keeps every single kernel)
    return [(part, _triton_description(op, part, args), candidates[part]) for part in name.split("/")], final


def _triton_description(op: str, name: str, args: tuple):
    """What the C++ Triton launcher needs to run candidate ``name`` for these arguments, or None (not a Triton
    candidate, or no C++ launcher description available: the C++ side then calls the kernel)."""
    if not name.startswith("triton"):
        return None
    try:
        from .triton import cplan
    except ImportError:
        return None
    return cplan.describe(op, "pointer" if name == "triton" else name.removeprefix("triton-"), args)
