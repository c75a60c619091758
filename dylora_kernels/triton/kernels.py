"""Triton kernels of the dylora ops: pointer-based tiles for every CUDA GPU (and, under TRITON_INTERPRET=1, CPU).

The Hopper kernel (TMA descriptors, persistent grid) lives in ``hopper.py`` and shares the helpers below;
the kernel contract (``forward``, ``backward``, ``variants``) is in ``__init__.py``. Each kernel is written
once and launched with different operands, strides and output views. With s_m = alpha / b_m:

    _shrink_kernel        out = (X·Yᵀ) ⊙ [j < b_m], fp32 (M, R)
                          forward  u = x·A[:b]ᵀ   (X = x, Y = A)
                          backward v = g·B[:, :b] (X = g, Y = Bᵀ); with FOLD (frozen prefix, one rank) it also
                          writes per-row-block partial sums of the dB column, Σ_m (u[m, b-1]/b)·g[m, :], reading g once
    _fused_linear_kernel  out = s_m·(U ⊙ [j < b_m])·Zᵀ + [X·Yᵀ] + [bias] + [base], in X's dtype
                          forward  y  (X = x, Y = W,  U = u, Z = B)
                          backward dx (X = g, Y = Wᵀ, U = v, Z = Aᵀ)
    _decode_kernel        y for M ≤ 16 in one launch: each program computes u = x·A[:b]ᵀ for itself in the same
                          K loop as its N-tile of x·Wᵀ (one program also writes u)
    _lora_grad_kernel     split-M partials part[s, j, k] = Σ_{m in split s} trained(m, j)·(P[m, j]/b_m)·Q[m, k]
                          dA = (P = v, Q = x); dB = (P = u, Q = g), stored through dB's transpose
    _frozen_gemv_kernel   split-M partials part[s, k] = Σ_{m in split s} (P[m, b-1]/b)·Q[m, k]: frozen prefix with one
                          rank, dA row b-1 (P = v, Q = x), one streaming read of x
    _finish_kernel        out = alpha·Σ_s part[s] in a fixed order (the gradients are deterministic), in the adapter
                          dtype, BLOCK_S splits per load; ONE_SLOT: the sum goes to row b-1, every other row is
                          exactly 0

trained(m, j) = [j < b_m] (full mode) or [j == b_m - 1] (frozen prefix).

The rank is data. Every kernel loads b_m from ``rank_ptr`` (any integer dtype; one shared value when PER_ROW is
False, one per row otherwise) and derives the scale, the slot masks and its loop bounds on the device. A row whose
rank is outside [1, R] gets NaN in y, u, v and dx, and makes every gradient it feeds NaN; it never causes an
out-of-bounds read. No kernel reads rows of A or columns of B at or beyond the largest rank among the rows of its
tile (those loads are masked off), and slot masks are ``tl.where`` selections, so NaN or Inf stored in unused slots
never reaches an output. What is compiled depends on dtypes, layouts, PER_ROW, the mode and the rank capacity,
never on a rank value: changing the rank compiles nothing and syncs nothing.

Scales never overflow 16-bit dot operands: 1/b_m is applied to the fp32 operand (it only shrinks it) before the cast,
alpha to the fp32 result. Every dot accumulates in fp32. fp32 intermediates (u, v) are cast to the dtype of the
factor they meet; two storage dtypes that differ (x in bf16, A in fp32) meet in fp32 (tf32 on the GPU).
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from ..reference import dropout_threshold
from .launch import Launcher

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"  # kernels run on CPU tensors


# --------------------------------------------------------------------------------------------
# Autotuning: every kernel's candidates in one place, keyed on power-of-two shape buckets
# --------------------------------------------------------------------------------------------
def _configs(kernel: str) -> list[triton.Config]:
    """Autotune candidates of one kernel. The first is the small-problem config (the only one under the
    interpreter, where timing configs would only cost time); BLOCK_M = 16 ones serve decode-sized M. tl.dot needs
    every block dimension ≥ 16. Each candidate is one more compilation per dtype and layout, so the lists are
    short; tests/sm90_compile.py compiles every one of them for sm_90a and checks shared memory (≤ 227 KiB for
    16-bit inputs), register spills (none) and the main loop's pipelining. Every group (small, decode, large)
    holds a config whose buffers fit in shared memory for fp32 too. (The TMA kernel's are chosen by hopper.py's
    own tuner, not triton.autotune: its descriptors take their block shapes from the config.)"""
    def _cfg(stages, warps, **blocks):
        return triton.Config(blocks, num_stages=stages, num_warps=warps)

    if kernel == "tma":  # 16-bit only; 128x256 with 8 warps and 3-4 stages is the Hopper GEMM tile. FLATTEN (one
        # flattened persistent loop, the low-rank term after the K loop) spills registers at 128x256 (sm_90a): 128x128
        # and 64x128 only.
        # Issue 20 candidates (built and checked offline, not yet measured; the tuner keeps them only where they win):
        # "last" (LOWRANK_LAST): a seeded config's low-rank term after the K loop, its first slot block's loads issued
        # before it; sub=False: one full-tile epilogue store per tile (no wait between two half-tile stores that
        # share one buffer); ctas=2 (CTAS_PER_SM): a grid of 2 × SMs, for configs whose shared memory (≤ 113 KiB)
        # and registers let two programs share an SM (tests/sm90_compile.py checks both).
        tma = lambda stages, warps, bm, bn, flat, last=False, sub=True, ctas=1: _cfg(
            stages, warps, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=64, GROUP_M=8, EPILOGUE_SUBTILE=sub, FLATTEN=flat,
            LOWRANK_LAST=last, CTAS_PER_SM=ctas)
        configs = [tma(3, 4, 64, 64, False), tma(3, 8, 128, 256, False), tma(4, 8, 128, 256, False),
                   tma(4, 8, 128, 128, False), tma(4, 4, 64, 128, False), tma(4, 8, 128, 128, True),
                   tma(4, 8, 64, 128, True),
                   tma(3, 8, 128, 256, False, last=True), tma(4, 8, 128, 128, False, last=True),
                   tma(4, 8, 128, 128, False, last=True, sub=False), tma(4, 4, 64, 128, False, ctas=2),
                   tma(4, 4, 64, 128, False, last=True, ctas=2)]
    elif kernel == "fused":
        configs = [_cfg(2, 4, BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=8),
                   _cfg(3, 8, BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8),
                   _cfg(4, 8, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
                   _cfg(3, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
                   _cfg(4, 4, BLOCK_M=16, BLOCK_N=128, BLOCK_K=64, GROUP_M=1),
                   _cfg(4, 4, BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=1)]
    elif kernel == "shrink":
        configs = [_cfg(2, 4, BLOCK_M=32, BLOCK_K=32),
                   _cfg(4, 4, BLOCK_M=64, BLOCK_K=64),
                   _cfg(3, 8, BLOCK_M=32, BLOCK_K=128),
                   _cfg(3, 8, BLOCK_M=128, BLOCK_K=64),
                   _cfg(4, 8, BLOCK_M=16, BLOCK_K=64)]
    elif kernel == "decode":  # BLOCK_M is fixed at 16 (M ≤ 16): the candidates trade programs for A re-reads
        configs = [_cfg(2, 4, BLOCK_N=32, BLOCK_K=32),
                   _cfg(4, 4, BLOCK_N=32, BLOCK_K=128),
                   _cfg(4, 4, BLOCK_N=64, BLOCK_K=64),
                   _cfg(3, 8, BLOCK_N=16, BLOCK_K=256),
                   _cfg(4, 4, BLOCK_N=128, BLOCK_K=64)]
    elif kernel == "grad":  # BLOCK_M is the contraction block here; BLOCK_K ≤ 128 (split_rows relies on it)
        configs = [_cfg(2, 4, BLOCK_M=32, BLOCK_K=32),
                   _cfg(4, 4, BLOCK_M=64, BLOCK_K=128),
                   _cfg(3, 8, BLOCK_M=128, BLOCK_K=128),
                   _cfg(3, 4, BLOCK_M=64, BLOCK_K=64)]
    elif kernel == "gemv":  # no dot: a streaming multiply-add over rows; BLOCK_K ≤ 128 as for "grad"
        configs = [_cfg(2, 4, BLOCK_M=32, BLOCK_K=32),
                   _cfg(3, 4, BLOCK_M=32, BLOCK_K=128),
                   _cfg(4, 8, BLOCK_M=64, BLOCK_K=128),
                   _cfg(4, 4, BLOCK_M=16, BLOCK_K=128)]
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
    decode = [c for c in configs if c.kwargs.get("BLOCK_M") == 16]
    if M <= 32 and decode:
        return decode
    return [c for c in configs[1:] if c.kwargs.get("BLOCK_M") != 16]


@functools.lru_cache(maxsize=None)
def shared_memory_limit(device: torch.device) -> int | None:
    """Bytes of shared memory one block may use on ``device`` (opt-in maximum: 99 KiB on sm_86/89, 163 KiB on sm_80,
    227 KiB on sm_90); None (no limit) off CUDA."""
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).shared_memory_per_block_optin


def shared_memory(kernel: str, config, in_bytes: int, adapter_bytes: int, r_max: int, precision: str = "tf32") -> int:
    """Bytes of shared memory ``kernel`` takes with ``config``, from its pipelined tiles: (num_stages - 1) buffers of
    the main loop's operand tiles, plus the layout-conversion scratch the compiler adds beside them. Matches the
    compiled kernels for sm_80/86/89 at the 99/163/227 KiB limits (tests/sm90_compile.py --arch checks it)."""
    k, buffers = config.kwargs, max(config.num_stages - 1, 1)
    BM, BK, BN = k.get("BLOCK_M", DECODE_MAX_M), k["BLOCK_K"], k.get("BLOCK_N", 0)
    if kernel == "fused":  # x and y tiles; fp32 adapters beside 16-bit inputs: the seed's u tile stays apart
        extra = BM * seed_block_r(r_max) * 4 if adapter_bytes > in_bytes else 0
        return buffers * (BM * BK + BK * BN) * in_bytes + extra
    if kernel == "decode":  # x, w and A tiles; IEEE fp32 dots against fp32 adapters: x's tile upcast, once
        upcast = BM * BK * 4 if adapter_bytes > in_bytes and precision == "ieee" else 0
        return (buffers * ((BM * BK + BK * BN) * in_bytes + BK * next_power_of_2(max(16, r_max)) * adapter_bytes)
                + upcast)
    if kernel == "shrink":  # x and y tiles
        return buffers * (BM * BK * in_bytes + BK * block_r(r_max) * adapter_bytes)
    if kernel == "grad":  # fp32 P and Q tiles, and P's transpose in Q's dtype
        return buffers * (BM * BK * in_bytes + BM * block_r(r_max) * 4) + BM * block_r(r_max) * in_bytes
    return 0  # gemv, finish: a few KiB


# Per kernel: (the operand whose dtype is the input's, the adapter-side operand) among its pointer arguments.
_SHARED_MEMORY_OPERANDS = {"fused": ("x_ptr", "z_ptr"), "decode": ("x_ptr", "a_ptr"), "shrink": ("x_ptr", "y_ptr"),
                           "grad": ("q_ptr", "p_ptr"), "gemv": ("q_ptr", "p_ptr")}


# Under adapter dropout a kernel draws its masked tile's mask beside its accumulator (``_dropout_keep``). With one
# Philox call per 4 elements (DROPOUT_VEC4: the masked dimension a multiple of 4) on sm_90a (tests/sm90_compile.py,
# bf16): the fused dx tiles of 128x128 (204 registers) and 64x128 (202) compile clean, 128x256 spills (208 B at 255
# registers); the gradient's x tiles up to 128x128 and the decode kernel's 16x256 x tile compile clean. With one call
# per element (K % 4 != 0) the fused dx tiles of 64x128 and more, the gradient's x tiles of 64x128 and more and the
# decode kernel's 16x256 tile spill. Largest masked tile per kernel, per path (VEC4, per element):
DROPOUT_MAX_TILE = {True: {"fused": 128 * 128, "grad": 128 * 128, "decode": 16 * 256},
                    False: {"fused": 16 * 128, "grad": 64 * 64, "decode": 16 * 128}}


def dropout_config_ok(kernel: str, config, vec4: bool = True) -> bool:
    """Whether ``config`` may run ``kernel`` with DROPOUT=True and DROPOUT_VEC4=``vec4`` (its masked tile within
    DROPOUT_MAX_TILE[vec4])."""
    k = config.kwargs
    tile = k.get("BLOCK_M", DECODE_MAX_M) * k.get("BLOCK_N" if kernel == "fused" else "BLOCK_K", 0)
    return tile <= DROPOUT_MAX_TILE[bool(vec4)].get(kernel, tile)


def _prune_for(kernel: str, fixed: bool, configs, named_args, **kwargs):
    """``_prune``, then only the configs whose shared memory fits the device (``shared_memory`` against
    ``shared_memory_limit``: checked before a config is compiled or tried; the small config when none fits). With
    ``fixed`` (deterministic results) only the first of them: no timing decides."""
    kept = _prune(configs, named_args, **kwargs)
    if kwargs.get("DROPOUT"):  # only tiles whose mask fits in registers (per element: the BLOCK_M = 16 ones)
        ok = functools.partial(dropout_config_ok, kernel, vec4=kwargs.get("DROPOUT_VEC4", False))
        kept = [c for c in kept if ok(c)] or [c for c in configs[1:] if ok(c)] or configs[:1]
    main, side = (named_args[name] for name in _SHARED_MEMORY_OPERANDS[kernel])
    limit = shared_memory_limit(main.device)
    if limit is not None:
        sizes = (main.element_size(), side.element_size(), named_args["R"], kwargs.get("PRECISION", "tf32"))
        kept = [c for c in kept if shared_memory(kernel, c, *sizes) <= limit] or configs[:1]
    return kept[:1] if fixed else kept


AUTOTUNE_WARMUP_MS, AUTOTUNE_REP_MS = 5, 20


def autotune_bench(fn, quantiles):
    """How the autotuners time one config: 5 ms of warm-up and 20 ms of repetitions (triton's default: 25 + 100
    ms). A new shape's first forward + backward at M = 8192 autotunes 14–20 configs here (after _prune: shrink 3,
    pointer GEMM 3 in the forward and again for dx, gradients 2–6), since the dispatcher runs every candidate:
    0.35–0.5 s instead of 1.75–2.5 s, plus the TMA kernel's 11 + 11 configs, timed by hopper.py's tuner at ~12 ms
    each. 20 ms is still ~57 runs of the largest benchmarked GEMM (8192×4096×4096 bf16, ~0.35 ms on an H200).
    Compilation is extra (and cached on disk)."""
    return triton.testing.do_bench(fn, warmup=AUTOTUNE_WARMUP_MS, rep=AUTOTUNE_REP_MS, quantiles=quantiles)


def _autotune(kernel: str, *flags: str, fixed: bool = False):
    """The autotuner of one kernel: keyed on the shape buckets, the operand layout code and the constexpr
    ``flags`` that change the best config (mode, per-row ranks, bias/base, ...), never on a rank value. The
    autotuner adds every tensor argument's dtype to the key itself. Timings persist on disk. ``fixed``: one config
    per key, the first that fits (``_prune_for``), nothing timed (deterministic results)."""
    return triton.autotune(configs=_configs(kernel), key=["M_BUCKET", "N_BUCKET", "K_BUCKET", "LAYOUT", *flags],
                           prune_configs_by={"early_config_prune": functools.partial(_prune_for, kernel, fixed)},
                           cache_results=not fixed, do_bench=autotune_bench)


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) on the host. (triton.cdiv and triton.next_power_of_2 are constexpr functions in triton 3.6:
    about 3 µs per host call, measured with bench/host_harness.py; a launch used to make a dozen such calls.)"""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two ≥ n (1 for n ≤ 1), on the host."""
    return 1 << max(n - 1, 0).bit_length()


def bucket(n: int) -> int:
    """The autotune bucket of a size: the next power of two."""
    return next_power_of_2(int(n))


def layout(*tensors) -> int:
    """Autotune key of the operands' layouts (0: rows contiguous, 1: columns contiguous, 2: neither, 3: absent):
    launches that differ only in layout (the y and dx launches of one kernel) never share an autotune entry."""
    code = 0
    for t in tensors:
        code = code * 4 + (3 if t is None else 0 if t.stride(-1) == 1 else 1 if t.stride(0) == 1 else 2)
    return code


def block_r(r_max: int) -> int:
    """Slots handled per tile: the rank capacity R_CAP = next power of two ≥ max(16, r_max), at most 64."""
    return min(64, next_power_of_2(max(16, r_max)))


def seed_block_r(r_max: int) -> int:
    """Slots per step of a fused GEMM's low-rank seed: at most 32, which keeps its operands (fp32 adapters
    included) beside the GEMM's pipeline buffers in shared memory."""
    return min(32, block_r(r_max))


@functools.lru_cache(maxsize=None)
def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of x's device (a few under the interpreter, so that tests split over M)."""
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


_SPLIT_ROWS = 32 if _INTERPRET else 128  # split-M chunks are multiples of every grad/gemv BLOCK_M


def split_rows(M: int, tiles: int, sms: int) -> tuple[int, int]:
    """(splits, rows per split) of a split-M reduction with ``tiles`` output tiles of at most 128 columns on a GPU
    with ``sms`` SMs: enough splits for one program per SM (so M ≥ 2048 fills the GPU), chunks of at least
    _SPLIT_ROWS rows."""
    splits = max(1, min(cdiv(sms, max(tiles, 1)), cdiv(M, _SPLIT_ROWS)))
    rows = cdiv(cdiv(max(M, 1), splits), _SPLIT_ROWS) * _SPLIT_ROWS
    return cdiv(max(M, 1), rows), rows


# Sizes that vary from call to call (M, the buckets) are not specialised on, to bound recompilation.
_jit = triton.jit(do_not_specialize=["M", "M_BUCKET", "N_BUCKET", "K_BUCKET", "LAYOUT", "rows_per_split",
                                     "n_parts", "threshold"])


# --------------------------------------------------------------------------------------------
# Shared device helpers
# --------------------------------------------------------------------------------------------
@triton.jit
def _row_ranks(rank_ptr, offs_m, M, R, PER_ROW: tl.constexpr):
    """(b, bad) for the rows ``offs_m``: b_m as int32 where 1 ≤ b_m ≤ R, else 0, and ``bad`` where b_m is out of
    range (those rows' outputs are NaN). Rows past M: b = 0, not bad. The check runs in 64 bits, so a wide rank
    never wraps into range, and a bad rank never becomes a slot index."""
    rows = offs_m < M
    if PER_ROW:
        b = tl.load(rank_ptr + offs_m, mask=rows, other=1).to(tl.int64)
    else:
        b = tl.load(rank_ptr).to(tl.int64)
    ok = (b >= 1) & (b <= R)
    return tl.where(rows & ok, b, 0).to(tl.int32), rows & (ok == 0)


@triton.jit
def _shared_rank(rank_ptr, R):
    """(b, bad) of one shared (0-d) rank: b as int32 (0 when out of range) and whether it is out of [1, R]."""
    b = tl.load(rank_ptr).to(tl.int64)
    ok = (b >= 1) & (b <= R)
    return tl.where(ok, b, 0).to(tl.int32), ok == 0


@triton.jit
def _dropout_keep(seed, offs_m, k_start, K, threshold, BLOCK_K: tl.constexpr, VEC4: tl.constexpr):
    """The adapter-dropout keep mask (rows offs_m × columns k_start + [0, BLOCK_K)) of x (M, K): element
    e = m·K + k (64-bit), (r0, r1, r2, r3) = Philox4x32-10 of counter e >> 2 under ``seed`` (``tl.randint4x``),
    keep = r_{e & 3} ≥ threshold (``threshold``: floor(p·2³²) as the launchers pass it, its bits as an int32; see
    ``dropout_args``). The one definition is ``reference.dropout_keep``.

    VEC4 (K % 4 == 0; k_start and BLOCK_K are multiples of 4, as every launch's tile is): the 4 elements of a call
    lie in one row of the tile, so one Philox call per 4 elements, on the (rows, BLOCK_K/4) counters
    (m·K + k_start)/4 + j, its 4 outputs interleaved into (rows, BLOCK_K) (column 4j + l is r_l of counter j).
    Otherwise one call per element (the lane e & 3 selected): 4× the Philox work."""
    if VEC4:
        offs_c = (k_start // 4 + tl.arange(0, BLOCK_K // 4)).to(tl.int64)
        c = offs_m.to(tl.int64)[:, None] * (K // 4) + offs_c[None, :]
        r0, r1, r2, r3 = tl.randint4x(seed, c)
        # tl.join appends its new axis last: (rows, BLOCK_K/4, 2, 2) with [.., i, j] = r_{2j + i}, row-major = r0..r3
        r = tl.join(tl.join(r0, r2), tl.join(r1, r3))
        r = tl.reshape(r, (offs_m.shape[0], BLOCK_K))
    else:
        offs_k = k_start + tl.arange(0, BLOCK_K)
        e = offs_m.to(tl.int64)[:, None] * K + offs_k.to(tl.int64)[None, :]
        r0, r1, r2, r3 = tl.randint4x(seed, e >> 2)
        lane = e & 3
        r = tl.where(lane == 0, r0, tl.where(lane == 1, r1, tl.where(lane == 2, r2, r3)))
    return r >= threshold.to(tl.uint32, bitcast=True)


@triton.jit
def _scale_slots(p, offs_r, b, ONE_HOT: tl.constexpr):
    """p (rows, slots) / b_m on the slots row m uses, exactly 0 elsewhere (whatever p holds there: a selection,
    not a multiplication by a 0/1 mask). Used slots: j < b_m, or only j == b_m - 1 with ONE_HOT (frozen prefix).
    Only 1/b_m is applied: it shrinks p, so casting the result to 16 bits cannot overflow where p does not."""
    slots = offs_r[None, :]
    b = b[:, None]
    used = (slots == b - 1) if ONE_HOT else (slots < b)
    return tl.where(used, p / tl.maximum(b, 1).to(tl.float32), 0.0)


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr):
    """acc + a·b for two storage-dtype operands: as they are when their dtypes agree, in fp32 when they differ
    (mixed precision: bf16 activations, fp32 adapters). fp32 operands multiply as PRECISION says ("ieee" or "tf32":
    torch's matmul precision, backends.matmul_precision_key)."""
    if a.dtype == b.dtype:
        return tl.dot(a, b, acc, input_precision=PRECISION)
    return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=PRECISION)


@triton.jit
def _lowrank_block(u, offs_r, b, r_end, z_ptr, offs_n, N, stride_zn, stride_zr, acc, scale, PRECISION: tl.constexpr):
    """acc + ((u ⊙ [j < b_m]) · scale / b_m)·Z[offs_n, offs_r]ᵀ for one block of slots; Z's slots at or beyond r_end
    (the tile's largest rank) are not read. u is fp32, cast to Z's dtype after the scaling."""
    z = tl.load(z_ptr + offs_r[:, None] * stride_zr + offs_n[None, :].to(tl.int64) * stride_zn,
                mask=(offs_r[:, None] < r_end) & (offs_n[None, :] < N), other=0.0)
    return tl.dot((_scale_slots(u, offs_r, b, False) * scale).to(z.dtype), z, acc, input_precision=PRECISION)


@triton.jit
def _lowrank_seed(u_ptr, z_ptr, offs_m, offs_n, b, M, N, alpha, stride_um, stride_ur, stride_zn, stride_zr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr):
    """The fp32 tile alpha·Σ_j (U[m, j]/b_m)·Z[n, j] over j < b_m: what a fused GEMM starts its accumulator from
    (the low-rank term goes in before the K loop, so the epilogue holds nothing extra). Slot blocks run up to the
    tile's largest rank; U and Z are not read beyond it. alpha multiplies the fp32 sum, so a 16-bit operand never
    overflows where the formula does not."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    r_end = tl.max(b, axis=0)
    for r0 in range(0, r_end, BLOCK_R):
        acc = _lowrank_slots(u_ptr, z_ptr, offs_m, offs_n, b, r_end, r0, M, N, stride_um, stride_ur, stride_zn,
                             stride_zr, BLOCK_R, acc, 1.0, PRECISION)
    return acc * alpha


@triton.jit
def _lowrank_into(acc, u_ptr, z_ptr, offs_m, offs_n, b, M, N, alpha, stride_um, stride_ur, stride_zn, stride_zr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, R_BLOCKS: tl.constexpr,
                  PRECISION: tl.constexpr):
    """acc + the low-rank term, its R_BLOCKS slot blocks unrolled at compile time (each masked at the tile's largest
    rank, so blocks past it read nothing; no loop: what a flattened persistent loop nest can hold, a loop inside it
    stops the flattening), accumulated into acc itself: a second accumulator tile spills registers there (sm_90a).
    alpha then multiplies the fp32 operand before its cast to Z's dtype — except for fp16 Z, whose range that could
    overflow where the formula does not: there the term is summed apart and scaled after, as the seed is."""
    apart: tl.constexpr = z_ptr.dtype.element_ty == tl.float16
    if apart:
        term, scale = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), 1.0
    else:
        term, scale = acc, alpha
    r_end = tl.max(b, axis=0)
    for i in tl.static_range(R_BLOCKS):
        term = _lowrank_slots(u_ptr, z_ptr, offs_m, offs_n, b, r_end, i * BLOCK_R, M, N, stride_um, stride_ur,
                              stride_zn, stride_zr, BLOCK_R, term, scale, PRECISION)
    if apart:
        return acc + term * alpha
    return term


@triton.jit
def _lowrank_slots(u_ptr, z_ptr, offs_m, offs_n, b, r_end, r0, M, N, stride_um, stride_ur, stride_zn, stride_zr,
                   BLOCK_R: tl.constexpr, acc, scale, PRECISION: tl.constexpr):
    """acc + the slot block [r0, r0 + BLOCK_R) of the low-rank term times ``scale`` (U loaded here; nothing at or
    past r_end)."""
    offs_r = r0 + tl.arange(0, BLOCK_R)
    u = tl.load(u_ptr + offs_m[:, None].to(tl.int64) * stride_um + offs_r[None, :] * stride_ur,
                mask=(offs_m[:, None] < M) & (offs_r[None, :] < r_end), other=0.0)
    return _lowrank_block(u, offs_r, b, r_end, z_ptr, offs_n, N, stride_zn, stride_zr, acc, scale, PRECISION)


@triton.jit
def _epilogue(acc, offs_m, offs_n, bad, M, N, bias_ptr, base_ptr, stride_bias, stride_basem, stride_basen,
              HAS_BIAS: tl.constexpr, HAS_BASE: tl.constexpr):
    """acc + bias + base, NaN in the rows whose rank is out of range."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n * stride_bias, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    if HAS_BASE:
        acc += tl.load(base_ptr + offs_m[:, None].to(tl.int64) * stride_basem
                       + offs_n[None, :].to(tl.int64) * stride_basen,
                       mask=(offs_m[:, None] < M) & (offs_n[None, :] < N), other=0.0).to(tl.float32)
    return tl.where(bad[:, None], float("nan"), acc)


@triton.jit
def _tile_coords(tile, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of an output tile in grouped order (triton tutorial 03): GROUP_M row blocks sweep the
    columns together, so their X rows and Y columns are reused from L2."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    group_size = GROUP_M * tl.cdiv(N, BLOCK_N)
    first_pid_m = (tile // group_size) * GROUP_M
    group_m = min(num_pid_m - first_pid_m, GROUP_M)
    return first_pid_m + (tile % group_size) % group_m, (tile % group_size) // group_m


@triton.jit
def _matmul_loop(acc, x_ptr, y_ptr, offs_m, offs_n, M, N, K,
                 stride_xm, stride_xk, stride_yn, stride_yk, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """acc + X[offs_m, :K] · Y[offs_n, :K]ᵀ, masked at every edge (K = 0 returns acc)."""
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :] * stride_xk
    y_ptrs = y_ptr + offs_k[:, None] * stride_yk + offs_n[None, :].to(tl.int64) * stride_yn
    for k0 in range(0, K, BLOCK_K):
        k_in = offs_k < K - k0
        x = tl.load(x_ptrs, mask=(offs_m[:, None] < M) & k_in[None, :], other=0.0)
        y = tl.load(y_ptrs, mask=k_in[:, None] & (offs_n[None, :] < N), other=0.0)
        acc = _dot(x, y, acc, PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        y_ptrs += BLOCK_K * stride_yk
    return acc


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------
@_autotune("shrink", "PER_ROW", "FOLD", "DROPOUT", "DROPOUT_VEC4")
@_jit
def _shrink_kernel(
        # pointers
        x_ptr, y_ptr, rank_ptr, out_ptr, u_ptr, fold_ptr, seed_ptr,
        # sizes
        M, K, R, threshold,
        # strides
        stride_xm, stride_xk, stride_yr, stride_yk, stride_om, stride_or, stride_um, stride_ur, stride_fp, stride_fk,
        # autotune key
        M_BUCKET, N_BUCKET, K_BUCKET, LAYOUT,
        # meta-parameters
        PER_ROW: tl.constexpr, FOLD: tl.constexpr, DROPOUT: tl.constexpr, DROPOUT_VEC4: tl.constexpr,
        BLOCK_R: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """out (M, R) fp32 = (X·Yᵀ) ⊙ [j < b_m], NaN rows where b_m is out of range: u = x·A[:b]ᵀ or v = g·B[:, :b].

    DROPOUT (u only, X = x): X's tiles are the adapter-dropout selection keep ⊙ X (``_dropout_keep``), so
    u = (x ⊙ keep)·A[:b]ᵀ, unscaled (1/(1 − p) is in the alpha of the kernels that read u).

    FOLD (v with one shared rank in frozen-prefix mode): the slot-block-0 program of row block p also writes
    fold[p, k] = Σ_{m in block p} (U[m, b-1]/b)·X[m, k], the partial sums of dB's trained column, from the X tiles
    it loads anyway (g is then read once for v and dB together).
    """
    pid_m, pid_r = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    b, bad = _row_ranks(rank_ptr, offs_m, M, R, PER_ROW)
    r_end = tl.max(b, axis=0)
    # A block of slots past every row's rank is all zeros: it reads neither X nor Y (unless it folds).
    k_end = tl.where(pid_r * BLOCK_R < r_end, K, 0)
    if FOLD:
        w = tl.load(u_ptr + offs_m.to(tl.int64) * stride_um + (b - 1) * stride_ur, mask=b >= 1, other=0.0)
        w = w / tl.maximum(b, 1).to(tl.float32)
        fold_here = pid_r == 0

    x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :] * stride_xk
    y_ptrs = y_ptr + offs_k[:, None] * stride_yk + offs_r[None, :] * stride_yr
    # Y's slots at or beyond r_end are never read. When the slots are Y's contiguous dimension (v: Y = Bᵀ), that
    # element-wise mask rules out asynchronous copies, so the next Y tile is loaded one iteration ahead by hand.
    slots_used = offs_r[None, :] < r_end
    if DROPOUT:
        seed = tl.load(seed_ptr)
    y_next = tl.load(y_ptrs, mask=(offs_k[:, None] < k_end) & slots_used, other=0.0)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, k_end, BLOCK_K):
        k_in = offs_k < K - k0
        y = y_next
        y_ptrs += BLOCK_K * stride_yk
        y_next = tl.load(y_ptrs, mask=(offs_k[:, None] < K - k0 - BLOCK_K) & slots_used, other=0.0)
        x = tl.load(x_ptrs, mask=(offs_m[:, None] < M) & k_in[None, :], other=0.0)
        if DROPOUT:
            x = tl.where(_dropout_keep(seed, offs_m, k0, K, threshold, BLOCK_K, DROPOUT_VEC4), x, 0.0)
        acc = _dot(x, y, acc, PRECISION)
        if FOLD:
            part = tl.sum(w[:, None] * x.to(tl.float32), axis=0)
            tl.store(fold_ptr + pid_m.to(tl.int64) * stride_fp + (k0 + offs_k).to(tl.int64) * stride_fk, part,
                     mask=k_in & fold_here)
        x_ptrs += BLOCK_K * stride_xk

    acc = tl.where(offs_r[None, :] < b[:, None], acc, 0.0)
    acc = tl.where(bad[:, None], float("nan"), acc)
    out_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_r[None, :] * stride_or
    tl.store(out_ptrs, acc, mask=(offs_m[:, None] < M) & (offs_r[None, :] < R))


@_autotune("fused", "HAS_W", "HAS_BIAS", "HAS_BASE", "PER_ROW", "DROPOUT", "DROPOUT_VEC4")
@_jit
def _fused_linear_kernel(
        # pointers
        x_ptr, y_ptr, u_ptr, z_ptr, bias_ptr, base_ptr, rank_ptr, out_ptr, seed_ptr,
        # sizes
        M, N, K, R, alpha, threshold,
        # strides
        stride_xm, stride_xk, stride_yn, stride_yk, stride_um, stride_ur, stride_zn, stride_zr,
        stride_bias, stride_basem, stride_basen, stride_om, stride_on,
        # autotune key
        M_BUCKET, N_BUCKET, K_BUCKET, LAYOUT,
        # meta-parameters
        HAS_W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_BASE: tl.constexpr, PER_ROW: tl.constexpr,
        DROPOUT: tl.constexpr, DROPOUT_VEC4: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """out (M, N) = s_m·(U ⊙ [j < b_m])·Zᵀ + [X·Yᵀ] + [bias] + [base]: the forward y and the backward dx.

    X (M, K), Y (N, K), U (M, R) fp32, Z (N, R), base (M, N). The accumulator starts as the low-rank term, the GEMM
    (skipped without a weight) accumulates onto it, bias and base join in the epilogue: out is written once.
    DROPOUT (the backward dx only: out's columns are x's K): the low-rank seed tile is the selection keep ⊙ seed
    with x's (M, N) dropout mask before the GEMM accumulates onto it (dx = g·W + keep ⊙ (s_m·v·A[:b])).
    """
    pid_m, pid_n = _tile_coords(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    b, bad = _row_ranks(rank_ptr, offs_m, M, R, PER_ROW)
    acc = _lowrank_seed(u_ptr, z_ptr, offs_m, offs_n, b, M, N, alpha, stride_um, stride_ur, stride_zn, stride_zr,
                        BLOCK_M, BLOCK_N, BLOCK_R, PRECISION)
    if DROPOUT:
        acc = tl.where(_dropout_keep(tl.load(seed_ptr), offs_m, pid_n * BLOCK_N, N, threshold, BLOCK_N,
                                   DROPOUT_VEC4), acc, 0.0)
    if HAS_W:
        acc = _matmul_loop(acc, x_ptr, y_ptr, offs_m, offs_n, M, N, K,
                           stride_xm, stride_xk, stride_yn, stride_yk, BLOCK_K, PRECISION)
    acc = _epilogue(acc, offs_m, offs_n, bad, M, N, bias_ptr, base_ptr, stride_bias, stride_basem, stride_basen,
                    HAS_BIAS, HAS_BASE)
    out_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@_autotune("decode", "HAS_W", "HAS_BIAS", "HAS_BASE", "PER_ROW", "NEED_U", "DROPOUT", "DROPOUT_VEC4")
@_jit
def _decode_kernel(
        # pointers
        x_ptr, w_ptr, a_ptr, z_ptr, bias_ptr, base_ptr, rank_ptr, out_ptr, u_ptr, seed_ptr,
        # sizes
        M, N, K, R, alpha, threshold,
        # strides
        stride_xm, stride_xk, stride_wn, stride_wk, stride_ar, stride_ak, stride_zn, stride_zr,
        stride_bias, stride_basem, stride_basen, stride_om, stride_on, stride_um, stride_ur,
        # autotune key
        M_BUCKET, N_BUCKET, K_BUCKET, LAYOUT,
        # meta-parameters
        HAS_W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_BASE: tl.constexpr, PER_ROW: tl.constexpr,
        NEED_U: tl.constexpr, DROPOUT: tl.constexpr, DROPOUT_VEC4: tl.constexpr, R_CAP: tl.constexpr,
        PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The whole forward for M ≤ BLOCK_M rows in one launch, one program per N-tile:
    y = x·Wᵀ + s_m·(u ⊙ [j < b_m])·B[:, :R_CAP]ᵀ + bias + base with u = x·A[:b]ᵀ accumulated in the same K loop
    (every program recomputes u: at this M it costs a re-read of A[:b] from L2, no extra launch, no extra pass over
    x). Program 0 also writes u (fp32, zero beyond b_m) when NEED_U. DROPOUT: u = (x ⊙ keep)·A[:b]ᵀ (the GEMM sees x)."""
    pid = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, R_CAP)
    offs_k = tl.arange(0, BLOCK_K)
    b, bad = _row_ranks(rank_ptr, offs_m, M, R, PER_ROW)
    r_end = tl.max(b, axis=0)
    if DROPOUT:
        seed = tl.load(seed_ptr)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    u = tl.zeros((BLOCK_M, R_CAP), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        k_in = k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :] * stride_xk,
                    mask=(offs_m[:, None] < M) & k_in[None, :], other=0.0)
        if HAS_W:
            w = tl.load(w_ptr + k[:, None].to(tl.int64) * stride_wk + offs_n[None, :].to(tl.int64) * stride_wn,
                        mask=k_in[:, None] & (offs_n[None, :] < N), other=0.0)
            acc = _dot(x, w, acc, PRECISION)
        a = tl.load(a_ptr + k[:, None] * stride_ak + offs_r[None, :] * stride_ar,
                    mask=k_in[:, None] & (offs_r[None, :] < r_end), other=0.0)
        if DROPOUT:
            x = tl.where(_dropout_keep(seed, offs_m, k0, K, threshold, BLOCK_K, DROPOUT_VEC4), x, 0.0)
        u = _dot(x, a, u, PRECISION)

    low_rank = _lowrank_block(u, offs_r, b, r_end, z_ptr, offs_n, N, stride_zn, stride_zr,
                              tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), 1.0, PRECISION)
    acc = _epilogue(acc + alpha * low_rank, offs_m, offs_n, bad, M, N, bias_ptr, base_ptr, stride_bias,
                    stride_basem, stride_basen, HAS_BIAS, HAS_BASE)
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :].to(tl.int64) * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))
    if NEED_U:
        u = tl.where(bad[:, None], float("nan"), tl.where(offs_r[None, :] < b[:, None], u, 0.0))
        tl.store(u_ptr + offs_m[:, None] * stride_um + offs_r[None, :] * stride_ur, u,
                 mask=(offs_m[:, None] < M) & (offs_r[None, :] < R) & (pid == 0))


@_autotune("grad", "ONE_HOT", "PER_ROW", "DROPOUT", "DROPOUT_VEC4")
@_jit
def _lora_grad_kernel(
        # pointers
        p_ptr, q_ptr, rank_ptr, part_ptr, seed_ptr,
        # sizes
        M, K, R, rows_per_split, threshold,
        # strides
        stride_pm, stride_pr, stride_qm, stride_qk, stride_ws, stride_wr, stride_wk,
        # autotune key
        M_BUCKET, N_BUCKET, K_BUCKET, LAYOUT,
        # meta-parameters
        ONE_HOT: tl.constexpr, PER_ROW: tl.constexpr, DROPOUT: tl.constexpr, DROPOUT_VEC4: tl.constexpr,
        BLOCK_R: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """part[s, j, k] (fp32) = Σ_{m in split s} trained(m, j)·(P[m, j]/b_m)·Q[m, k]: one split of dA = (v/b)ᵀ·x or
    dBᵀ = (u/b)ᵀ·g over M (grid: slot blocks × K blocks × splits, so M ≥ 2048 fills the GPU).

    P (M, R) fp32, Q (M, K); trained = [j < b_m] (full) or [j == b_m - 1] (ONE_HOT, frozen prefix). A row whose rank
    is out of range turns every slot of its P row into NaN. Every element of the split's partial is written.
    DROPOUT (dA only, Q = x): Q's tiles are keep ⊙ Q (``_dropout_keep``).
    """
    num_k = tl.cdiv(K, BLOCK_K)
    pid_r, pid_k, pid_s = tl.program_id(0) // num_k, tl.program_id(0) % num_k, tl.program_id(1)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    m_start = pid_s * rows_per_split
    m_stop = min(M, m_start + rows_per_split)
    if not PER_ROW:
        # One shared rank: a block of slots that holds no trained slot reads nothing (an out-of-range rank reads
        # everything, to spread its NaN).
        # (its own names: b and bad are per-row vectors in the loop below, and a loop-carried variable must
        # keep one type when compiled.)
        shared_b, shared_bad = _shared_rank(rank_ptr, R)
        first = pid_r * BLOCK_R
        hit = ((first <= shared_b - 1) & (shared_b - 1 < first + BLOCK_R)) if ONE_HOT else (first < shared_b)
        m_stop = tl.where(hit | shared_bad, m_stop, m_start)

    if DROPOUT:
        seed = tl.load(seed_ptr)
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    for m0 in range(m_start, m_stop, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        rows = offs_m[:, None] < m_stop
        p = tl.load(p_ptr + offs_m[:, None].to(tl.int64) * stride_pm + offs_r[None, :] * stride_pr,
                    mask=rows & (offs_r[None, :] < R), other=0.0)
        q = tl.load(q_ptr + offs_m[:, None].to(tl.int64) * stride_qm + offs_k[None, :].to(tl.int64) * stride_qk,
                    mask=rows & (offs_k[None, :] < K), other=0.0)
        if DROPOUT:
            q = tl.where(_dropout_keep(seed, offs_m, pid_k * BLOCK_K, K, threshold, BLOCK_K, DROPOUT_VEC4), q, 0.0)
        b, bad = _row_ranks(rank_ptr, offs_m, m_stop, R, PER_ROW)
        p = tl.where(bad[:, None], float("nan"), _scale_slots(p, offs_r, b, ONE_HOT))
        acc = tl.dot(tl.trans(p.to(q.dtype)), q, acc, input_precision=PRECISION)

    part_ptrs = part_ptr + pid_s.to(tl.int64) * stride_ws + offs_r[:, None] * stride_wr + offs_k[None, :] * stride_wk
    tl.store(part_ptrs, acc, mask=(offs_r[:, None] < R) & (offs_k[None, :] < K))


@_autotune("gemv", "DROPOUT", "DROPOUT_VEC4")
@_jit
def _frozen_gemv_kernel(
        # pointers
        p_ptr, q_ptr, rank_ptr, part_ptr, seed_ptr,
        # sizes
        M, K, R, rows_per_split, threshold,
        # strides
        stride_pm, stride_pr, stride_qm, stride_qk, stride_ws, stride_wk,
        # autotune key
        M_BUCKET, N_BUCKET, K_BUCKET, LAYOUT,
        # meta-parameters
        DROPOUT: tl.constexpr, DROPOUT_VEC4: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """part[s, k] (fp32) = Σ_{m in split s} (P[m, b-1]/b)·Q[m, k] for one shared rank b: one split of the frozen
    prefix's only trained row, dA[b-1] = (v[:, b-1]/b)ᵀ·x (grid: K blocks × splits). One streaming read of Q, no
    tensor cores (a GEMV). Reads nothing when b is out of range (the finish kernel writes NaN then). DROPOUT: Q's
    rows are keep ⊙ Q (Q = x: dA's row of adapter dropout)."""
    pid_k, pid_s = tl.program_id(0), tl.program_id(1)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    b, bad = _shared_rank(rank_ptr, R)
    m_start = pid_s * rows_per_split
    m_stop = tl.where(bad, m_start, min(M, m_start + rows_per_split))
    # No dot, so no software pipelining by the compiler: the next row block is loaded one iteration ahead by hand.
    offs_m = m_start + tl.arange(0, BLOCK_M)
    w_ptrs = p_ptr + offs_m.to(tl.int64) * stride_pm + (b - 1) * stride_pr
    q_ptrs = q_ptr + offs_m[:, None].to(tl.int64) * stride_qm + offs_k[None, :].to(tl.int64) * stride_qk
    rows = offs_m < m_stop
    w_next = tl.load(w_ptrs, mask=rows, other=0.0)
    q_next = tl.load(q_ptrs, mask=rows[:, None] & (offs_k[None, :] < K), other=0.0)
    if DROPOUT:
        seed = tl.load(seed_ptr)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for m0 in range(m_start, m_stop, BLOCK_M):
        w, q = w_next, q_next
        if DROPOUT:
            q = tl.where(_dropout_keep(seed, m0 + tl.arange(0, BLOCK_M), pid_k * BLOCK_K, K, threshold, BLOCK_K,
                                       DROPOUT_VEC4), q, 0.0)
        w_ptrs += BLOCK_M * stride_pm
        q_ptrs += BLOCK_M * stride_qm
        rows = offs_m < m_stop - (m0 - m_start) - BLOCK_M
        w_next = tl.load(w_ptrs, mask=rows, other=0.0)
        q_next = tl.load(q_ptrs, mask=rows[:, None] & (offs_k[None, :] < K), other=0.0)
        acc += w[:, None] * q.to(tl.float32)
    part = tl.sum(acc, axis=0) / tl.maximum(b, 1).to(tl.float32)
    tl.store(part_ptr + pid_s.to(tl.int64) * stride_ws + offs_k * stride_wk, part, mask=offs_k < K)


@_jit
def _finish_kernel(
        # pointers
        part_ptr, rank_ptr, out_ptr,
        # sizes
        K, R, n_parts, alpha,
        # strides
        stride_ws, stride_wr, stride_wk, stride_or, stride_ok,
        # meta-parameters
        ONE_SLOT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr):
    """out (R, K) in the adapter dtype = alpha·Σ_s part[s], summed in a fixed order (deterministic for a given
    BLOCK_S and device): the splits are loaded BLOCK_S at a time as one tile; lane i of the tile's split axis
    accumulates splits i, i + BLOCK_S, i + 2·BLOCK_S, ... in turn, and the BLOCK_S lane sums are added by one tl.sum
    at the end (a fixed tree for the compiled layout). A tile holds FINISH_LOAD elements (``finish_blocks``) and its
    loads feed independent accumulators: no load waits for another's sum (sm_90a SASS: 16 LDG.128 per thread per
    tile, about 4 in flight at a time, 8 KiB per program), where a loop of one load per split waited one memory
    round trip per 4 splits (ptxas unrolled it by 4, 1 KiB per program: at M = 8192 the one-slot dB's 64-256 row
    blocks took 16-64 round trips, now 1-4).

    ONE_SLOT (frozen prefix, one shared rank b): part holds one row per split, which goes to out row b-1; every
    other row is exactly 0, and all of out is NaN when b is out of range. Otherwise part[s] is (R, K).
    """
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    # The split index times stride_ws is 64-bit (S·R·K may exceed 2^31).
    if ONE_SLOT:
        b, bad = _shared_rank(rank_ptr, R)
        first = tl.program_id(0) * BLOCK_R
        s_end = tl.where((first <= b - 1) & (b - 1 < first + BLOCK_R), n_parts, 0)  # other blocks read nothing
        acc = tl.zeros((BLOCK_S, BLOCK_K), dtype=tl.float32)
        for s0 in range(0, s_end, BLOCK_S):
            offs_s = s0 + tl.arange(0, BLOCK_S)
            acc += tl.load(part_ptr + offs_s[:, None].to(tl.int64) * stride_ws + offs_k[None, :] * stride_wk,
                           mask=(offs_s[:, None] < s_end) & (offs_k[None, :] < K), other=0.0)
        out = tl.where(offs_r[:, None] == b - 1, alpha * tl.sum(acc, axis=0)[None, :], 0.0)
        out = tl.where(bad, float("nan"), out)
    else:
        acc = tl.zeros((BLOCK_S, BLOCK_R, BLOCK_K), dtype=tl.float32)
        mask = (offs_r[:, None] < R) & (offs_k[None, :] < K)
        offsets = offs_r[:, None] * stride_wr + offs_k[None, :] * stride_wk
        for s0 in range(0, n_parts, BLOCK_S):
            offs_s = s0 + tl.arange(0, BLOCK_S)
            acc += tl.load(part_ptr + offs_s[:, None, None].to(tl.int64) * stride_ws + offsets[None, :, :],
                           mask=(offs_s[:, None, None] < n_parts) & mask[None, :, :], other=0.0)
        out = alpha * tl.sum(acc, axis=0)
    out_ptrs = out_ptr + offs_r[:, None] * stride_or + offs_k[None, :].to(tl.int64) * stride_ok
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=(offs_r[:, None] < R) & (offs_k[None, :] < K))


# --------------------------------------------------------------------------------------------
# Launchers: one per kernel, taking 2-D views (any strides) and writing into the given outputs
# --------------------------------------------------------------------------------------------
# After the first call per key, each kernel launches straight through its compiled binary (launch.py).
_KERNELS = (("shrink", _shrink_kernel), ("fused", _fused_linear_kernel), ("decode", _decode_kernel),
            ("finish", _finish_kernel), ("grad", _lora_grad_kernel), ("gemv", _frozen_gemv_kernel))
_launch = {name: Launcher(kernel) for name, kernel in _KERNELS}
# The same kernels with fixed configs (``tuned=False``: deterministic results), through their own autotuners.
_launch_fixed = {name: Launcher(_autotune(name, *kernel.keys[4:], fixed=True)(kernel.fn) if name != "finish"
                                else kernel) for name, kernel in _KERNELS}


def _launcher(name: str, tuned: bool) -> Launcher:
    return (_launch if tuned else _launch_fixed)[name]


def _options(constexprs: dict, precision: str | None) -> dict:
    """The launch's constexprs, plus PRECISION: how dots with fp32 operands run ("ieee" / "tf32"; None, when no
    operand is fp32: "tf32", triton's default, which 16-bit dots ignore)."""
    return {**constexprs, "PRECISION": precision or "tf32"}


def _strides(t: torch.Tensor | None, dims: int = 2) -> tuple[int, ...]:
    return (0,) * dims if t is None else tuple(t.stride())


def dropout_args(p: float, seed: torch.Tensor | None) -> tuple | None:
    """The launch wrappers' ``dropout`` argument for drop probability p: (seed, threshold) with the seed a 0-d
    integer tensor on the kernels' device (read on the device: nothing syncs, a CUDA graph replays it) and the
    threshold floor(p·2³²) (``reference.dropout_threshold``) as the int32 with its bits, so that every p compiles the
    one binary (an int ≥ 2³¹ would be an i64 argument); None for p = 0 (no dropout: DROPOUT=False)."""
    if not p:
        return None
    threshold = dropout_threshold(p)
    return seed, threshold - (1 << 32) if threshold >= 1 << 31 else threshold


def _dropout_launch(dropout: tuple | None, cols: int) -> tuple:
    """(seed_ptr, threshold, constexprs) of a launch whose mask has ``cols`` columns: (None, 0) and DROPOUT=False
    without dropout; DROPOUT_VEC4 (one Philox call per 4 elements, ``_dropout_keep``) when cols % 4 == 0 (False
    without dropout: nothing to draw, no second binary)."""
    seed, threshold = (None, 0) if dropout is None else dropout
    return seed, threshold, dict(DROPOUT=dropout is not None, DROPOUT_VEC4=dropout is not None and cols % 4 == 0)


def shrink(x, y, rank, out, fold_u=None, fold=None, precision=None, tuned=True, dropout=None) -> int:
    """out (M, R) fp32 = (x·yᵀ) ⊙ [j < b_m] for x (M, K), y (R, K). With ``fold_u`` (one shared rank) also
    fold[p, k] = Σ_{m in row block p} (fold_u[m, b-1]/b)·x[m, k] for fold (≥ cdiv(M, 16), K) fp32. Returns the
    number of row blocks written to ``fold`` (0 without it). ``dropout`` (``dropout_args``; not with fold_u): x is
    keep ⊙ x."""
    M, K = x.shape
    R = y.shape[0]
    BLOCK_R = block_r(R)
    used = {}

    def grid(meta):
        used.update(meta)
        return cdiv(M, meta["BLOCK_M"]), cdiv(R, BLOCK_R)

    FOLD = fold_u is not None
    seed, threshold, drop_flags = _dropout_launch(dropout, K)
    _launcher("shrink", tuned)(grid, (x, y, rank, out, fold_u, fold, seed, M, K, R, threshold, *x.stride(),
                                      *y.stride(), *out.stride(), *_strides(fold_u), *_strides(fold), bucket(M),
                                      bucket(R), bucket(K), layout(x, y)),
                               _options(dict(PER_ROW=rank.dim() == 1, FOLD=FOLD, **drop_flags, BLOCK_R=BLOCK_R),
                                        precision))
    return cdiv(M, used["BLOCK_M"]) if FOLD and used else 0


def fused_linear(x, y, bias, base, u, z, rank, alpha, out, precision=None, tuned=True, dropout=None) -> torch.Tensor:
    """out (M, N) = (alpha/b_m)·(u ⊙ [j < b_m])·zᵀ + [x·yᵀ] + [bias] + [base] for x (M, K), y (N, K) or None,
    u (M, R), z (N, R), base (M, N) or None. ``dropout`` (``dropout_args``; the backward dx, out of the shape of the
    forward's x): the low-rank term is keep ⊙ term under out's (M, N) mask."""
    M, K = x.shape
    N, R = z.shape
    grid = lambda meta: (cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]),)
    seed, threshold, drop_flags = _dropout_launch(dropout, N)
    _launcher("fused", tuned)(grid, (x, y, u, z, bias, base, rank, out, seed, M, N, K, R, float(alpha), threshold,
                                     *x.stride(), *_strides(y), *u.stride(), *z.stride(), *_strides(bias, 1),
                                     *_strides(base), *out.stride(), bucket(M), bucket(N), bucket(K), layout(x, y, z)),
                              _options(dict(HAS_W=y is not None, HAS_BIAS=bias is not None, HAS_BASE=base is not None,
                                            PER_ROW=rank.dim() == 1, **drop_flags, BLOCK_R=seed_block_r(R)),
                                       precision))
    return out


# The decode kernel holds u (16 × R_CAP fp32) in registers and A's (BLOCK_K × R_CAP) tiles in shared memory:
# R_CAP = 128 spills registers or overflows shared memory in several configs (sm_90a), R_CAP = 64 in none.
DECODE_MAX_M, DECODE_MAX_R = 16, 64


def decode_linear(x, w, bias, base, a, z, rank, alpha, out, u, precision=None, tuned=True,
                  dropout=None) -> torch.Tensor:
    """out (M ≤ 16, N) = x·wᵀ + (alpha/b_m)·(x·aᵀ ⊙ [j < b_m])·zᵀ + [bias] + [base] in one launch; writes u
    (M, R) fp32 when it is not None. ``dropout`` (``dropout_args``): u = (keep ⊙ x)·aᵀ."""
    M, K = x.shape
    N, R = z.shape
    grid = lambda meta: (cdiv(N, meta["BLOCK_N"]),)
    seed, threshold, drop_flags = _dropout_launch(dropout, K)
    _launcher("decode", tuned)(grid, (x, w, a, z, bias, base, rank, out, u, seed, M, N, K, R, float(alpha), threshold,
                                      *x.stride(), *_strides(w), *a.stride(), *z.stride(), *_strides(bias, 1),
                                      *_strides(base), *out.stride(), *_strides(u), bucket(M), bucket(N), bucket(K),
                                      layout(x, w, a, z)),
                               _options(dict(HAS_W=w is not None, HAS_BIAS=bias is not None, HAS_BASE=base is not None,
                                             PER_ROW=rank.dim() == 1, NEED_U=u is not None, **drop_flags,
                                             R_CAP=next_power_of_2(max(16, R)), BLOCK_M=DECODE_MAX_M), precision))
    return out


# fp32 elements one finish program loads per step: 64 registers per thread at 4 warps, 32 KiB in flight.
FINISH_LOAD = 8192


def finish_blocks(R: int, one_slot: bool) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_K, BLOCK_S) of a finish launch: output tiles of 2048 elements at most (at r_max 64, 64 × 32:
    128 programs for K = 4096 on a 132-SM GPU, where 64 × 64 left half of it idle), rows of at least 32 columns
    (128-byte loads), and BLOCK_S splits per load, FINISH_LOAD elements in all (a one-slot part row is BLOCK_K
    long, a full part tile BLOCK_R × BLOCK_K)."""
    BLOCK_R = block_r(R)
    BLOCK_K = max(32, 2048 // BLOCK_R)
    return BLOCK_R, BLOCK_K, FINISH_LOAD // (BLOCK_K if one_slot else BLOCK_R * BLOCK_K)


def finish(part, n_parts, rank, alpha, one_slot, out) -> torch.Tensor:
    """out (R, K) = alpha·Σ_{s < n_parts} part[s] (part (S, R, K), or (S, K) into row b-1 with ``one_slot``)."""
    R, K = out.shape
    BLOCK_R, BLOCK_K, BLOCK_S = finish_blocks(R, bool(one_slot))
    ws, wk = part.stride(0), part.stride(-1)
    wr = part.stride(1) if part.dim() == 3 else 0
    _launch["finish"]((cdiv(R, BLOCK_R), cdiv(K, BLOCK_K)),
                      (part, rank, out, K, R, n_parts, float(alpha), ws, wr, wk, *out.stride()),
                      dict(ONE_SLOT=bool(one_slot), BLOCK_R=BLOCK_R, BLOCK_K=BLOCK_K, BLOCK_S=BLOCK_S))
    return out


def lora_grad(p, q, rank, alpha, frozen_prefix, out, precision=None, tuned=True, dropout=None) -> torch.Tensor:
    """out (R, K) = Σ_m (alpha/b_m)·trained(m, j)·p[m, j]·q[m, k] for p (M, R) fp32, q (M, K): fp32 partials over
    splits of M, then the fixed-order reduction (deterministic for a given M, device and config). ``dropout``
    (``dropout_args``; dA, q = x): q is keep ⊙ q."""
    M, K = q.shape
    R = p.shape[1]
    BLOCK_R = block_r(R)
    splits, rows = split_rows(M, cdiv(R, BLOCK_R) * cdiv(K, 128), num_sms(q.device))
    part = torch.empty(splits, R, K, device=q.device, dtype=torch.float32)
    grid = lambda meta: (cdiv(R, BLOCK_R) * cdiv(K, meta["BLOCK_K"]), splits)
    seed, threshold, drop_flags = _dropout_launch(dropout, K)
    _launcher("grad", tuned)(grid, (p, q, rank, part, seed, M, K, R, rows, threshold, *p.stride(), *q.stride(),
                                    *part.stride(), bucket(M), bucket(R), bucket(K), layout(p, q)),
                             _options(dict(ONE_HOT=bool(frozen_prefix), PER_ROW=rank.dim() == 1, **drop_flags,
                                           BLOCK_R=BLOCK_R), precision))
    return finish(part, splits, rank, alpha, False, out)


def frozen_grad(p, q, rank, alpha, out, tuned=True, dropout=None) -> torch.Tensor:
    """out (R, K): row b-1 = (alpha/b)·p[:, b-1]ᵀ·q for one shared rank b, every other row exactly 0. ``dropout``
    (``dropout_args``; q = x): q is keep ⊙ q."""
    M, K = q.shape
    R = p.shape[1]
    splits, rows = split_rows(M, cdiv(K, 128), num_sms(q.device))
    part = torch.empty(splits, K, device=q.device, dtype=torch.float32)
    grid = lambda meta: (cdiv(K, meta["BLOCK_K"]), splits)
    seed, threshold, drop_flags = _dropout_launch(dropout, K)
    _launcher("gemv", tuned)(grid, (p, q, rank, part, seed, M, K, R, rows, threshold, *p.stride(), *q.stride(),
                                    *part.stride(), bucket(M), bucket(R), bucket(K), layout(p, q)),
                             drop_flags)
    return finish(part, splits, rank, alpha, True, out)
