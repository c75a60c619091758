"""The DyLoRA math in plain PyTorch (naive slicing): the one statement every backend is tested against.

    u = x · A[:b]ᵀ                          (M, b)
    y = x · Wᵀ + bias + base + (alpha / b) · u · B[:, :b]ᵀ      (weight, bias and base optional)

Autograd supplies the backward. In frozen-prefix mode the rows of A (columns of B) below b-1 are
detached, as in the official implementation (huawei-noah loralib ``DyLoRA.py``), so only row b-1
of dA and column b-1 of dB receive gradient. The scale alpha/b enters the product u·B[:, :b]ᵀ as the
GEMM's alpha (``torch.addmm``): applied to the product's accumulator in the forward and, in autograd's
backward, after each contraction (alpha·(g·B), alpha·(uᵀ·g)), never to a 16-bit operand first; so no
intermediate overflows where the result does not (in fp16, alpha·g alone overflows for alpha = 3e4).

With a per-row rank tensor (one rank b_m per row of the flattened x) row m uses A[:b_m], B[:, :b_m]
and alpha / b_m: the low-rank term is computed over the first max_m b_m slots (slots no row uses are
never read) with per-row masks that select, not multiply, so a NaN in a slot a row does not use never
reaches that row; 1/b_m divides u (it only shrinks it) and alpha enters the product as above. Adapters
in another dtype than x (float32 adapters on a bfloat16 model) compute the low-rank term in their
dtype, as PEFT does, and the result is cast to x's dtype.
Adapter dropout (PEFT's ``lora_dropout``): the base sees x, the low-rank term sees dropout(x) =
x ⊙ keep / (1 − p). The mask is a pure function of (seed, M, K, p), so every backend regenerates the
same one in the backward instead of storing it (``dropout_keep`` below: the one definition):

    element (m, k) of x (M, K), e = m·K + k; c = e >> 2 (64-bit)
    (r0, r1, r2, r3) = Philox4x32-10(counter = (c mod 2³², c >> 32, 0, 0), key = (seed mod 2³², seed >> 32))
    keep[m, k] = r_{e mod 4} >= threshold(p),   threshold(p) = floor(p · 2³²)

Philox as triton's ``tl.randint4x(seed, c)`` computes it: one Philox call serves 4 consecutive elements.
The kernels apply the 0/1 mask to x's tiles (exact in any dtype) and fold 1/(1 − p) into α.

This module is also the "naive slicing" baseline of the benchmarks: it is deliberately simple.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def rank_masks(rank: Tensor, r_max: int, frozen_prefix: bool) -> tuple[Tensor, Tensor]:
    """Per-row boolean masks over the r_max rank slots, each (M, r_max).

    Returns ``(used, trained)``: ``used[m, j] = j < b_m`` selects the slots row m uses in the forward;
    ``trained`` selects the slots that receive gradient: ``used`` in full mode, the single slot
    ``b_m - 1`` in frozen-prefix mode.
    """
    slots = torch.arange(r_max, device=rank.device)
    b = rank.reshape(-1, 1).long()
    used = slots < b
    return used, ((slots == b - 1) if frozen_prefix else used)


_PHILOX_ROUND = (0xD2511F53, 0xCD9E8D57)  # multipliers A, B
_PHILOX_KEY = (0x9E3779B9, 0xBB67AE85)    # key increments (the Weyl sequence)
_MASK32 = np.uint64(0xFFFFFFFF)


def philox4x32(counter: np.ndarray, seed: int, rounds: int = 10) -> tuple[np.ndarray, ...]:
    """Philox4x32-``rounds`` (Salmon et al., SC'11) of the 64-bit counters ``counter`` (uint64 array, as
    (lo, hi, 0, 0)) under key (seed mod 2³², seed >> 32): four uint32 arrays, bit for bit what triton's
    ``tl.randint4x(seed, counter)`` returns."""
    c0, c1 = counter & _MASK32, counter >> np.uint64(32)
    c2 = c3 = np.zeros_like(counter)
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    k0, k1 = np.uint64(seed & 0xFFFFFFFF), np.uint64(seed >> 32)
    A, B = np.uint64(_PHILOX_ROUND[0]), np.uint64(_PHILOX_ROUND[1])
    for _ in range(rounds):
        prod_b, prod_a = B * c2, A * c0  # exact: both factors < 2³²
        c0, c1, c2, c3 = ((prod_b >> np.uint64(32)) ^ c1 ^ k0, prod_b & _MASK32,
                          (prod_a >> np.uint64(32)) ^ c3 ^ k1, prod_a & _MASK32)
        k0 = (k0 + np.uint64(_PHILOX_KEY[0])) & _MASK32
        k1 = (k1 + np.uint64(_PHILOX_KEY[1])) & _MASK32
    return c0, c1, c2, c3


def dropout_threshold(p: float) -> int:
    """The integer threshold of drop probability p in [0, 1): an element is kept when its uint32 draw is at
    least floor(p·2³²) (keep probability 1 − p within 2⁻³²)."""
    return int(p * 4294967296.0)


def dropout_keep(seed: int, M: int, K: int, p: float, device: torch.device | str = "cpu") -> Tensor:
    """The (M, K) bool keep-mask of adapter dropout for x (M, K) under ``seed`` (see the module docstring)."""
    e = np.arange(M * K, dtype=np.uint64)
    draws = np.stack(philox4x32(e >> np.uint64(2), seed), axis=-1)  # (M·K, 4)
    r = np.take_along_axis(draws, (e & np.uint64(3)).astype(np.int64)[:, None], axis=1)[:, 0]
    return torch.from_numpy(r >= dropout_threshold(p)).reshape(M, K).to(device)


def dropped(x: Tensor, p: float, seed) -> Tensor:
    """dropout(x) = x ⊙ keep / (1 − p) with the mask of x.reshape(-1, K) (x unchanged for p = 0)."""
    if p == 0:
        return x
    K = x.shape[-1]
    keep = dropout_keep(int(seed), x.numel() // max(K, 1), K, p, x.device).reshape(x.shape)
    return torch.where(keep, x, x.new_zeros(())) * (1.0 / (1.0 - p))


def dylora_linear(x: Tensor, weight: Tensor | None, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
                  rank: int | Tensor, alpha: float, frozen_prefix: bool = False, *, base: Tensor | None = None,
                  dropout_p: float = 0.0, dropout_seed=None) -> Tensor:
    """Naive-slicing DyLoRA linear (``weight=None``: the low-rank term alone, plus ``base`` if given).
    ``rank``: an int, a 0-d integer tensor, or one rank per row of ``x.reshape(-1, K)``. With ``dropout_p`` > 0
    the low-rank term sees ``dropped(x, dropout_p, dropout_seed)`` (an int or a 0-d integer tensor seed). No
    validation here: callers pass valid inputs (see ``ops.dylora_linear``)."""
    out = F.linear(x, weight, bias) if weight is not None else None
    if weight is None and bias is not None:
        out = bias.expand(*x.shape[:-1], bias.shape[0])
    if base is not None:
        out = base if out is None else out + base
    x_lr = dropped(x.to(lora_A.dtype), dropout_p, dropout_seed)
    if isinstance(rank, Tensor) and rank.dim() == 1:
        term = _per_row_lora(x_lr, lora_A, lora_B, rank, alpha, frozen_prefix)
    else:
        b = int(rank)
        A_b, B_b = lora_A[:b], lora_B[:, :b]
        if frozen_prefix:  # only row b-1 of A / column b-1 of B is trained
            A_b = torch.cat([A_b[:-1].detach(), A_b[-1:]], dim=0)
            B_b = torch.cat([B_b[:, :-1].detach(), B_b[:, -1:]], dim=1)
        term = _scaled_product(x_lr @ A_b.t(), B_b, alpha / b)
    term = term.to(x.dtype)
    return term if out is None else out + term


def _scaled_product(u: Tensor, lora_B: Tensor, scale: float) -> Tensor:
    """``scale · u · lora_Bᵀ`` for u (..., r), lora_B (N, r), with the scale as the GEMM's alpha (see above)."""
    rows = math.prod(u.shape[:-1])  # not -1: u may have no elements
    out = torch.addmm(u.new_zeros(()), u.reshape(rows, u.shape[-1]), lora_B.t(), beta=0, alpha=scale)
    return out.view(*u.shape[:-1], lora_B.shape[0])


def _per_row_lora(x: Tensor, lora_A: Tensor, lora_B: Tensor, rank: Tensor, alpha: float,
                  frozen_prefix: bool) -> Tensor:
    """The low-rank term with one rank per row, over the first max_m b_m slots with per-row masks."""
    rows, K = rank.shape[0], x.shape[-1]
    x2 = x.reshape(rows, K)
    width = int(rank.max()) if rows else 0
    A, B = lora_A[:width], lora_B[:, :width]
    used, trained = rank_masks(rank, width, frozen_prefix)
    b = rank.reshape(-1, 1)
    zero = x.new_zeros(())
    low_rank = lambda mask, u, B: _scaled_product(torch.where(mask, u, zero) / b, B, alpha)
    if not frozen_prefix:
        term = low_rank(used, x2 @ A.t(), B)
    else:
        # The value uses every slot < b_m; the gradient to A/B flows through slot b_m-1 only: add the
        # trained path and subtract its frozen twin (zero in value, the one-hot gradient in A and B).
        A_frozen, B_frozen = A.detach(), B.detach()
        u_frozen = x2 @ A_frozen.t()
        term = (low_rank(used, u_frozen, B_frozen)
                + low_rank(trained, x2 @ A.t(), B) - low_rank(trained, u_frozen, B_frozen))
    return term.to(x.dtype).view(*x.shape[:-1], B.shape[0])


def dylora_conv(x: Tensor, weight: Tensor | None, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
                rank: int | Tensor, alpha: float, stride, padding, dilation, frozen_prefix: bool = False, *,
                base: Tensor | None = None) -> Tensor:
    """Naive-slicing DyLoRA convolution (1-, 2- or 3-d by x's rank), ``weight=None``: the low-rank term
    alone (plus bias and ``base``). ``y = conv(x, W) + bias + base + (α/b)·conv1x1(conv(x, A[:b]), B[:, :b])``.
    ``rank``: an int, a 0-d integer tensor, or one rank per sample (x.shape[0]), computed sample by
    sample. No validation here (see ``conv.dylora_conv2d``)."""
    conv = (F.conv1d, F.conv2d, F.conv3d)[x.dim() - 3]
    if isinstance(rank, Tensor) and rank.dim() == 1:
        parts = [dylora_conv(x[n:n + 1], weight, bias, lora_A, lora_B, int(rank[n]), alpha, stride, padding,
                             dilation, frozen_prefix, base=None if base is None else base[n:n + 1])
                 for n in range(x.shape[0])]
        return torch.cat(parts) if parts else conv(x, lora_A[:1], None, stride, padding, dilation)[:, :0]
    b = int(rank)
    A_b, B_b = lora_A[:b], lora_B[:, :b]
    if frozen_prefix:  # only slot b-1 of A and B is trained
        A_b = torch.cat([A_b[:-1].detach(), A_b[-1:]], dim=0)
        B_b = torch.cat([B_b[:, :-1].detach(), B_b[:, -1:]], dim=1)
    x_lr = x.to(lora_A.dtype)
    u = conv(x_lr, A_b, None, stride, padding, dilation)
    term = ((alpha / b) * conv(u, B_b.reshape(*B_b.shape, *[1] * (x.dim() - 2)))).to(x.dtype)
    if weight is not None:
        out = conv(x, weight, bias, stride, padding, dilation)
    elif bias is not None:
        out = bias.reshape(-1, *[1] * (x.dim() - 2)).expand_as(term)
    else:
        out = None
    if base is not None:
        out = base if out is None else out + base
    return term if out is None else out + term
