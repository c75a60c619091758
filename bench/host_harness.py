"""Run the CUDA path's Python on CPU tensors with the GPU launches stubbed: its host time, measured without a GPU.

On a GPU, a decode-sized call's speed is its host time (Python, validation, routing, allocations, launches).
That time is the same Python on any machine, so it is measured here on CPU tensors: the op, the router
(backends.py), the Triton wrappers and launch.py's fast path all run as they run on CUDA; only three things
are replaced, and they are what this harness cannot run without a GPU:

- triton's active driver (current device 0, stream 0);
- the compiled kernel: a stub whose C launcher call does nothing (on a GPU, triton's C launcher: ~2–5 µs);
- the first launch per key (autotuning and compiling): it records the stub and the autotuner's first config.

Tensors are allocated on the CPU (a CUDA caching-allocator call costs about as much). What this misses, then:
the C launcher, the driver queries and, for tensors on a GPU other than the current one, the device switch.

    with stubbed_gpu_launches() as log:
        torch.ops.dylora.linear(x, w, None, None, A, B, rank, 1.0, False, "triton")
    log.first   # kernel names whose launch went through triton (the first per launcher key)
    log.runs    # (kernel name, grid, arguments) of every stubbed launch of a compiled kernel
"""
from __future__ import annotations

import contextlib
from types import SimpleNamespace
from unittest import mock


class LaunchLog:
    def __init__(self):
        self.first: list[str] = []
        self.runs: list[tuple[str, tuple, tuple]] = []

    def clear(self):
        self.first.clear()
        self.runs.clear()


class _StubKernel:
    """A compiled kernel whose launch does nothing but note it (with ``record``). Its metadata is what a
    compiled kernel's holds, as far as the C++ launcher's plans read it (dylora_kernels/triton/cplan.py):
    no binary (function 0), no shared memory, no scratch; TMA descriptor metadata with the descriptors'
    block shapes (swizzle and element type 0: nothing encodes them here)."""
    function = packed_metadata = None

    def __init__(self, name: str, log: LaunchLog, record: bool, num_warps: int = 4, descriptors=()):
        self.name, self.log, self.record = name, log, record
        self.metadata = SimpleNamespace(
            num_warps=num_warps, num_ctas=1, shared=0, launch_cooperative_grid=False, launch_pdl=False,
            global_scratch_size=0, profile_scratch_size=0,
            tensordesc_meta=[{"swizzle": 0, "elem_size": d.base.dtype.itemsize, "elem_type": 0,
                              "block_size": list(d.block_shape), "fp4_padded": False} for d in descriptors])

    def run(self, x, y, z, stream, function, packed_metadata, metadata, enter, leave, *args):
        if self.record:
            self.log.runs.append((self.name, (x, y, z), args))

    def launch_metadata(self, *args):
        return None


class _StubDriver:
    def get_current_device(self):
        return 0

    def get_current_stream(self, device):
        return 0


@contextlib.contextmanager
def stubbed_gpu_launches(record: bool = False):
    """Inside: Triton backends run on CPU tensors through launch.py's compiled-kernel path, launches stubbed;
    yields a LaunchLog (``runs`` filled only with ``record``: timing leaves it off)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.runtime.driver import driver

    from dylora_kernels import backends
    from dylora_kernels.triton import hopper, kernels, launch

    if launch._INTERPRET:
        raise RuntimeError("unset TRITON_INTERPRET: the harness times the compiled-kernel path, not the interpreter")
    backend = CUDABackend(GPUTarget("cuda", 90, 32))
    launchers = [*kernels._launch.values(), hopper._LAUNCH]

    log = LaunchLog()

    def first_launch(self, grid, args, constexprs):  # what triton's autotuning + compile would leave behind
        num_warps = constexprs.get("num_warps", 4)
        if hasattr(self.tuner, "configs"):
            self.tuner.best_config = self.tuner.configs[0]
            num_warps = self.tuner.best_config.num_warps
        log.first.append(self.fn.__name__)
        descriptors = [a for a in args if hasattr(a, "block_shape")]
        return _StubKernel(self.fn.__name__, log, record, num_warps, descriptors)

    saved = {id(l.fn): dict(l.fn.device_caches) for l in launchers}
    active = driver._active  # None until first used (no GPU driver here: reset_active would raise)
    driver.set_active(_StubDriver())
    try:
        for l in launchers:
            l.fn.device_caches[0] = (None, None, None, backend, None)  # caches[3]: the backend that specialises
            l.cache.clear()
        with mock.patch.object(launch.Launcher, "_through_triton", first_launch), \
                mock.patch.object(backends, "_interpreting", lambda: True), \
                mock.patch.object(hopper, "_device_has_tma", lambda device: True):
            backends._CHOSEN.clear()
            yield log
    finally:
        backends._CHOSEN.clear()
        driver._active = active
        for l in launchers:
            l.fn.device_caches.clear()
            l.fn.device_caches.update(saved[id(l.fn)])
            l.cache.clear()
