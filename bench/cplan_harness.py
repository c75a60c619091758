"""The C++ Triton launcher (csrc/triton_launch.cpp) beside the Python path, both with the GPU launches stubbed.

Run inside host_harness.stubbed_gpu_launches(record=True) (no TRITON_INTERPRET): ``compare(op, variant, call)``
runs one kernel-contract call through the Python path (twice: the first goes through the stubbed triton and
fills launch.py's caches, the second is recorded), makes the C++ plan of it (cplan.describe) and runs the same
call through the C++ launcher with its recording stub. It returns what differs: every launch's kernel, grid, runtime
arguments (tensors by role: the call's inputs and outputs by name, anything else allocated during the call as
"tmp"), constexpr tail, the packed parameters (what triton's launcher would pass for the compiled signature), the
outputs' shapes, strides and dtypes, and the number of tensors allocated per call. tests/test_triton_launch.py
uses it.
"""
from __future__ import annotations

import struct

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from triton.tools.tensor_descriptor import TensorDescriptor

from dylora_kernels import _C
from dylora_kernels import triton as T
from dylora_kernels.triton import cplan

RECORD_OFF, RECORD_COUNT, RECORD_FULL = 0, 1, 2


def _label(names: dict[int, str]):
    def label(a):
        if isinstance(a, torch.Tensor):
            return names.get(a.data_ptr(), "tmp")
        if isinstance(a, TensorDescriptor):
            return ("desc", names.get(a.base.data_ptr(), "tmp"), tuple(a.shape), tuple(a.strides))
        return a
    return label


def _label_cpp(names: dict[int, str]):
    """C++ records hold data pointers where Python held tensors (which arguments are tensors is known from
    the Python side's launch at the same position)."""
    def label(a, is_tensor):
        if is_tensor:
            return names.get(a, "tmp")
        if isinstance(a, tuple) and a and a[0] == "desc":
            return ("desc", names.get(a[1], "tmp"), a[2], a[3])
        return a
    return label


def _names(inputs: dict, outputs: tuple, output_names: tuple) -> dict[int, str]:
    names = {}
    for name, t in [*inputs.items(), *zip(output_names, outputs)]:
        if isinstance(t, torch.Tensor) and t.numel() > 0:
            names.setdefault(t.data_ptr(), name)
    return names


def expected_packed(types: list[str], args: list) -> list:
    """What triton 3.6's launcher passes for these compiled types and argument values (make_launcher,
    make_tensordesc_arg; pack_fp32), descriptors as (None, shape i32s, strides i64s), then the two scratch
    pointers (None: 0)."""
    out = []
    for ty, a in zip(types, args):
        if ty == "constexpr":
            continue
        if ty.startswith("tensordesc"):
            out += [("tensordesc", None), ("i32", a[2][0]), ("i32", a[2][1]), ("i64", a[3][0]), ("i64", a[3][1])]
        elif ty.startswith("*"):
            out.append(("ptr", a))
        elif ty == "fp32":
            out.append(("fp32", struct.unpack("f", struct.pack("f", a))[0]))
        else:
            out.append((ty, a))
    return out + [("ptr", 0), ("ptr", 0)]


class _CountAllocations(TorchDispatchMode):
    """Counts the tensors allocated through the dispatcher (from Python or C++) while active."""
    ALLOCATING = ("empty.", "empty_strided.", "new_empty.", "new_empty_strided.", "clone.", "contiguous.")

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func).removeprefix("aten.")
        self.count += name.startswith(self.ALLOCATING)
        return func(*args, **(kwargs or {}))


def _allocations(fn) -> tuple[object, int]:
    """(result, tensors fn allocated)."""
    with _CountAllocations() as counter:
        result = fn()
    return result, counter.count


def compare(log, op: str, variant: str, inputs: dict) -> list[str]:
    """What differs between the Python path's launches and the C++ launcher's for one call (see the module
    docstring); [] when nothing does. ``inputs``: the kernel contract's arguments by name (``dropout_p`` and
    ``dropout_seed``, when present, passed by keyword to both paths)."""
    fn = T.forward if op == "forward" else T.backward
    out_names = ("y", "u") if op == "forward" else ("dx", "dA", "dB")
    keywords = ("dropout_p", "dropout_seed")
    args = [v for k, v in inputs.items() if k not in keywords]
    kw = {k: v for k, v in inputs.items() if k in keywords}
    fn(*args, variant=variant, **kw)  # the first call: through (stubbed) triton, fills launch.py's caches
    log.clear()
    py_out, py_allocs = _allocations(lambda: fn(*args, variant=variant, **kw))
    py_runs = list(log.runs)
    plan = _C.triton_plan(cplan.describe(op, variant, *args))
    call = _C.triton_forward if op == "forward" else _C.triton_backward
    _C.triton_record(RECORD_FULL)
    try:
        cpp_out, cpp_allocs = _allocations(lambda: call(plan, *args, **kw))
        records = _C.triton_records()
    finally:
        _C.triton_record(RECORD_OFF)
    if cpp_out is None:
        return ["the C++ launcher did not handle the call"]
    problems = []
    for name, p, c in zip(out_names, py_out, cpp_out):
        if (p.shape, p.stride(), p.dtype) != (c.shape, c.stride(), c.dtype):
            problems.append(f"output {name}: Python {tuple(p.shape)} {p.stride()} {p.dtype}, "
                            f"C++ {tuple(c.shape)} {c.stride()} {c.dtype}")
    if py_allocs != cpp_allocs:
        problems.append(f"allocations per call: Python {py_allocs}, C++ {cpp_allocs}")
    if len(py_runs) != len(records):
        return problems + [f"launches: Python {[r[0] for r in py_runs]}, C++ {[r['name'] for r in records]}"]
    py_names, cpp_names = _names(inputs, py_out, out_names), _names(inputs, cpp_out, out_names)
    for i, ((name, grid, py_args), rec) in enumerate(zip(py_runs, records)):
        n = len(rec["args"])
        label = _label(py_names)
        want = [label(a) for a in py_args[:n]]
        tensors = [isinstance(a, torch.Tensor) for a in py_args[:n]]
        got = [_label_cpp(cpp_names)(a, t) for a, t in zip(rec["args"], tensors)]
        where = f"launch {i} ({name})"
        if name != rec["name"]:
            problems.append(f"{where}: C++ launched {rec['name']}")
        if tuple(grid) != rec["grid"]:
            problems.append(f"{where}: grid Python {grid}, C++ {rec['grid']}")
        if want != got:
            diff = [(j, w, g) for j, (w, g) in enumerate(zip(want, got)) if w != g]
            problems.append(f"{where}: arguments differ (index, Python, C++): {diff}")
        if list(py_args[n:]) != list(rec["tail"]):
            problems.append(f"{where}: constexprs Python {py_args[n:]}, C++ {rec['tail']}")
        if rec["packed"] != expected_packed(rec["types"], rec["args"]):
            problems.append(f"{where}: packed {rec['packed']} != {expected_packed(rec['types'], rec['args'])}")
    return problems
