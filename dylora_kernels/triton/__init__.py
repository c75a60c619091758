"""The Triton backend of the dylora ops: the kernel contract (CUDA tensors; CPU tensors under TRITON_INTERPRET=1).

    forward(x, weight, bias, base, lora_A, lora_B, rank, alpha, need_u, variant="pointer", precision=None,
            tuned=True, dropout_p=0.0, dropout_seed=None) -> (y, u)
    backward(grad, x, weight, lora_A, lora_B, u, rank, alpha, frozen_prefix, compute_dx, compute_lora,
             variant="pointer", precision=None, tuned=True, dropout_p=0.0, dropout_seed=None) -> (dx, dA, dB)
    variants(op, x, weight, lora_A, lora_B) -> the variants that can run for these inputs ("pointer" always)

x (M, K) and grad (M, N) are 2-D with any strides; weight (N, K) or None; bias (N,) or None; base (M, N) or None
(added to y in the same kernel); lora_A (R, K) and lora_B (N, R) with any strides, read in place. x, weight, bias,
base share one dtype D ∈ {fp16, bf16, fp32}; lora_A and lora_B share one dtype Da (may differ from D). y and dx
are in D, u in fp32 (M, R) (zero beyond each row's rank), dA and dB in Da. ``rank`` is an integer tensor on x's
device (any integer dtype), 0-d or (M,): rows whose rank is outside [1, R] get NaN in y, u and dx and make dA/dB NaN.

``precision`` ("ieee" / "tf32"; None: "tf32", triton's default) is how dots with fp32 operands run on the GPU
(the kernels' PRECISION constexpr; the interpreter computes them in fp32 either way); ``tuned=False`` runs fixed
configs (the first that fits per shape bucket, nothing timed: deterministic results).

Adapter dropout (``dropout_p`` > 0, ``dropout_seed`` a 0-d integer tensor on x's device, read on the device): the
low-rank term sees x ⊙ keep with ``reference.dropout_keep``'s mask, generated inside the kernels that read x for
it (``kernels._dropout_keep``: Philox4x32-10, ``tl.randint4x``) and regenerated in the backward — no mask tensor,
no extra pass over x. The kernels select (x kept exactly) and the wrappers fold 1/(1 − p) into alpha:
alpha_eff = alpha/(1 − p). Forward: u = (x ⊙ keep)·A[:b]ᵀ (the shrink; the decode kernel's in-loop u), y's GEMM
sees x. Backward: v = g·B[:, :b] (no mask), dx = g·W + keep ⊙ ((alpha_eff/b)·v·A[:b]) (the fused kernel masks its
low-rank seed tile), dA = (alpha_eff/b)·vᵀ·(x ⊙ keep) (the split-M gradient or the frozen GEMV mask x's tiles),
dB = (alpha_eff/b)·gᵀ·u (u is masked already). u is the masked one, as the op's contract says. The "tma" variant
needs nothing in the forward (u comes from the shrink); its backward runs dx through the pointer kernel when
dropout is on (the TMA kernel has no mask on its seed tile).

Variants: "pointer" (pointer-based tiles, any GPU and the interpreter); "decode" (forward, M ≤ 16: one launch);
"tma" (sm_90+, fp16/bf16, TMA-aligned x and weight: a persistent TMA GEMM for y and dx). The backward's "tma"
falls back to the pointer kernel for dx when grad is not TMA-aligned (``variants`` cannot see grad).

Launches per call: forward = shrink + fused GEMM ("pointer", "tma") or one decode kernel; backward = the shrink of
g (v, and in frozen-prefix mode with one rank also dB's column), the dx GEMM, then dA and dB as split-M partials
plus a fixed-order reduction (deterministic) — GEMV-shaped for frozen prefix with one rank.

``dylora_kernels.ops`` imports this package lazily, so importing dylora_kernels never imports triton.
"""
from __future__ import annotations

import contextlib

import torch

from . import hopper, kernels

__all__ = ["forward", "backward", "variants"]


_SAME_DEVICE = contextlib.nullcontext()


def _device_of(x: torch.Tensor):
    """Triton launches on the current CUDA device: a context that makes it x's (nothing to switch when it
    already is, and on CPU)."""
    if x.is_cuda and x.device.index != torch.cuda.current_device():
        return torch.cuda.device(x.device)
    return _SAME_DEVICE


def variants(op: str, x, weight, lora_A, lora_B) -> list[str]:
    """The variants of ``op`` ("forward" or "backward") that can run for these inputs, "pointer" first."""
    M, K = x.shape
    N, R = lora_B.shape
    out = ["pointer"]
    if op == "forward":
        if 1 <= M <= kernels.DECODE_MAX_M and R <= kernels.DECODE_MAX_R:
            out.append("decode")
        if hopper.applies(x, weight, N):
            out.append("tma")
    elif op == "backward":
        # dx = g·W through TMA; g is not an argument here: judged as a contiguous (M, N) tensor of x's dtype
        # (backward() checks the real one and falls back to the pointer kernel).
        if hopper.applies_dx(x, weight):
            out.append("tma")
    else:
        raise ValueError(f"op must be 'forward' or 'backward', got {op!r}")
    return out


def forward(x, weight, bias, base, lora_A, lora_B, rank, alpha, need_u, variant="pointer", precision=None,
            tuned=True, dropout_p=0.0, dropout_seed=None):
    """(y, u): y = x·Wᵀ + bias + base + (alpha/b_m)·u·B[:, :b_m]ᵀ in x's dtype, u = x·A[:b_m]ᵀ fp32 (M, R);
    u is an empty tensor unless need_u (the op's contract; "pointer" and "tma" compute it anyway). With dropout_p,
    u = (x ⊙ keep)·A[:b_m]ᵀ and alpha is alpha/(1 − p)."""
    dropout = kernels.dropout_args(dropout_p, dropout_seed)
    if dropout is not None:
        alpha = alpha / (1.0 - dropout_p)
    M, N, R = x.shape[0], lora_B.shape[0], lora_A.shape[0]
    rank = rank.contiguous()  # per-row ranks are read at rank_ptr + m
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    with _device_of(x):
        if variant == "decode":
            u = torch.empty(M, R, device=x.device, dtype=torch.float32) if need_u else None
            kernels.decode_linear(x, weight, bias, base, lora_A, lora_B, rank, alpha, y, u, precision, tuned,
                                  dropout=dropout)
            return y, (u if need_u else x.new_empty(0, dtype=torch.float32))
        u = torch.empty(M, R, device=x.device, dtype=torch.float32)
        kernels.shrink(x, lora_A, rank, u, precision=precision, tuned=tuned, dropout=dropout)
        if variant == "tma" and weight is not None:
            hopper.fused_linear(x, weight, False, bias, base, u, lora_B, rank, alpha, y, tuned, precision)
        else:
            kernels.fused_linear(x, weight, bias, base, u, lora_B, rank, alpha, y, precision, tuned)
    return y, (u if need_u else u.new_empty(0))


def backward(grad, x, weight, lora_A, lora_B, u, rank, alpha, frozen_prefix, compute_dx, compute_lora,
             variant="pointer", precision=None, tuned=True, dropout_p=0.0, dropout_seed=None):
    """(dx, dA, dB): dx = g·W + (alpha/b_m)·v·A[:b_m] with v = g·B[:, :b_m] (empty unless compute_dx); dA and dB
    on the trained slots (< b_m, or b_m - 1 in frozen-prefix mode), exactly zero elsewhere (empty unless
    compute_lora). u is the forward's (M, R) fp32 intermediate (masked already under dropout). With dropout_p, x's
    mask multiplies dx's low-rank part and x in dA, and alpha is alpha/(1 − p)."""
    dropout = kernels.dropout_args(dropout_p, dropout_seed)
    if dropout is not None:
        alpha = alpha / (1.0 - dropout_p)
    (M, K), (N, R) = x.shape, lora_B.shape
    dx, dA, dB = x.new_empty(0), lora_A.new_empty(0), lora_B.new_empty(0)  # what is not asked for comes back empty
    if not (compute_dx or compute_lora):
        return dx, dA, dB
    rank = rank.contiguous()
    device = x.device
    # Frozen prefix with one rank trains one slot: dB's column is folded into the pass over g that computes v,
    # dA's row is a GEMV over x.
    one_slot = bool(frozen_prefix) and rank.dim() == 0 and compute_lora
    with _device_of(x):
        v = torch.empty(M, R, device=device, dtype=torch.float32)
        fold = torch.empty(kernels.cdiv(M, 16), N, device=device, dtype=torch.float32) if one_slot else None
        n_fold = kernels.shrink(grad, lora_B.t(), rank, v, fold_u=u if one_slot else None, fold=fold,
                                precision=precision, tuned=tuned)
        if compute_dx:
            dx = torch.empty(M, K, device=device, dtype=x.dtype)
            if variant == "tma" and weight is not None and dropout is None and hopper.applies(grad, weight, K):
                hopper.fused_linear(grad, weight, True, None, None, v, lora_A.t(), rank, alpha, dx, tuned, precision)
            else:
                kernels.fused_linear(grad, None if weight is None else weight.t(), None, None, v, lora_A.t(), rank,
                                     alpha, dx, precision, tuned, dropout=dropout)
        if compute_lora:
            dA = torch.empty(R, K, device=device, dtype=lora_A.dtype)
            dB = torch.empty(N, R, device=device, dtype=lora_B.dtype)
            if one_slot:
                kernels.frozen_grad(v, x, rank, alpha, dA, tuned, dropout=dropout)
                kernels.finish(fold, n_fold, rank, alpha, True, dB.t())
            else:
                kernels.lora_grad(v, x, rank, alpha, frozen_prefix, dA, precision, tuned, dropout=dropout)
                # dBᵀ[j, n] = Σ_m s_m·u[m, j]·g[m, n]
                kernels.lora_grad(u, grad, rank, alpha, frozen_prefix, dB.t(), precision, tuned)
    return dx, dA, dB

