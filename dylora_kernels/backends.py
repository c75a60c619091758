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
two, N, K, r_max, whether the GEMM's operands suit TMA and whether the others' rows are contiguous, and two
settings of torch's that change the result (each a small function here, so that a C++ plan key can include the
same): ``matmul_precision_key()`` (how fp32 dots run) and ``deterministic()``. After the first call for a key the
cost of choosing is one dictionary lookup.

Reliability rules of the first call per key (``_first_call``):
- it never happens inside CUDA-graph capture: a key first seen there raises ``CaptureError`` (warm up eagerly);
- a candidate that fails to compile or launch (out of shared memory or registers, a ptxas or compilation error,
  a launch error) is dropped with one warning and the next one is used, in the measurement and in the call;
- under ``deterministic()`` nothing is timed: a fixed candidate per key (``_fixed_choice``), Triton with fixed
  configs.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from .dispatch import DISPATCHER, CandidateFailed, forced_family, in_family

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


# Triton kernels run on sm_80+ (bf16 dots, cp.async pipelining; compiled and checked for sm_80/86/89/90a).
TRITON_MIN_CAPABILITY = (8, 0)


@functools.cache
def _capability(device: torch.device) -> tuple[int, int]:
    return tuple(torch.cuda.get_device_capability(device))


def triton_available(device: torch.device) -> bool:
    if device.type == "cuda":
        return _TRITON_INSTALLED and _capability(device) >= TRITON_MIN_CAPABILITY
    return _TRITON_INSTALLED and device.type == "cpu" and _interpreting()


def matmul_precision_key() -> str:
    """How fp32 dots may run, following torch's setting (what cuBLAS follows too): "tf32" when torch allows TF32
    for CUDA matmuls (``torch.set_float32_matmul_precision("high" | "medium")``, ``allow_tf32 = True`` or
    ``torch.backends.cuda.matmul.fp32_precision = "tf32"``), else "ieee" (the default, "highest"). The Triton
    kernels compile their fp32 dots with it (``input_precision``). Part of the dispatch key."""
    if _FP32_PRECISION is not None:  # torch >= 2.9: reads the legacy and the new API alike, without warnings
        return "tf32" if _FP32_PRECISION("cuda", "matmul") == "tf32" else "ieee"
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


_FP32_PRECISION = getattr(torch._C, "_get_fp32_precision_getter", None)
DETERMINISTIC_ENV = "DYLORA_DETERMINISTIC"
_ENV_DETERMINISTIC = os.environ.get(DETERMINISTIC_ENV) == "1"  # read once (an environment lookup costs ~1 µs)


def deterministic() -> bool:
    """Whether results must be bit-identical across runs and processes: ``torch.use_deterministic_algorithms(True)``
    or DYLORA_DETERMINISTIC=1 in the environment when dylora_kernels is imported. Then nothing is chosen by timing
    (see ``_fixed_choice``). Part of the dispatch key."""
    return _ENV_DETERMINISTIC or torch.are_deterministic_algorithms_enabled()


@functools.cache
def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


class CaptureError(RuntimeError):
    """What the first call for a key would need (measurement, compilation, a host→device copy) cannot run inside
    CUDA-graph capture."""


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


_DEVICE_RANKS: dict[tuple[int, torch.device], Tensor] = {}
_RANK_TABLES: dict[torch.device, int] = {}  # device -> the largest rank prepared there


def prepare_device_ranks(device: torch.device, r_max: int) -> None:
    """Every rank 0..r_max as a cached 0-d tensor on ``device``, made in one go outside any capture from a device-side
    arange (no host→device copy), 16 bytes apart (the alignment a fresh tensor has, so Triton specialises alike): a
    CUDA graph captured later with any host rank ≤ r_max finds its tensor here."""
    if _RANK_TABLES.get(device, -1) >= r_max:
        return
    table = torch.zeros(r_max + 1, 2, dtype=torch.int64, device=device)
    table[:, 0] = torch.arange(r_max + 1, device=device)
    for b in range(r_max + 1):
        _DEVICE_RANKS.setdefault((b, device), table[b, 0])
    _RANK_TABLES[device] = r_max


def _rank_on(rank: Tensor, device: torch.device) -> Tensor:
    """The rank as a tensor on ``device``: a 0-d CPU rank (a host value, e.g. a Python int the caller
    passed) becomes one cached device tensor per value, so no copy is made per call."""
    if rank.device == device:
        return rank
    key = (int(rank), device)
    cached = _DEVICE_RANKS.get(key)
    if cached is None:
        if _capturing(device):
            raise CaptureError(f"dylora: host rank {key[0]} has no device copy yet and a CUDA graph is being captured "
                               "(a host→device copy cannot be captured): call the layer once eagerly with this rank "
                               "(or with a rank tensor on the device) before capturing")
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
def _triton_forward(x, weight, bias, base, lora_A, lora_B, rank, alpha, need_u, dropout_p, dropout_seed, variant,
                    precision=None, tuned=True):
    return _triton().forward(x, weight, bias, base, lora_A, lora_B, _rank_on(rank, x.device), alpha, need_u,
                             variant=variant, precision=precision, tuned=tuned, dropout_p=dropout_p,
                             dropout_seed=dropout_seed)


def _triton_backward(grad, x, weight, lora_A, lora_B, u, rank, alpha, frozen_prefix, compute_dx, compute_lora,
                     dropout_p, dropout_seed, variant, precision=None, tuned=True):
    return _triton().backward(grad, x, weight, lora_A, lora_B, u, _rank_on(rank, x.device), alpha, frozen_prefix,
                              compute_dx, compute_lora, variant=variant, precision=precision, tuned=tuned,
                              dropout_p=dropout_p, dropout_seed=dropout_seed)


def _implementations(op: str, x: Tensor, weight, lora_A, lora_B, backend: str, precision: str | None = None,
                     fixed: bool = False) -> dict[str, Callable]:
    """name -> kernel for ``op`` ("forward" / "backward") on these operands, restricted by ``backend``
    (or, for "auto", by DYLORA_DISPATCH). The cuBLAS composition comes first. The Triton kernels get ``precision``
    (``matmul_precision_key()``; None: no fp32 operand) for their fp32 dots, and fixed configs when ``fixed``
    (``deterministic()``)."""
    family = forced_family() if backend == "auto" else backend
    found: dict[str, Callable] = {}
    if x.is_cuda and _C is not None and in_family("cublas", family):
        found["cublas"] = _C.forward if op == "forward" else _C.backward
    if triton_available(x.device) and (family == "auto" or family.startswith("triton")):
        kernel = _triton_forward if op == "forward" else _triton_backward
        for variant in _triton().variants(op, x, weight, lora_A, lora_B):
            name = "triton" if variant == "pointer" else f"triton-{variant}"
            if name == family or (in_family(name, family) and (x.is_cuda or variant == "pointer")):
                found[name] = functools.partial(kernel, variant=variant, precision=precision, tuned=not fixed)
        if op == "backward" and family.startswith("triton-") and not found:  # e.g. "triton-decode": forward only
            found["triton"] = functools.partial(kernel, variant="pointer", precision=precision, tuned=not fixed)
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
          compute_lora, dropout_p, dropout_seed):
    dx = dx_kernel(grad, x, weight, lora_A, lora_B, u, rank, alpha, frozen_prefix, True, False, dropout_p,
                   dropout_seed)[0]
    _, dA, dB = lora_kernel(grad, x, weight, lora_A, lora_B, u, rank, alpha, frozen_prefix, False, True, dropout_p,
                            dropout_seed)
    return dx, dA, dB


# ---------------------------------------------------------------------------------------------
# The kernels registered for dylora::forward / dylora::backward (CUDA key)
# ---------------------------------------------------------------------------------------------
_CHOSEN: dict[tuple, Callable] = {}


@functools.cache
def _candidate_failures() -> tuple[type[BaseException], ...]:
    """What rules a candidate out when it raises it: triton's compile and resource errors, and RuntimeError (a
    launch error; OutOfMemoryError excepted, which no other candidate would avoid)."""
    found: list[type[BaseException]] = [RuntimeError]
    if _TRITON_INSTALLED:
        from triton.compiler.errors import CompilationError
        from triton.runtime.errors import OutOfResources, PTXASError
        found += [CompilationError, OutOfResources, PTXASError]
    return tuple(found)


def _guarded(name: str, kernel: Callable) -> Callable:
    """``kernel``, raising CandidateFailed (after one warning) where it fails to compile or launch."""
    def run(*args):
        try:
            return kernel(*args)
        except (torch.OutOfMemoryError, CaptureError):
            raise
        except _candidate_failures() as e:
            warnings.warn(f"dylora: the {name!r} kernel failed ({type(e).__name__}: {str(e)[:300]}); it is dropped "
                          "for this shape and the next candidate is used", RuntimeWarning, stacklevel=2)
            raise CandidateFailed(name) from e
    return run


def _fixed_choice(candidates: dict[str, Callable]) -> str:
    """The candidate used under ``deterministic()``, whatever is faster: the cuBLAS composition where it runs, else
    the pointer Triton kernels ("triton"), else the first one offered."""
    for name in ("cublas", "triton"):
        if name in candidates:
            return name
    return next(iter(candidates))


def _first_call(key: tuple, kernels: dict[str, Callable], args: tuple, x: Tensor, rank: Tensor, r_max: int,
                fixed: bool):
    """Choose the kernel for a key seen for the first time (measured on CUDA when several can run, ``_fixed_choice``
    when ``fixed``, the first candidate otherwise), run it and remember it. A candidate that fails is dropped (one
    warning) and the choice is made again among the others. Never inside CUDA-graph capture."""
    device = x.device
    if _capturing(device):
        raise CaptureError(f"dylora: the first {key[0]} call for this shape and layout ({x.dtype} x of shape "
                           f"{tuple(x.shape)}, r_max {r_max}, backend {key[1]!r}) happens during CUDA-graph capture, "
                           "where its kernel cannot be chosen (measured, compiled, autotuned). Run the same step "
                           "once eagerly (a warm-up) before capturing.")
    if rank.dim() == 0 and rank.is_cpu and device.type == "cuda":
        prepare_device_ranks(device, r_max)  # every host rank's device copy, made outside any capture
    candidates = {name: _guarded(name, kernel) for name, kernel in kernels.items()}
    while True:
        if fixed:
            name = _fixed_choice(candidates)
        elif len(candidates) > 1 and device.type == "cuda":
            portable = tuple(k for k in key if not isinstance(k, torch.device))  # the GPU's name stands for it
            name = DISPATCHER.choose(_device_name(device), portable,
                                     {n: functools.partial(run, *args) for n, run in candidates.items()})
            times = DISPATCHER.timings.get((_device_name(device), *portable), {})
            for failed in [n for n, t in times.items() if t == float("inf") and n != name]:
                del candidates[failed]  # failed while measured (it warned)
        else:
            name = next(iter(candidates))  # one candidate, or the interpreter: nothing worth timing
        try:
            out = candidates[name](*args)
        except CandidateFailed:
            del candidates[name]
            if not candidates:
                raise CandidateFailed(f"dylora: no {key[0]} kernel could run for {x.dtype} x of shape "
                                      f"{tuple(x.shape)} on {device} (each failure was warned above)") from None
            continue
        _CHOSEN[key], _CHOSEN_NAMES[key] = kernels[name], name
        return out


def _key_settings(x: Tensor, lora_A: Tensor) -> tuple[str | None, bool]:
    """(precision, deterministic) of a call: the settings of torch's that are part of the key (precision only
    matters, and is only read, when an operand is fp32)."""
    fp32 = x.dtype == torch.float32 or lora_A.dtype == torch.float32
    return (matmul_precision_key() if fp32 else None), deterministic()


def _key(op: str, backend: str, args: tuple) -> tuple:
    """The dispatch key of one forward's or backward's arguments (see the module docstring)."""
    if op == "forward":
        x, weight, bias, base, lora_A, lora_B, rank = args[:7]
        precision, fixed = _key_settings(x, lora_A)
        return ("forward", backend, x.device, x.dtype, lora_A.dtype, weight is None, bias is None, base is None,
                rank.dim(), rank.is_cpu, args[9] > 0, _bucket(x.shape[0]), lora_B.shape[0], x.shape[1],
                lora_B.shape[1], tma_ready(x), tma_ready(weight), _rows(base), _rows(lora_A), _rows(lora_B), precision, fixed)
    grad, x, weight, lora_A, lora_B, _, rank, _, frozen_prefix, compute_dx, compute_lora, dropout_p, _ = args
    precision, fixed = _key_settings(x, lora_A)
    return ("backward", backend, x.device, x.dtype, lora_A.dtype, weight is None, rank.dim(), rank.is_cpu,
            frozen_prefix, compute_dx, compute_lora, dropout_p > 0, _bucket(x.shape[0]), lora_B.shape[0], x.shape[1],
            lora_B.shape[1], tma_ready(grad), tma_ready(weight), _rows(x), _rows(lora_A), _rows(lora_B), precision,
            fixed)


def _candidates(op: str, backend: str, args: tuple, key: tuple) -> dict[str, Callable]:
    """name -> kernel for one call (the backward's with the "<dx>/<lora>" pairs when both are asked and the choice
    is measured)."""
    precision, fixed = key[-2:]
    if op == "forward":
        x, weight, _, _, lora_A, lora_B = args[:6]
        return _implementations("forward", x, weight, lora_A, lora_B, backend, precision, fixed)
    _, x, weight, lora_A, lora_B = args[:5]
    candidates = _implementations("backward", x, weight, lora_A, lora_B, backend, precision, fixed)
    compute_dx, compute_lora = args[9], args[10]
    return _pairs(candidates) if compute_dx and compute_lora and not fixed else candidates


def _run(op: str, backend: str, args: tuple):
    """The Python path of one call: the kernel chosen for its key (``_first_call`` on the key's first call)."""
    key = _key(op, backend, args)
    kernel = _CHOSEN.get(key)
    if kernel is not None:
        return kernel(*args)
    x, rank, r_max = (args[1], args[6], args[4].shape[0]) if op == "backward" else (args[0], args[6], args[4].shape[0])
    return _first_call(key, _candidates(op, backend, args, key), args, x, rank, r_max, key[-1])


def forward(x, weight, bias, base, lora_A, lora_B, rank, alpha, need_u, backend, dropout_p=0.0, dropout_seed=None):
    """(y, u) for dylora::forward through Python: CUDA tensors in the CPU build (or with ``DYLORA_CUDA_PATH=python``),
    CPU tensors in the Triton interpreter."""
    return _run("forward", backend, (x, weight, bias, base, lora_A, lora_B, rank, alpha, need_u, dropout_p,
                                     dropout_seed))


def backward(grad, x, weight, lora_A, lora_B, u, rank, alpha, frozen_prefix, compute_dx, compute_lora, backend,
             dropout_p=0.0, dropout_seed=None):
    """(dx, dA, dB) for dylora::backward through Python (as ``forward``)."""
    return _run("backward", backend, (grad, x, weight, lora_A, lora_B, u, rank, alpha, frozen_prefix, compute_dx,
                                      compute_lora, dropout_p, dropout_seed))


_CHOSEN_NAMES: dict[tuple, str] = {}  # key -> the name of the kernel in _CHOSEN (for the C++ planner)


def plan(op: str, backend: str, args: tuple) -> tuple[list[tuple], bool]:
    """The C++ executor's planner (csrc/plan.cpp), called once per new key with that call's arguments: the chosen
    implementation as parts ``(name, Triton description or None, kernel)`` — one, or for a backward pair two (dx
    from the first, dA and dB from the second) — and whether the choice is final (always, here: a first call
    inside a capture raises CaptureError). The choice is ``_first_call``'s (measured, with failing candidates
    dropped), which also runs the call once. The C++ side runs "cublas" itself, a Triton part from its
    description (``triton/cplan.py``) when its launcher takes it, and anything else by calling the kernel."""
    key = _key(op, backend, args)
    candidates = _candidates(op, backend, args, key)
    if key not in _CHOSEN:
        _run(op, backend, args)
    name = _CHOSEN_NAMES[key]
    # a pair's parts are candidates themselves (_pairs keeps every single kernel)
    precision = key[-2]  # what the Triton candidates were given (_implementations)
    return [(part, _triton_description(op, part, args, precision), candidates[part])
            for part in name.split("/")], True


def _triton_description(op: str, name: str, args: tuple, precision: str | None):
    """What the C++ Triton launcher needs to run candidate ``name`` for these arguments, or None (not a Triton
    candidate, or the interpreter: the C++ side then calls the kernel)."""
    if not name.startswith("triton") or _interpreting():
        return None
    try:
        from .triton import cplan
    except ImportError:
        return None
    return cplan.describe(op, "pointer" if name == "triton" else name.removeprefix("triton-"), *args,
                          precision=precision)


# ---------------------------------------------------------------------------------------------
# What runs here (``python -m dylora_kernels info`` prints it)
# ---------------------------------------------------------------------------------------------
def available_backends(device: torch.device | str | None = None) -> list[tuple[str, bool, str]]:
    """(name, runs, note) for each backend on ``device`` (default: the current CUDA device, else the CPU): whether
    it runs there, and where it applies (or why it does not run)."""
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    cuda = device.type == "cuda"
    if cuda and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    no_ext = "the C++ extension dylora_kernels._C is not built"
    found = [("cpp", _C is not None and not cuda,
              "CPU tensors" if not cuda else "CPU tensors only" if _C is not None else no_ext)]
    if cuda:
        found.append(("cublas", _C is not None, "the ATen composition on cuBLAS, every CUDA GPU" if _C is not None
                      else no_ext))
    arch = f"sm_{''.join(map(str, _capability(device)))}" if cuda else None
    if not _TRITON_INSTALLED:
        why_not = "triton is not installed"
    elif cuda and _capability(device) < TRITON_MIN_CAPABILITY:
        why_not = f"{arch}: the Triton kernels need sm_80+"
    elif not cuda and not _interpreting():
        why_not = "CPU tensors run the Triton kernels only in the interpreter (TRITON_INTERPRET=1)"
    else:
        why_not = None
    where = arch or "the Triton interpreter"
    found.append(("triton", why_not is None, why_not or f"pointer-tile kernels ({where})"))
    found.append(("triton-decode", why_not is None, why_not or "forward with M <= 16 rows and r_max <= 64"))
    if why_not is None and (not cuda or _capability(device) >= (9, 0)):
        tma = (True, "sm_90+ TMA kernel for fp16/bf16 with 16-byte aligned x and weight rows")
    else:
        tma = (False, why_not or f"{arch}: the TMA kernel needs sm_90+")
    found.append(("triton-tma", *tma))
    return found
