"""Builds the C++ CPU kernels (csrc/) as dylora_kernels._C with torch's cpp_extension and ninja.

Install with ``pip install --no-build-isolation .`` (or ``-e .``) into an environment that already has
torch: with build isolation pip would fetch a second, multi-GB torch just to compile against.
"""
from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

setup(
    ext_modules=[
        CppExtension(
            "dylora_kernels._C",
            sources=["csrc/dylora.cpp", "csrc/conv.cpp"],
            extra_compile_args={"cxx": ["-O3", "-std=c++17"]},
        )
    ],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
