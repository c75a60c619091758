"""``python -m dylora_kernels info``: what was built and what runs here.

Prints the versions (package, torch, CUDA, triton), the C++ extension (missing, CPU build or GPU build, and for
the GPU build the architectures compiled), which CUDA path serves CUDA tensors (the C++ executor, or Python), the
GPU seen (name, compute capability, whether the build covers it) and the backends that can run on it.
"""
from __future__ import annotations

import importlib.util
import os

import torch


def _archs_cover(archs: str, major: int, minor: int) -> bool:
    """Whether a TORCH_CUDA_ARCH_LIST-style list ("8.0;8.6;9.0a", "+PTX" suffixes) has code for sm_<major><minor>:
    the same major with an equal or lower minor runs (binary compatibility within a major), PTX runs on anything
    newer."""
    for entry in archs.replace(" ", ";").split(";"):
        if not entry:
            continue
        ptx = entry.endswith("+PTX")
        version = entry.removesuffix("+PTX").rstrip("a")
        a_major, a_minor = (int(v) for v in version.split("."))
        if (a_major, a_minor) <= (major, minor) and (ptx or a_major == major):
            return True
    return False


def _build_info(name: str) -> str:
    try:
        from . import _build_info
    except ImportError:  # built by an older setup.py
        return "unknown"
    return str(getattr(_build_info, name, "unknown"))


def _archs() -> str:
    return _build_info("CUDA_ARCHS")


def _built_against() -> str:
    return _build_info("TORCH")


def lines() -> list[str]:
    from . import __version__, backends, ops

    triton = "not installed"
    if importlib.util.find_spec("triton") is not None:
        import triton as _triton

        triton = _triton.__version__
    out = [f"dylora_kernels {__version__}",
           f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}), triton {triton}"]
    C = ops._C
    if C is None:
        out.append(f"C++ extension: MISSING ({ops._C_ERROR}); the ops run in Python (Triton and the reference only)")
        cuda_path = "Python (no extension)"
    elif C.CUDA_BUILD:
        out.append(f"C++ extension: GPU build (CPU kernels + CUDA executor; CUDA archs {_archs()}; "
                   f"built against torch {_built_against()})")
        forced = os.environ.get("DYLORA_CUDA_PATH", "cpp") == "python"
        cuda_path = "Python (DYLORA_CUDA_PATH=python)" if forced else "C++ executor (plans per key, no Python per call)"
    else:
        out.append("C++ extension: CPU build (CPU kernels; CUDA calls are routed in Python)")
        cuda_path = "Python (CPU build of the extension)"
    if not torch.cuda.is_available():
        out.append("GPU: none seen by torch")
        runs = [name for name, ok, _ in backends.available_backends("cpu") if ok]
        out.append(f"backends on CPU: {', '.join(runs + ['reference'])}")
        return out
    device = torch.device("cuda", torch.cuda.current_device())
    major, minor = torch.cuda.get_device_capability(device)
    props = torch.cuda.get_device_properties(device)
    covered = "" if C is None or not C.CUDA_BUILD else (
        ", covered by this build" if _archs_cover(_archs(), major, minor)
        else f", NOT covered by this build's archs {_archs()}: rebuild with TORCH_CUDA_ARCH_LIST={major}.{minor}")
    out.append(f"GPU: {props.name}, sm_{major}{minor}, {props.total_memory / 2**30:.0f} GiB, "
               f"{props.multi_processor_count} SMs{covered}")
    out.append(f"CUDA path: {cuda_path}")
    out.append(f"fp32 matmuls: {backends.matmul_precision_key()}; deterministic: {backends.deterministic()}")
    out.append("backends on this GPU:")
    out += [f"  {name:14s} {'yes' if runs else 'no '}  {note}" for name, runs, note in backends.available_backends(device)]
    return out


def main() -> None:
    print("\n".join(lines()))
