"""The DyLoRA math in plain PyTorch (naive slicing): the one statement every backend is tested against.

    u = x · A[:b]ᵀ                          (M, b)
    y = x · Wᵀ + bias + (alpha / b) · u · B[:, :b]ᵀ

Autograd supplies the backward. In frozen-prefix mode the rows of A (columns of B) below b-1 are
detached, as in the official implementation (huawei-noah loralib ``DyLoRA.py``), so only row b-1
of dA and column b-1 of dB receive gradient.

With a per-row rank tensor (one rank b_m per row of the flattened x) row m uses A[:b_m], B[:, :b_m]
and alpha / b_m; the prefix (full mode) or one-hot (frozen-prefix mode) masks below state that.
This module is also the "naive slicing" baseline of the benchmarks: it is deliberately simple.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def rank_masks(rank: Tensor, r_max: int, frozen_prefix: bool) -> tuple[Tensor, Tensor]:
    """Per-row masks over the r_max rank slots, each (M, r_max) and already scaled by 1/b_m.

    Returns ``(prefix, trained)``: ``prefix[m, j] = [j < b_m] / b_m`` selects the slots row m uses in
    the forward; ``trained`` selects the slots that receive gradient: the prefix itself in full mode,
    the single slot ``b_m - 1`` in frozen-prefix mode.
    """
    slots = torch.arange(r_max, device=rank.device)
    b = rank.reshape(-1, 1)
    inv_b = 1.0 / b.double()
    prefix = (slots < b) * inv_b
    trained = (slots == b - 1) * inv_b if frozen_prefix else prefix
    return prefix, trained


def dylora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
                  rank: int | Tensor, alpha: float, frozen_prefix: bool = False) -> Tensor:
    """Naive-slicing DyLoRA linear. ``rank``: an int, a 0-d integer tensor, or one rank per row of
    ``x.reshape(-1, K)``. No validation here: callers pass valid inputs (see ``ops.dylora_linear``)."""
    base = F.linear(x, weight, bias)
    if isinstance(rank, Tensor) and rank.dim() == 1:
        return base + _per_row_lora(x, lora_A, lora_B, rank, alpha, frozen_prefix).view_as(base)
    b = int(rank)
    A_b, B_b = lora_A[:b], lora_B[:, :b]
    if frozen_prefix:  # only row b-1 of A / column b-1 of B is trained
        A_b = torch.cat([A_b[:-1].detach(), A_b[-1:]], dim=0)
        B_b = torch.cat([B_b[:, :-1].detach(), B_b[:, -1:]], dim=1)
    return base + (alpha / b) * ((x @ A_b.t()) @ B_b.t())


def _per_row_lora(x: Tensor, lora_A: Tensor, lora_B: Tensor, rank: Tensor, alpha: float,
                  frozen_prefix: bool) -> Tensor:
    """The low-rank term with one rank per row, as masks over all r_max slots."""
    x2 = x.reshape(-1, x.shape[-1])
    prefix, trained = (m.to(x.dtype) * alpha for m in rank_masks(rank, lora_A.shape[0], frozen_prefix))
    if not frozen_prefix:
        return ((x2 @ lora_A.t()) * prefix) @ lora_B.t()
    # Frozen prefix: the value uses every slot < b_m, the gradient to A/B flows through slot b_m-1 only.
    A_frozen, B_frozen = lora_A.detach(), lora_B.detach()
    u_frozen = x2 @ A_frozen.t()
    u_trained = x2 @ lora_A.t()
    value = (u_frozen * prefix) @ B_frozen.t()
    # Add the trained path and subtract its frozen twin: zero in value, the one-hot gradient in A and B.
    trained_path = (u_trained * trained) @ lora_B.t() - (u_frozen * trained) @ B_frozen.t()
    return value + trained_path
