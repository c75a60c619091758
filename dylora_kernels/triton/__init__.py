"""The Triton backend of the dylora ops (CUDA tensors; CPU tensors under TRITON_INTERPRET=1).

``dylora_kernels.ops`` imports this package lazily, so importing dylora_kernels never imports triton.
"""
from .kernels import backward, forward

__all__ = ["forward", "backward"]
