"""Plans for the C++ Triton launcher (csrc/triton_launch.cpp): what it needs from Python, once per key.

The C++ launcher runs the kernel contract of ``dylora_kernels.triton`` (``forward`` / ``backward``) without
Python: it allocates what those functions allocate, computes every kernel argument the launch wrappers of
``kernels.py`` and ``hopper.py`` compute, and launches the compiled binaries with cuLaunchKernelEx. What it does
not know it asks here, once per key:

``describe(op, variant, x, ...)`` → the plan description (a dict), made after the Python path ran the key once
(so triton has autotuned and compiled), read by ``triton_launch::make_plan``:

    {"version": 1, "op": "forward" | "backward", "variant": "pointer" | "decode" | "tma",
     "num_sms": SMs of x's device (the persistent TMA grid, split-M reductions),
     "precision": "tf32" | "ieee" (the PRECISION constexpr of the launches with fp32 dots: torch's setting),
     "split_rows": kernels._SPLIT_ROWS,
     "kernels": {step: {"name": the @triton.jit function's name,
                        "params": its runtime parameter names, in order,
                        "specialize": [bool per runtime parameter]   (not in do_not_specialize),
                        "align": [bool per runtime parameter]        (not in do_not_specialize_on_alignment),
                        "key_args": [indices of the runtime parameters in the autotune key]}
                 for step in STEPS},
     "binary_for": binary_for}

``binary_for(step, args, constexprs)`` → the binary the Python path compiled for one launch, or None when the
Python path has not run that launch yet (the C++ caller then falls back to Python for the call). ``args``: the
launch's runtime arguments in parameter order, tensors as ("t", dtype name, data pointer), TMA descriptors as
("d", dtype name, data pointer, shape, strides), ints, floats and None as they are; ``constexprs``: (name, value)
pairs in the order the Python wrapper passes them (the TMA step: its flags only; the config comes from
hopper's _CHOSEN). The answer:

    {"name": kernel name, "function": CUfunction handle (int), "num_warps", "num_ctas", "shared",
     "launch_cooperative_grid", "launch_pdl", "global_scratch_size", "profile_scratch_size",
     "types": [triton signature type per runtime parameter: "constexpr" (not passed), "*bf16", "i32", "i64",
               "u64", "fp32", "u1", "tensordesc<...>"],
     "tensordesc_meta": [{"swizzle", "elem_size", "elem_type", "block_size", "fp4_padded"} per descriptor],
     "desc_blocks": [block shape per descriptor argument] (the TMA step),
     "meta": {constexpr name: int} (the config's block sizes and the flags), "tail": [constexpr values],
     "kernel": the compiled kernel (kept by the plan: it owns the module that holds the function)}

The types are the specialisation of each argument (triton's own native_specialize_impl), which is what the
JIT makes the compiled kernel's signature from; a real compiled kernel's signature is checked against it.
"""
from __future__ import annotations

import torch
from triton._C.libtriton import native_specialize_impl
from triton.runtime.driver import driver
from triton.tools.tensor_descriptor import TensorDescriptor

from . import hopper, kernels
from .launch import _INTERPRET

STEPS = ("shrink", "fused", "decode", "grad", "gemv", "finish", "tma")
VARIANTS = {"forward": ("pointer", "decode", "tma"), "backward": ("pointer", "tma")}


def _launchers():
    return {**{name: kernels._launch[name] for name in STEPS[:-1]}, "tma": hopper._LAUNCH}


def describe(op: str, variant: str, x: torch.Tensor, *args, precision: str | None = None) -> dict:
    """The plan description of one key (the format above). ``x`` and ``args``: the kernel-contract call
    (``dylora_kernels.triton.forward`` / ``backward`` arguments; only x's device is read); ``precision``: the one
    the Python path ran the key with (its ``precision`` argument; None: "tf32", as the wrappers default)."""
    if op not in VARIANTS:
        raise ValueError(f"op must be 'forward' or 'backward', got {op!r}")
    if variant not in VARIANTS[op]:
        raise ValueError(f"the {op} has variants {VARIANTS[op]}, got {variant!r}")
    if _INTERPRET:
        raise RuntimeError("TRITON_INTERPRET=1: interpreted kernels have no binary for C++ to launch")
    if op == "backward":  # grad is the first argument there: x is the second
        x = args[0]
    steps = {}
    for step, launcher in _launchers().items():
        specialize, align = launcher.flags[1], launcher.flags[2]
        steps[step] = {"name": launcher.fn.__name__, "params": [p.name for p in launcher.fn.params[:launcher.n_runtime]],
                       "specialize": list(specialize), "align": list(align), "key_args": list(launcher.key_args)}
    return {"version": 1, "op": op, "variant": variant, "num_sms": kernels.num_sms(x.device),
            "precision": precision or "tf32",
            "split_rows": kernels._SPLIT_ROWS, "kernels": steps, "binary_for": binary_for}


class _StandIn:
    """A tensor as specialisation sees it: a dtype and a data pointer."""
    __slots__ = ("dtype", "_ptr")

    def __init__(self, dtype, ptr):
        self.dtype, self._ptr = dtype, ptr

    def data_ptr(self):
        return self._ptr


def _arg(a):
    if isinstance(a, tuple) and a and a[0] == "t":
        return _StandIn(getattr(torch, a[1]), a[2])
    return a


def binary_for(step: str, args: list, constexprs: list) -> dict | None:
    """The binary the Python path compiled for one launch (see the module docstring), or None."""
    launcher = _launchers()[step]
    constexprs = dict(constexprs)
    args = [_arg(a) for a in args]
    desc_blocks = []
    if step == "tma":
        descs = args[:3]  # x, w, out as ("d", dtype, ptr, shape, strides)
        M, N, K = args[8], args[9], args[10]
        dtype_of = lambda a: getattr(torch, a[1])
        key = hopper.config_key(M, N, K, dtype_of(descs[0]), args[4].dtype, args[7].dtype, constexprs)
        config = hopper._CHOSEN.get(key)
        if config is None:
            return None
        desc_blocks = list(hopper.descriptor_blocks(config, constexprs["Y_KN"]))
        args[:3] = [TensorDescriptor(_StandIn(dtype_of(d), d[2]), list(d[3]), list(d[4]), block)
                    for d, block in zip(descs, desc_blocks)]
        constexprs = {**constexprs, **config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}
    entry = launcher.cached(args, constexprs)
    if entry is None:
        return None
    kernel, tail, meta = entry
    backend = launcher.fn.device_caches[driver.active.get_current_device()][3]
    types = [native_specialize_impl(backend, a, *flags)[0] for a, *flags in zip(args, *launcher.flags)]
    src = getattr(kernel, "src", None)
    if src is not None:  # a real compiled kernel: its signature is what the JIT made of these specialisations
        compiled = [src.signature[p.name] for p in launcher.fn.params[:launcher.n_runtime]]
        if compiled != types:
            raise RuntimeError(f"{launcher.fn.__name__}: compiled signature {compiled} != specialisation {types}")
    if hasattr(kernel, "_init_handles"):
        kernel._init_handles()  # loads the binary: kernel.function is its CUfunction
    md = kernel.metadata
    return {"name": launcher.fn.__name__, "function": int(kernel.function or 0), "num_warps": md.num_warps,
            "num_ctas": getattr(md, "num_ctas", 1), "shared": md.shared,
            "launch_cooperative_grid": bool(md.launch_cooperative_grid), "launch_pdl": bool(md.launch_pdl),
            "global_scratch_size": md.global_scratch_size, "profile_scratch_size": md.profile_scratch_size,
            "types": types, "tensordesc_meta": list(getattr(md, "tensordesc_meta", None) or []),
            "desc_blocks": desc_blocks, "meta": {k: int(v) for k, v in meta.items() if isinstance(v, (bool, int))},
            "tail": list(tail), "kernel": kernel}
