"""Launch autotuned Triton kernels without triton's per-call Python after the first call per key.

``kernel[grid](*args)`` on an autotuned kernel runs, every call, the autotuner's Python (a dict of
every argument, its key, the config lookup and merge) and then the JIT's (binding, specialisation,
cache key, global checks): tens of µs of host time, as much as a decode-sized GEMM takes on an H100.
:class:`Launcher` does that once per key: the first call goes through triton as usual (autotuning
and compiling); the compiled kernel it chose is kept, and later calls with the same key go straight
to its C launcher, as Inductor's launchers do.

The key is the caller's (dtypes, shape buckets, constexprs: what selects the config) plus the
specialisation triton gives each runtime argument, computed with triton's own
``native_specialize_impl`` (pointer dtype and 16-byte alignment, integers equal to 1 or divisible
by 16, i32 vs i64): a launch never reuses a binary compiled for other assumptions.
Under TRITON_INTERPRET=1 (CPU tensors) every call goes through triton: there is no binary.
"""
from __future__ import annotations

import os

import triton

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


class Launcher:
    """Wraps one ``triton.autotune``-d kernel whose runtime parameters all precede its constexprs.

    ``launcher(grid, args, constexprs, key)``: ``args`` are the runtime arguments in parameter
    order, ``constexprs`` the caller's constexpr values by name (the config adds the tuned ones),
    ``grid`` a callable of the meta-parameters (constexprs + config) or a tuple, ``key`` what else
    distinguishes calls that may choose different configs (the autotune key is derived from args,
    so passing it again is cheap insurance).
    """

    def __init__(self, tuner):
        self.tuner = tuner
        fn = tuner.fn
        while not isinstance(fn, triton.runtime.JITFunction):  # heuristics/autotune wrappers
            fn = fn.fn
        self.fn = fn
        constexpr = [p.is_constexpr for p in fn.params]
        n_runtime = constexpr.index(True) if True in constexpr else len(constexpr)
        if any(constexpr[:n_runtime]) or not all(constexpr[n_runtime:]):
            raise ValueError(f"{fn.__name__}: Launcher needs every runtime parameter before the constexprs")
        self.n_runtime = n_runtime
        self.constexpr_names = [p.name for p in fn.params[n_runtime:]]
        self.flags = [(p.is_const, not p.do_not_specialize, not p.do_not_specialize_on_alignment)
                      for p in fn.params[:n_runtime]]
        self.cache: dict[tuple, tuple] = {}

    def specialisation(self, backend, args) -> tuple:
        """What triton specialises each runtime argument on (the same native function the JIT calls)."""
        from triton._C.libtriton import native_specialize_impl
        return tuple(native_specialize_impl(backend, arg, *flags)
                     for arg, flags in zip(args, self.flags))

    def __call__(self, grid, args: tuple, constexprs: dict, key: tuple = ()):
        if _INTERPRET:
            return self.tuner[grid](*args, **constexprs)
        from triton.runtime.driver import driver
        device = driver.active.get_current_device()
        caches = self.fn.device_caches.get(device)
        full_key = None
        if caches is not None:  # known device: look for a kernel compiled for exactly these arguments
            full_key = (device, key, self.specialisation(caches[3], args))
            entry = self.cache.get(full_key)
            if entry is not None:
                kernel, tail, meta = entry
                grid_xyz = grid(meta) if callable(grid) else grid
                return self._launch(kernel, grid_xyz, driver.active.get_current_stream(device), (*args, *tail))
        kernel = self.tuner[grid](*args, **constexprs)  # autotunes and compiles on first use
        if hasattr(kernel, "result"):  # an asynchronous compilation
            kernel = kernel.result()
        if full_key is None:
            full_key = (device, key, self.specialisation(self.fn.device_caches[device][3], args))
        config = getattr(self.tuner, "best_config", None)
        meta = {**constexprs, **(config.kwargs if config is not None else {})}
        if all(name in meta for name in self.constexpr_names):
            self.cache[full_key] = (kernel, tuple(meta[name] for name in self.constexpr_names), meta)
        return kernel

    @staticmethod
    def _launch(kernel, grid, stream, all_args):
        from triton import knobs
        x, y, z = (*grid, 1, 1)[:3]
        # Profiler hooks (e.g. proton): passed only when some are installed (triton 3.6 keeps an always
        # present, usually empty, HookChain there; the C launcher skips None).
        enter, leave = (hook if getattr(hook, "calls", hook) else None
                        for hook in (knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook))
        metadata = kernel.launch_metadata(grid, stream, *all_args) if enter is not None else None
        kernel.run(x, y, z, stream, kernel.function, kernel.packed_metadata, metadata, enter, leave, *all_args)
        return kernel
