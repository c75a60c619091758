"""Builds dylora_kernels._C with torch's cpp_extension and ninja.

    CPU build   csrc/*.cpp                          (torch without CUDA, or no nvcc, or DYLORA_BUILD_CUDA=0)
    GPU build   csrc/*.cpp + csrc/cuda/*.{cpp,cu}   (torch with CUDA and nvcc found, or DYLORA_BUILD_CUDA=1),
                compiled with WITH_CUDA for TORCH_CUDA_ARCH_LIST (default: sm_80, sm_86, sm_89, sm_90a)

Install with ``pip install --no-build-isolation .`` (or ``-e .``) into an environment that already has torch:
with build isolation pip would fetch a second, multi-GB torch just to compile against. The C++ standard is the
one torch's cpp_extension picks for the torch it builds against (C++17 up to torch 2.13, C++20 from 2.14).
The GPU build links no libcuda (driver functions are reached through cudaGetDriverEntryPoint), so it
compiles on a machine without a GPU or driver.
"""
import glob
import os
import shutil

import torch
from setuptools import setup


def _toolkit_home() -> str | None:
    """The CUDA toolkit when neither CUDA_HOME nor CUDA_PATH names it. torch takes the parent of the first nvcc on
    PATH, which is wrong for a wrapper script (e.g. /usr/local/bin/nvcc exec-ing /usr/local/cuda-13.0/bin/nvcc):
    take the first candidate that has the runtime headers."""
    nvcc = shutil.which("nvcc")
    candidates = [os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))] if nvcc else []
    for home in [*candidates, "/usr/local/cuda"]:
        if os.path.isfile(os.path.join(home, "include", "cuda_runtime_api.h")):
            return home
    return None


if not os.environ.get("CUDA_HOME") and not os.environ.get("CUDA_PATH") and _toolkit_home():
    os.environ["CUDA_HOME"] = _toolkit_home()  # before cpp_extension reads it

from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402

DEFAULT_ARCHS = "8.0;8.6;8.9;9.0a"


def build_cuda() -> bool:
    forced = os.environ.get("DYLORA_BUILD_CUDA", "")
    if forced not in ("", "0", "1"):
        raise SystemExit(f"DYLORA_BUILD_CUDA must be 0 or 1 (or unset: automatic), got {forced!r}")
    found = torch.version.cuda is not None and CUDA_HOME is not None
    if forced == "1" and not found:
        raise SystemExit(f"DYLORA_BUILD_CUDA=1 needs a CUDA build of torch (this one: {torch.__version__}) and "
                         f"nvcc (CUDA_HOME: {CUDA_HOME})")
    return found if forced == "" else forced == "1"


def cuda_library_includes() -> list[str]:
    """Headers ATen's CUDA headers include that a toolkit install may lack (cusparse.h, ...): the nvidia-*
    wheels torch depends on ship them (nvidia/cu13/include, or nvidia/<lib>/include on CUDA 12). Passed as
    -isystem, so they are searched after the toolkit's own headers."""
    try:
        import nvidia
    except ImportError:
        return []
    found = []
    for root in nvidia.__path__:
        found += sorted(glob.glob(os.path.join(root, "cu*", "include")) + glob.glob(os.path.join(root, "*", "include")))
    return [d for d in found if os.path.isdir(d)]


sources = sorted(glob.glob("csrc/*.cpp"))
if build_cuda():
    system_includes = [flag for d in cuda_library_includes() for flag in ("-isystem", d)]
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
    extension = CUDAExtension(
        "dylora_kernels._C",
        sources=sources + sorted(glob.glob("csrc/cuda/*.cpp") + glob.glob("csrc/cuda/*.cu")),
        define_macros=[("WITH_CUDA", None)],
        include_dirs=[os.path.abspath("csrc")],
        extra_compile_args={"cxx": ["-O3", *system_includes], "nvcc": ["-O3", *system_includes]},
    )
else:
    extension = CppExtension("dylora_kernels._C", sources=sources, include_dirs=[os.path.abspath("csrc")],
                             extra_compile_args={"cxx": ["-O3"]})

# What `python -m dylora_kernels info` reports about this build (generated; not tracked by git).
with open(os.path.join("dylora_kernels", "_build_info.py"), "w") as f:
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "") if build_cuda() else ""
    f.write(f'"""Written by setup.py."""\nCUDA_BUILD = {build_cuda()!r}\nCUDA_ARCHS = {archs!r}\nTORCH = {torch.__version__!r}\n')

setup(ext_modules=[extension], cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)})
