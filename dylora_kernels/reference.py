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
This module is also the "naive slicing" baseline of the benchmarks: it is deliberately simple.
"""
from __future__ import annotations

import math

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


def dylora_linear(x: Tensor, weight: Tensor | None, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
                  rank: int | Tensor, alpha: float, frozen_prefix: bool = False, *, base: Tensor | None = None) -> Tensor:
    """Naive-slicing DyLoRA linear (``weight=None``: the low-rank term alone, plus ``base`` if given).
    ``rank``: an int, a 0-d integer tensor, or one rank per row of ``x.reshape(-1, K)``. No validation
    here: callers pass valid inputs (see ``ops.dylora_linear``)."""
    out = F.linear(x, weight, bias) if weight is not None else None
    if weight is None and bias is not None:
        out = bias.expand(*x.shape[:-1], bias.shape[0])
    if base is not None:
        out = base if out is None else out + base
    x_lr = x.to(lora_A.dtype)
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
