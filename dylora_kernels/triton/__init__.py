"""The Triton backend of the dylora ops (CUDA tensors; CPU tensors under TRITON_INTERPRET=1).

``dylora_kernels.backends`` imports this package lazily, so importing dylora_kernels never imports triton.
"""
from . import kernels

__all__ = ["forward", "backward", "variants"]


def variants(op, x, weight, lora_A, lora_B) -> list[str]:
    return ["pointer"]


def forward(x, weight, bias, base, lora_A, lora_B, rank, alpha, need_u, variant="pointer"):
    if weight is None or base is not None or lora_A.dtype != x.dtype:
        raise NotImplementedError("the Triton kernels do not take weight=None, base or mixed dtypes yet")
    return kernels.forward(x, weight, bias, lora_A, lora_B, rank, alpha)


def backward(grad, x, weight, lora_A, lora_B, u, rank, alpha, frozen_prefix, compute_dx, compute_lora,
             variant="pointer"):
    dx, dA, dB = kernels.backward(grad, x, weight, lora_A, lora_B, u, rank, alpha, frozen_prefix, compute_dx)
    if not compute_lora:
        dA, dB = lora_A.new_empty(0), lora_B.new_empty(0)
    return dx, dA, dB
