"""Triton kernels of the dylora ops: the CUDA implementation (and, under TRITON_INTERPRET=1, a CPU one).

Meets the kernel contract in ``dylora_kernels/ops.py``. Three kernels, each written once and launched
with different operands, strides and output views:

    _shrink_kernel        out = (X·Yᵀ) ⊙ [j < b_m]                          fp32 (M, r_max)
                          forward  u = x·A[:b]ᵀ     (X = x, Y = A)
                          backward v = g·B[:, :b]   (X = g, Y = Bᵀ)
    _fused_linear_kernel  out = X·Yᵀ + bias + s_m·(U ⊙ [j < b_m])·Zᵀ         in x's dtype
                          forward  y  (X = x, Y = W,  U = u, Z = B)
                          backward dx (X = g, Y = Wᵀ, U = v, Z = Aᵀ)
    _lora_grad_kernel     out[j, k] = Σ_m s_m·trained(m, j)·P[m, j]·Q[m, k]   in the adapter dtype
                          dA = (P = v, Q = x);  dB = (P = u, Q = g), stored through dB's transpose

with s_m = alpha / b_m and trained(m, j) = [j < b_m] (full mode) or [j == b_m - 1] (frozen prefix).
u and v are kept unscaled, fp32 and exactly zero beyond each row's rank; the scale and the masks are
applied by whichever kernel consumes them (``_scale_slots``), which never lets a slot
beyond b_m through.

The rank is data. Every kernel loads b_m from ``rank_ptr`` (one shared value when PER_ROW is False,
one per row otherwise) and derives s_m, the slot masks and its loop bounds from it on the device: the
low-rank loop of the fused kernel stops at its tile's largest rank, the shrink kernel and (for one
shared rank) the gradient kernel skip slot blocks that hold no used/trained slot, which makes the
frozen-prefix gradient one read of x (dA) and one of g (dB). What is compiled depends only on the
dtypes, PER_ROW, the mode and BLOCK_R (from r_max's capacity), never on a rank value, so changing the
rank compiles nothing, syncs nothing and replays inside a captured CUDA graph.

x, W, A, B and the outputs are addressed through their strides (nothing is copied: A[:b] and B[:, :b]
are read in place, a non-contiguous x is read as it is). Every dot accumulates in fp32; fp32 inputs may
use tf32 on the GPU.

Hopper work (issue 5) goes into the kernels below: TMA descriptors instead of the pointer blocks in
``_matmul_loop``, a persistent grid over tiles with warp-specialised producer/consumer warps for the
fused kernel, and a split over M for ``_lora_grad_kernel`` (its grid is only r_max/BLOCK_R × K/BLOCK_K).
"""
from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"  # kernels run on CPU tensors


# --------------------------------------------------------------------------------------------
# Autotuning: every kernel's candidates in one place, keyed on power-of-two shape buckets
# --------------------------------------------------------------------------------------------
def _configs(kernel: str) -> list[triton.Config]:
    """Autotune candidates of one kernel. The first is the small-problem config (the only one under
    the interpreter, where timing configs would only cost time); BLOCK_M = 16 ones serve decode-sized M.
    tl.dot needs every block dimension ≥ 16. The lists are short on purpose: each candidate is one more
    compilation per dtype and layout. Every group (small, decode, large) holds a config whose pipeline
    buffers fit in shared memory for fp32 inputs too: a config that does not fit fails to compile and
    the autotuner times it as infinite, so a group must never consist of such configs alone."""
    def cfg(stages, warps, **blocks):
        return triton.Config(blocks, num_stages=stages, num_warps=warps)

    if kernel == "fused":
        configs = [cfg(2, 4, BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=8),
                   cfg(3, 8, BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8),
                   cfg(4, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
                   cfg(3, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8),
                   cfg(4, 4, BLOCK_M=16, BLOCK_N=128, BLOCK_K=64, GROUP_M=1),
                   cfg(4, 4, BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=1)]
    elif kernel == "shrink":
        configs = [cfg(2, 4, BLOCK_M=32, BLOCK_K=32),
                   cfg(4, 4, BLOCK_M=64, BLOCK_K=64),
                   cfg(3, 8, BLOCK_M=128, BLOCK_K=64),
                   cfg(4, 4, BLOCK_M=16, BLOCK_K=128)]
    elif kernel == "grad":  # BLOCK_M is the contraction block here
        configs = [cfg(2, 4, BLOCK_M=32, BLOCK_K=32),
                   cfg(4, 4, BLOCK_M=64, BLOCK_K=128),
                   cfg(3, 8, BLOCK_M=128, BLOCK_K=128),
                   cfg(3, 4, BLOCK_M=64, BLOCK_K=64)]
    else:
        raise ValueError(kernel)
    return configs[:1] if _INTERPRET else configs


def _prune(configs, named_args, **kwargs):
    """Only the small config for small problems (it also bounds compilation in the test suite), only
    BLOCK_M = 16 configs for M ≤ 32 where the kernel has them. Decided on the autotune key alone."""
    args = {**named_args, **kwargs}
    M, N, K = args["M_BUCKET"], args["N_BUCKET"], args["K_BUCKET"]
    if max(M, N, K) <= 512:
        return configs[:1]
    decode = [c for c in configs if c.kwargs["BLOCK_M"] == 16]
    if M <= 32 and decode:
        return decode
    return [c for c in configs[1:] if c.kwargs["BLOCK_M"] != 16]


def _autotune(kernel: str):
    return triton.autotune(configs=_configs(kernel), key=["M_BUCKET", "N_BUCKET", "K_BUCKET"],
                           prune_configs_by={"early_config_prune": _prune})


def _bucket(n: int) -> int:
    """The autotune bucket of a size: the next power of two."""
    return triton.next_power_of_2(max(int(n), 1))


def block_r(r_max: int) -> int:
    """Slots handled per tile: the rank capacity R_CAP = next power of two ≥ max(16, r_max), at most 64."""
    return min(64, triton.next_power_of_2(max(16, r_max)))


# Sizes that vary from call to call (M, the buckets) are not specialised on, to bound recompilation.
_jit = triton.jit(do_not_specialize=["M", "M_BUCKET", "N_BUCKET", "K_BUCKET"])


# --------------------------------------------------------------------------------------------
# Shared device helpers
# --------------------------------------------------------------------------------------------
@triton.jit
def _row_ranks(rank_ptr, offs_m, M, PER_ROW: tl.constexpr):
    """b_m of the rows ``offs_m`` as int32, 0 for rows past M: one per row, or one shared value."""
    if PER_ROW:
        b = tl.load(rank_ptr + offs_m, mask=offs_m < M, other=0)
    else:
        b = tl.where(offs_m < M, tl.load(rank_ptr), 0)
    return b.to(tl.int32)


@triton.jit
def _scale_slots(p, offs_r, b, alpha, ONE_HOT: tl.constexpr):
    """p (rows, slots) times alpha / b_m on the slots row m uses, exactly 0 elsewhere (whatever p holds
    there). The slots used are j < b_m, or only j == b_m - 1 with ONE_HOT (what frozen-prefix trains)."""
    slots = offs_r[None, :]
    b = b[:, None]
    if ONE_HOT:
        used = slots == b - 1
    else:
        used = slots < b
    return tl.where(used, p * (alpha / tl.maximum(b, 1).to(tl.float32)), 0.0)


@triton.jit
def _matmul_loop(acc, x_ptr, y_ptr, offs_m, offs_n, M, N, K,
                 stride_xm, stride_xk, stride_yn, stride_yk, BLOCK_K: tl.constexpr):
    """acc + X[offs_m, :K] · Y[offs_n, :K]ᵀ, masked at every edge (K = 0 returns acc)."""
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :] * stride_xk
    y_ptrs = y_ptr + offs_k[:, None] * stride_yk + offs_n[None, :].to(tl.int64) * stride_yn
    for k0 in range(0, K, BLOCK_K):
        k_in = offs_k < K - k0
        x = tl.load(x_ptrs, mask=(offs_m[:, None] < M) & k_in[None, :], other=0.0)
        y = tl.load(y_ptrs, mask=k_in[:, None] & (offs_n[None, :] < N), other=0.0)
        acc = tl.dot(x, y, acc)
        x_ptrs += BLOCK_K * stride_xk
        y_ptrs += BLOCK_K * stride_yk
    return acc


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------
@_autotune("shrink")
@_jit
def _shrink_kernel(
        # pointers
        x_ptr, y_ptr, rank_ptr, out_ptr,
        # sizes
        M, K, R,
        # strides
        stride_xm, stride_xk, stride_yr, stride_yk, stride_om, stride_or,
        # autotune key
        M_BUCKET, N_BUCKET, K_BUCKET,
        # meta-parameters
        PER_ROW: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """out (M, R) fp32 = (X·Yᵀ) ⊙ [j < b_m]: u = x·A[:b]ᵀ or v = g·B[:, :b], exactly zero beyond b_m."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    b = _row_ranks(rank_ptr, offs_m, M, PER_ROW)
    # A block of slots past every row's rank is all zeros: it reads neither X nor Y.
    k_end = tl.where(tl.program_id(1) * BLOCK_R < tl.max(b, axis=0), K, 0)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    acc = _matmul_loop(acc, x_ptr, y_ptr, offs_m, offs_r, M, R, k_end,
                       stride_xm, stride_xk, stride_yr, stride_yk, BLOCK_K)
    acc = tl.where(offs_r[None, :] < b[:, None], acc, 0.0)
    out_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_r[None, :] * stride_or
    tl.store(out_ptrs, acc, mask=(offs_m[:, None] < M) & (offs_r[None, :] < R))


@_autotune("fused")
@_jit
def _fused_linear_kernel(
        # pointers
        x_ptr, y_ptr, bias_ptr, u_ptr, z_ptr, rank_ptr, out_ptr,
        # sizes
        M, N, K, R, alpha,
        # strides
        stride_xm, stride_xk, stride_yn, stride_yk, stride_bias, stride_um, stride_ur, stride_zn, stride_zr,
        stride_om, stride_on,
        # autotune key
        M_BUCKET, N_BUCKET, K_BUCKET,
        # meta-parameters
        HAS_BIAS: tl.constexpr, PER_ROW: tl.constexpr, BLOCK_R: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """out (M, N) = X·Yᵀ + bias + s_m·(U ⊙ [j < b_m])·Zᵀ: the forward y and the backward dx, one GEMM.

    X (M, K), Y (N, K), U (M, R) fp32, Z (N, R). The low-rank term is added to the GEMM's fp32
    accumulator in the epilogue, before the single store: y is written once and never re-read.
    """
    # Grouped ordering of the output tiles (triton tutorial 03), for L2 reuse of X and Y.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group_size = GROUP_M * num_pid_n
    first_pid_m = (pid // group_size) * GROUP_M
    group_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % group_size) % group_m
    pid_n = (pid % group_size) // group_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = _matmul_loop(acc, x_ptr, y_ptr, offs_m, offs_n, M, N, K,
                       stride_xm, stride_xk, stride_yn, stride_yk, BLOCK_K)

    # Epilogue: + s_m·U[:, :b_m]·Z[:, :b_m]ᵀ, over slot blocks up to the tile's largest rank.
    b = _row_ranks(rank_ptr, offs_m, M, PER_ROW)
    for r0 in range(0, tl.max(b, axis=0), BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        u = tl.load(u_ptr + offs_m[:, None].to(tl.int64) * stride_um + offs_r[None, :] * stride_ur,
                    mask=(offs_m[:, None] < M) & (offs_r[None, :] < R), other=0.0)
        z = tl.load(z_ptr + offs_r[:, None] * stride_zr + offs_n[None, :].to(tl.int64) * stride_zn,
                    mask=(offs_r[:, None] < R) & (offs_n[None, :] < N), other=0.0)
        u = _scale_slots(u, offs_r, b, alpha, False)
        acc = tl.dot(u.to(z.dtype), z, acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n * stride_bias, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]

    out_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@_autotune("grad")
@_jit
def _lora_grad_kernel(
        # pointers
        p_ptr, q_ptr, rank_ptr, out_ptr,
        # sizes
        M, K, R, alpha,
        # strides
        stride_pm, stride_pr, stride_qm, stride_qk, stride_or, stride_ok,
        # autotune key
        M_BUCKET, N_BUCKET, K_BUCKET,
        # meta-parameters
        ONE_HOT: tl.constexpr, PER_ROW: tl.constexpr, BLOCK_R: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """out (R, K) = Σ_m s_m·trained(m, j)·P[m, j]·Q[m, k]: dA = (s⊙v⊙trained)ᵀ·x, dB = gᵀ·(s⊙u⊙trained).

    P (M, R) fp32, Q (M, K); trained = [j < b_m] (full) or [j == b_m - 1] (ONE_HOT, frozen prefix).
    Every element of out is written: slots no row trains get exact zeros.
    """
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    m_end = M
    if not PER_ROW:
        # One shared rank: a block of slots that holds no trained slot reads nothing. In frozen-prefix
        # mode only the block holding slot b-1 works, reading its strip of Q once.
        b = tl.load(rank_ptr).to(tl.int32)
        first = tl.program_id(0) * BLOCK_R
        if ONE_HOT:
            hit = (first <= b - 1) & (b - 1 < first + BLOCK_R)
        else:
            hit = first < b
        m_end = tl.where(hit, M, 0)

    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    for m0 in range(0, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        rows = offs_m[:, None] < M
        p = tl.load(p_ptr + offs_m[:, None].to(tl.int64) * stride_pm + offs_r[None, :] * stride_pr,
                    mask=rows & (offs_r[None, :] < R), other=0.0)
        q = tl.load(q_ptr + offs_m[:, None].to(tl.int64) * stride_qm + offs_k[None, :] * stride_qk,
                    mask=rows & (offs_k[None, :] < K), other=0.0)
        p = _scale_slots(p, offs_r, _row_ranks(rank_ptr, offs_m, M, PER_ROW), alpha, ONE_HOT)
        acc = tl.dot(tl.trans(p.to(q.dtype)), q, acc)

    out_ptrs = out_ptr + offs_r[:, None] * stride_or + offs_k[None, :].to(tl.int64) * stride_ok
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(offs_r[:, None] < R) & (offs_k[None, :] < K))


# --------------------------------------------------------------------------------------------
# Launchers: one per kernel, taking 2-D views (any strides) and writing into `out`
# --------------------------------------------------------------------------------------------
def shrink(x: torch.Tensor, y: torch.Tensor, rank: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out (M, R) fp32 = (x·yᵀ) ⊙ [j < b_m] for x (M, K), y (R, K)."""
    M, K = x.shape
    R = y.shape[0]
    BLOCK_R = block_r(R)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(R, BLOCK_R))
    _shrink_kernel[grid](x, y, rank, out, M, K, R, *x.stride(), *y.stride(), *out.stride(),
                         _bucket(M), _bucket(R), _bucket(K), PER_ROW=rank.dim() == 1, BLOCK_R=BLOCK_R)
    return out


def fused_linear(x: torch.Tensor, y: torch.Tensor, bias: torch.Tensor | None, u: torch.Tensor,
                 z: torch.Tensor, rank: torch.Tensor, alpha: float, out: torch.Tensor) -> torch.Tensor:
    """out (M, N) = x·yᵀ + bias + (alpha/b_m)·(u ⊙ [j < b_m])·zᵀ for x (M, K), y (N, K), u (M, R), z (N, R)."""
    M, K = x.shape
    N, R = z.shape
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
    _fused_linear_kernel[grid](x, y, bias, u, z, rank, out, M, N, K, R, float(alpha),
                               *x.stride(), *y.stride(), 0 if bias is None else bias.stride(0),
                               *u.stride(), *z.stride(), *out.stride(),
                               _bucket(M), _bucket(N), _bucket(K),
                               HAS_BIAS=bias is not None, PER_ROW=rank.dim() == 1, BLOCK_R=block_r(R))
    return out


def lora_grad(p: torch.Tensor, q: torch.Tensor, rank: torch.Tensor, alpha: float, frozen_prefix: bool,
              out: torch.Tensor) -> torch.Tensor:
    """out (R, K) = Σ_m (alpha/b_m)·trained(m, j)·p[m, j]·q[m, k] for p (M, R) fp32, q (M, K)."""
    M, K = q.shape
    R = p.shape[1]
    BLOCK_R = block_r(R)
    grid = lambda meta: (triton.cdiv(R, BLOCK_R), triton.cdiv(K, meta["BLOCK_K"]))
    _lora_grad_kernel[grid](p, q, rank, out, M, K, R, float(alpha),
                            *p.stride(), *q.stride(), *out.stride(),
                            _bucket(M), _bucket(R), _bucket(K),
                            ONE_HOT=bool(frozen_prefix), PER_ROW=rank.dim() == 1, BLOCK_R=BLOCK_R)
    return out


# --------------------------------------------------------------------------------------------
# The kernel contract (dylora_kernels/ops.py)
# --------------------------------------------------------------------------------------------
def _device_of(x: torch.Tensor):
    """Triton launches on the current CUDA device: make it x's (a no-op context on CPU)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def forward(x, weight, bias, lora_A, lora_B, rank, alpha):
    """(y, u): y = x·Wᵀ + bias + (alpha/b)·u·B[:, :b]ᵀ in x's dtype, u = x·A[:b]ᵀ fp32 (M, r_max)."""
    M, N, R = x.shape[0], weight.shape[0], lora_A.shape[0]
    rank = rank.contiguous()  # per-row ranks are read at rank_ptr + m
    with _device_of(x):
        u = shrink(x, lora_A, rank, torch.empty(M, R, device=x.device, dtype=torch.float32))
        y = fused_linear(x, weight, bias, u, lora_B, rank, alpha,
                         torch.empty(M, N, device=x.device, dtype=x.dtype))
    return y, u


def backward(grad, x, weight, lora_A, lora_B, u, rank, alpha, frozen_prefix, compute_dx):
    """(dx, dA, dB): dx = g·W + s·v·A[:b] (empty unless compute_dx), with v = g·B[:, :b] fp32; dA and
    dB on the trained slots (< b_m, or b_m - 1 in frozen-prefix mode), exactly zero elsewhere."""
    (M, K), (N, R) = x.shape, lora_B.shape
    rank = rank.contiguous()
    dx = x.new_empty(0)
    dA = torch.empty(R, K, device=x.device, dtype=lora_A.dtype)
    dB = torch.empty(N, R, device=x.device, dtype=lora_B.dtype)
    with _device_of(x):
        v = shrink(grad, lora_B.t(), rank, torch.empty(M, R, device=x.device, dtype=torch.float32))
        if compute_dx:
            dx = fused_linear(grad, weight.t(), None, v, lora_A.t(), rank, alpha,
                              torch.empty(M, K, device=x.device, dtype=x.dtype))
        lora_grad(v, x, rank, alpha, frozen_prefix, dA)
        lora_grad(u, grad, rank, alpha, frozen_prefix, dB.t())  # dBᵀ[j, n] = Σ_m s_m·trained·u[m, j]·g[m, n]
    return dx, dA, dB
