"""Launch autotuned Triton kernels without triton's per-call Python after the first call per key.

``kernel[grid](*args)`` on an autotuned kernel runs, every call, the autotuner's Python (a dict of
every argument, its key, the config lookup and merge) and then the JIT's (binding, specialisation,
cache key, global checks): tens of µs of host time, as much as a decode-sized GEMM takes on an H100.
:class:`Launcher` does that once per key: the first call goes through triton as usual (autotuning
and compiling); the compiled kernel it chose is kept, and later calls with the same key go straight
to its C launcher, as Inductor's launchers do.

The key is what selects the config and the binary: the autotune key's values (shape buckets, layout
codes), the constexprs, and the specialisation triton gives each runtime argument, computed with
triton's own ``native_specialize_impl`` (dtypes, 16-byte alignment of pointers, integers equal to 1
or divisible by 16, i32 vs i64, descriptor shapes): a launch never reuses a binary compiled for other
assumptions. A config with a pre_hook is never cached (none of the package's has one): it goes through triton.
Under TRITON_INTERPRET=1 (CPU tensors) every call goes through triton: there is no binary.
"""
from __future__ import annotations

import os
from itertools import repeat

import torch
import triton
from triton import knobs
from triton._C.libtriton import native_specialize_impl
from triton.runtime.driver import driver

from ..backends import CaptureError

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


class Launcher:
    """Wraps one Triton kernel (``triton.autotune``-d or plain ``triton.jit``) whose runtime parameters
    all precede its constexprs.

    ``launcher(grid, args, constexprs)``: ``args`` are the runtime arguments in parameter order,
    ``constexprs`` the caller's constexpr values by name (an autotuned config adds the tuned ones),
    ``grid`` a callable of the meta-parameters (constexprs + config) or a tuple.
    """

    def __init__(self, tuner):
        self.tuner = tuner
        if _INTERPRET:  # interpreted kernels: every call goes through triton (there is no binary)
            return
        fn = tuner
        while not isinstance(fn, triton.runtime.JITFunction):  # autotune / heuristics wrappers
            fn = fn.fn
        self.fn = fn
        constexpr = [p.is_constexpr for p in fn.params]
        n_runtime = constexpr.index(True) if True in constexpr else len(constexpr)
        if any(constexpr[:n_runtime]) or not all(constexpr[n_runtime:]):
            raise ValueError(f"{fn.__name__}: Launcher needs every runtime parameter before the constexprs")
        self.n_runtime = n_runtime
        self.constexpr_names = [p.name for p in fn.params[n_runtime:]]
        runtime = fn.params[:n_runtime]
        # What native_specialize_impl takes besides the argument and the backend, one tuple per flag.
        self.flags = (tuple(p.is_const for p in runtime), tuple(not p.do_not_specialize for p in runtime),
                      tuple(not p.do_not_specialize_on_alignment for p in runtime))
        # The autotune key's runtime arguments (its constexpr members are in the constexprs, keyed anyway).
        self.key_args = [i for i in (fn.arg_names.index(k) for k in getattr(tuner, "keys", ())) if i < n_runtime]
        self.cache: dict[tuple, tuple] = {}

    def __call__(self, grid, args: tuple, constexprs: dict):
        if _INTERPRET:
            return self.tuner[grid](*args, **constexprs)
        active = driver.active
        device = active.get_current_device()
        caches = self.fn.device_caches.get(device)
        if caches is None:  # the first launch on this device: triton sets up its caches (and our key's backend)
            return self._through_triton(grid, args, constexprs)
        key = self.key(caches, device, args, constexprs)
        entry = self.cache.get(key)
        if entry is None:
            kernel, config = self._through_triton(grid, args, constexprs), getattr(self.tuner, "best_config", None)
            meta = {**constexprs, **(config.kwargs if config is not None else {})}
            cacheable = kernel is not None and getattr(config, "pre_hook", None) is None
            if cacheable and all(name in meta for name in self.constexpr_names):
                self.cache[key] = (kernel, tuple(meta[name] for name in self.constexpr_names), meta)
            return kernel
        kernel, tail, meta = entry
        grid_xyz = grid(meta) if callable(grid) else grid
        return self._launch(kernel, grid_xyz, active.get_current_stream(device), (*args, *tail))

    def key(self, caches, device, args, constexprs) -> tuple:
        """The cache key of one launch: the autotune key's values, the constexprs and each runtime argument's
        specialisation (``caches``: the JIT's device caches, whose backend specialises)."""
        return (device, *[args[i] for i in self.key_args], *constexprs.values(),
                *map(native_specialize_impl, repeat(caches[3]), args, *self.flags))

    def cached(self, args, constexprs):
        """(compiled kernel, constexpr tail, meta) of a launch with these arguments when an earlier launch with
        the same key went through triton, else None (dylora_kernels/triton/cplan.py reads it: the C++ launcher
        takes the binary that the Python path chose and compiled). ``args`` may be stand-ins with a dtype and
        data_ptr() (specialisation reads nothing else)."""
        device = driver.active.get_current_device()
        caches = self.fn.device_caches.get(device)
        return None if caches is None else self.cache.get(self.key(caches, device, args, constexprs))

    def _through_triton(self, grid, args, constexprs):
        """triton's own launch (autotuning and compiling on first use); the compiled kernel it ran. Never inside
        CUDA-graph capture: autotuning would time configs there, so a launch not seen eagerly raises."""
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            raise CaptureError(f"dylora: {self.fn.__name__} would compile or autotune for a new specialisation during "
                               "CUDA-graph capture; run the same step once eagerly (a warm-up) before capturing")
        kernel = self.tuner[grid](*args, **constexprs)
        return kernel.result() if hasattr(kernel, "result") else kernel  # an asynchronous compilation

    @staticmethod
    def _launch(kernel, grid, stream, all_args):
        x, y, z = (*grid, 1, 1)[:3]
        # Profiler hooks (e.g. proton): passed only when some are installed (triton 3.6 keeps an always
        # present, usually empty, HookChain there; the C launcher skips None).
        enter, leave = knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook
        enter = enter if getattr(enter, "calls", enter) else None
        leave = leave if getattr(leave, "calls", leave) else None
        metadata = kernel.launch_metadata(grid, stream, *all_args) if enter is not None else None
        kernel.run(x, y, z, stream, kernel.function, kernel.packed_metadata, metadata, enter, leave, *all_args)
        return kernel
