"""The fused linear kernel for sm_90+ (the "tma" variant): persistent grid, TMA tensor descriptors.

    out = s_m·(U ⊙ [j < b_m])·Zᵀ + X·Yᵀ + [bias] + [base]        (s_m = alpha / b_m)
          forward  y  (X = x, Y = W (N, K) read as is,             U = u, Z = B)
          backward dx (X = g, Y = W (N, K) read as (K_out, N_contr), U = v, Z = Aᵀ)

The same computation as ``kernels._fused_linear_kernel`` (and built from the same helpers); only the GEMM's data
movement differs. One program per SM (or two: CTAS_PER_SM) walks the output tiles (grouped order, for L2 reuse).
Per tile, the fp32 accumulator starts as the low-rank term (U and Z through masked pointer loads, never past the
tile's largest rank; FLATTEN and LOWRANK_LAST configs add it after the K loop instead), then the K loop streams X
and Y tiles through TMA descriptors into shared memory, software-pipelined over num_stages buffers (wgmma on
Hopper), and the epilogue adds bias and base and stores the tile through a TMA descriptor, in two halves with
EPILOGUE_SUBTILE (the store buffer takes half a tile of shared memory; the second half waits until the TMA engine
has read the first out of it).

Descriptors are built on the host (``TensorDescriptor``) with the block shapes of the config that runs. TMA needs
16-byte aligned base pointers and row strides, unit last strides and 16-bit dtypes here: ``applies`` says when
that holds, and the kernel contract offers this variant only then. Triton's interpreter runs these descriptors too
(tests run the kernel on CPU tensors); the sm_90a compilation is checked by tests/sm90_compile.py.

Configs are chosen by a dispatch.Dispatcher rather than triton.autotune: each candidate config builds its own
descriptors, so no pre_hook rewrites block shapes per launch (triton 3.6 also skips its on-disk autotune cache
for configs with pre_hooks), and the choice per key (shape buckets, dtypes, flags) is timed once per GPU model
and kept on disk, beside the dispatcher's (``<cache>/tma_configs``). Configs that do not compile (out of shared
memory) are ruled out, as the autotuner does.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources, PTXASError
from triton.tools.tensor_descriptor import TensorDescriptor

from ..backends import tma_ready
from ..dispatch import Dispatcher, default_cache_dir
from .kernels import (_INTERPRET, _configs, _epilogue, _lowrank_into, _lowrank_seed, _lowrank_slots, _prune,
                      _row_ranks, _scale_slots, _strides, _tile_coords, bucket, cdiv, num_sms, seed_block_r)
from .launch import Launcher

DTYPES = (torch.float16, torch.bfloat16)


@triton.jit(do_not_specialize=["M"])
def _fused_linear_tma_kernel(
        # TMA descriptors and pointers
        x_desc, y_desc, out_desc, u_ptr, z_ptr, bias_ptr, base_ptr, rank_ptr,
        # sizes
        M, N, K, R, alpha,
        # strides
        stride_um, stride_ur, stride_zn, stride_zr, stride_bias, stride_basem, stride_basen,
        # meta-parameters
        Y_KN: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_BASE: tl.constexpr, PER_ROW: tl.constexpr,
        BLOCK_R: tl.constexpr, NUM_SMS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, EPILOGUE_SUBTILE: tl.constexpr, FLATTEN: tl.constexpr,
        LOWRANK_LAST: tl.constexpr, CTAS_PER_SM: tl.constexpr, R_BLOCKS: tl.constexpr, PRECISION: tl.constexpr):
    """out (M, N) = s_m·(U ⊙ [j < b_m])·Zᵀ + X·Yᵀ + [bias] + [base], persistent over output tiles.

    X (M, K) and Y ((N, K), or (K, N) with Y_KN) through TMA descriptors; U (M, R) fp32, Z (N, R), bias, base
    through pointers; out through a TMA descriptor of block (BLOCK_M, BLOCK_N / 2) with EPILOGUE_SUBTILE.

    FLATTEN: one flattened loop over (tile, K block) (tl.range(..., flatten=True)), so the next tile's first TMA
    loads are issued while this tile's epilogue runs; the low-rank term is then added after the K loop, its
    R_BLOCKS slot blocks unrolled (a seed before the K loop left the flattened loop unpipelined, and a loop
    inside it stops the flattening: triton 3.6, sm_90a, checked by tests/sm90_compile.py). Otherwise one K loop
    per tile, seeded with the low-rank term, or with LOWRANK_LAST, the term added after the K loop from U and Z
    tiles of the first slot block loaded before it (their loads in flight with the K loop's first TMA loads; the
    seed's dot must complete before those are issued). Which is faster is measured per shape (hopper's config
    tuner).

    CTAS_PER_SM: persistent programs per SM (the grid is min(NUM_SMS·CTAS_PER_SM, tiles)); 2 lets a second
    program's K loop fill the bubbles of the first's tile changes, where shared memory (≤ 113 KiB) and registers
    allow two per SM.
    """
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    for tile in tl.range(tl.program_id(0), num_tiles, NUM_SMS * CTAS_PER_SM, flatten=FLATTEN):
        pid_m, pid_n = _tile_coords(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        m0, n0 = pid_m * BLOCK_M, pid_n * BLOCK_N
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_n = n0 + tl.arange(0, BLOCK_N)
        b, bad = _row_ranks(rank_ptr, offs_m, M, R, PER_ROW)
        if FLATTEN:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        elif LOWRANK_LAST:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            r_end = tl.max(b, axis=0)
            offs_r = tl.arange(0, BLOCK_R)
            u0 = tl.load(u_ptr + offs_m[:, None].to(tl.int64) * stride_um + offs_r[None, :] * stride_ur,
                         mask=(offs_m[:, None] < M) & (offs_r[None, :] < r_end), other=0.0)
            z0 = tl.load(z_ptr + offs_r[:, None] * stride_zr + offs_n[None, :].to(tl.int64) * stride_zn,
                         mask=(offs_r[:, None] < r_end) & (offs_n[None, :] < N), other=0.0)
        else:
            acc = _lowrank_seed(u_ptr, z_ptr, offs_m, offs_n, b, M, N, alpha, stride_um, stride_ur, stride_zn,
                                stride_zr, BLOCK_M, BLOCK_N, BLOCK_R, PRECISION)
        for ki in range(k_tiles):
            x = x_desc.load([m0, ki * BLOCK_K])
            if Y_KN:
                acc = tl.dot(x, y_desc.load([ki * BLOCK_K, n0]), acc)
            else:
                acc = tl.dot(x, y_desc.load([n0, ki * BLOCK_K]).T, acc)
        if FLATTEN:
            acc = _lowrank_into(acc, u_ptr, z_ptr, offs_m, offs_n, b, M, N, alpha, stride_um, stride_ur, stride_zn,
                                stride_zr, BLOCK_M, BLOCK_N, BLOCK_R, R_BLOCKS, PRECISION)
        elif LOWRANK_LAST:
            acc = _lowrank_last(acc, u0, z0, offs_r, r_end, u_ptr, z_ptr, offs_m, offs_n, b, M, N, alpha, stride_um,
                                stride_ur, stride_zn, stride_zr, BLOCK_M, BLOCK_N, BLOCK_R, R_BLOCKS, PRECISION)

        if EPILOGUE_SUBTILE:  # two (BLOCK_M, BLOCK_N / 2) stores: half the shared-memory store buffer
            acc0, acc1 = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
            _store_tile(out_desc, acc0, m0, n0, offs_m, bad, M, N, bias_ptr, base_ptr, stride_bias,
                        stride_basem, stride_basen, HAS_BIAS, HAS_BASE, BLOCK_N // 2)
            _store_tile(out_desc, acc1, m0, n0 + BLOCK_N // 2, offs_m, bad, M, N, bias_ptr, base_ptr, stride_bias,
                        stride_basem, stride_basen, HAS_BIAS, HAS_BASE, BLOCK_N // 2)
        else:
            _store_tile(out_desc, acc, m0, n0, offs_m, bad, M, N, bias_ptr, base_ptr, stride_bias, stride_basem,
                        stride_basen, HAS_BIAS, HAS_BASE, BLOCK_N)


@triton.jit
def _lowrank_last(acc, u0, z0, offs_r, r_end, u_ptr, z_ptr, offs_m, offs_n, b, M, N, alpha, stride_um, stride_ur,
                  stride_zn, stride_zr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                  R_BLOCKS: tl.constexpr, PRECISION: tl.constexpr):
    """acc + the low-rank term, as ``kernels._lowrank_into`` adds it (the same scaling rule: alpha on the fp32
    operand, or the term summed apart for fp16 Z), with the first slot block's U and Z already loaded (u0, z0:
    masked at the tile's largest rank r_end) and the other R_BLOCKS - 1 blocks loaded here."""
    apart: tl.constexpr = z_ptr.dtype.element_ty == tl.float16
    if apart:
        term, scale = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), 1.0
    else:
        term, scale = acc, alpha
    term = tl.dot((_scale_slots(u0, offs_r, b, False) * scale).to(z0.dtype), z0, term, input_precision=PRECISION)
    for i in tl.static_range(1, R_BLOCKS):
        term = _lowrank_slots(u_ptr, z_ptr, offs_m, offs_n, b, r_end, i * BLOCK_R, M, N, stride_um, stride_ur,
                              stride_zn, stride_zr, BLOCK_R, term, scale, PRECISION)
    if apart:
        return acc + term * alpha
    return term


@triton.jit
def _store_tile(out_desc, acc, m0, n0, offs_m, bad, M, N, bias_ptr, base_ptr, stride_bias, stride_basem,
                stride_basen, HAS_BIAS: tl.constexpr, HAS_BASE: tl.constexpr, WIDTH: tl.constexpr):
    """Epilogue of one (BLOCK_M, WIDTH) piece of a tile at (m0, n0): + bias + base, NaN rows, TMA store (the
    descriptor clips rows and columns past the edges)."""
    offs_n = n0 + tl.arange(0, WIDTH)
    acc = _epilogue(acc, offs_m, offs_n, bad, M, N, bias_ptr, base_ptr, stride_bias, stride_basem, stride_basen,
                    HAS_BIAS, HAS_BASE)
    out_desc.store([m0, n0], acc.to(out_desc.dtype))


_LAUNCH = Launcher(_fused_linear_tma_kernel)  # launch.py: after the first call per key, no triton Python
CONFIGS = _configs("tma")
_CONFIG_TUNER = Dispatcher(cache_dir=default_cache_dir() / "tma_configs",
                           skip=(OutOfResources, PTXASError))
_CHOSEN: dict[tuple, triton.Config] = {}  # key -> the config measured fastest (the tuner's memory, without its key)


# --------------------------------------------------------------------------------------------
# Where TMA applies, and the launcher
# --------------------------------------------------------------------------------------------
def _tma_ok(t: torch.Tensor) -> bool:
    """A 2-D tensor TMA can address: non-empty, unit last stride, 16-byte aligned base and row stride."""
    return t.dim() == 2 and t.numel() > 0 and tma_ready(t)


@functools.lru_cache(maxsize=None)
def _device_has_tma(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 9
    return _INTERPRET and device.type == "cpu"  # the interpreter runs TMA descriptors on CPU tensors


def _device_ok(t: torch.Tensor) -> bool:
    return _device_has_tma(t.device)


def applies(x: torch.Tensor, weight: torch.Tensor | None, out_cols: int) -> bool:
    """Whether the kernel can run with X = x (the forward's x, or the backward's g) against weight as stored,
    writing a new contiguous (M, out_cols) output: sm_90+, 16-bit dtype shared with the weight, every TMA
    operand 16-byte aligned with a unit last stride."""
    return (weight is not None and x.dtype in DTYPES and weight.dtype == x.dtype and _device_ok(x)
            and _tma_ok(x) and _tma_ok(weight) and out_cols > 0 and (out_cols * x.element_size()) % 16 == 0)


def applies_dx(x: torch.Tensor, weight: torch.Tensor | None) -> bool:
    """``applies`` for dx = g·W with g a contiguous (M, N) tensor of x's dtype, as autograd hands it (the
    backward checks the real g before it launches)."""
    return (weight is not None and x.shape[0] > 0 and (weight.shape[0] * x.element_size()) % 16 == 0
            and x.dtype in DTYPES and weight.dtype == x.dtype and _device_ok(x) and _tma_ok(weight)
            and (weight.shape[1] * x.element_size()) % 16 == 0)


def _config_name(c: triton.Config) -> str:
    k = c.kwargs
    return (f"{k['BLOCK_M']}x{k['BLOCK_N']}x{k['BLOCK_K']} g{k['GROUP_M']} sub{int(k['EPILOGUE_SUBTILE'])} "
            f"w{c.num_warps} s{c.num_stages}" + (" flat" if k["FLATTEN"] else "")
            + (" last" if k["LOWRANK_LAST"] else "") + (f" x{k['CTAS_PER_SM']}" if k["CTAS_PER_SM"] > 1 else ""))


def fused_linear(x, w, w_kn, bias, base, u, z, rank, alpha, out, tuned=True, precision=None) -> torch.Tensor:
    """out (M, N) = (alpha/b_m)·(u ⊙ [j < b_m])·zᵀ + x·Wᵀ + [bias] + [base] for x (M, K) and the weight ``w`` as
    stored: (N, K) (the forward), or (K, N) with ``w_kn`` (the backward's Wᵀ, read without a copy); u (M, R) fp32,
    z (N, R), out (M, N) contiguous. Callers check ``applies`` first. ``tuned=False``: the first config that
    ``_prune`` keeps, nothing timed (deterministic results). ``precision``: how the low-rank term's dots run when the
    adapters are fp32 ("ieee" / "tf32"; None: "tf32")."""
    M, K = x.shape
    N, R = z.shape
    sms = num_sms(x.device)
    block_r = seed_block_r(R)
    flags = dict(Y_KN=bool(w_kn), HAS_BIAS=bias is not None, HAS_BASE=base is not None, PER_ROW=rank.dim() == 1,
                 BLOCK_R=block_r, NUM_SMS=sms, R_BLOCKS=cdiv(R, block_r), PRECISION=precision or "tf32")
    key = config_key(M, N, K, x.dtype, z.dtype, rank.dtype, flags)
    config = _CHOSEN.get(key) if tuned else _prune(CONFIGS, dict(M_BUCKET=key[0], N_BUCKET=key[1], K_BUCKET=key[2]))[0]
    if config is None:
        config = _choose_config(key, x, w, bias, base, u, z, rank, alpha, out, flags)
    return _run(config, x, w, bias, base, u, z, rank, alpha, out, flags)


def config_key(M, N, K, x_dtype, z_dtype, rank_dtype, flags) -> tuple:
    """The key of the config choice (_CHOSEN): shape buckets, dtypes and the constexpr flags."""
    return (bucket(M), bucket(N), bucket(K), x_dtype, z_dtype, rank_dtype, *flags.values())


def descriptor_blocks(config, y_kn) -> tuple[list[int], list[int], list[int]]:
    """The block shapes of the X, Y and out descriptors of a launch with ``config``."""
    BM, BN, BK = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.kwargs["BLOCK_K"]
    return [BM, BK], ([BK, BN] if y_kn else [BN, BK]), [BM, BN // 2 if config.kwargs["EPILOGUE_SUBTILE"] else BN]


def _choose_config(key, *args) -> triton.Config:
    """The fastest config for ``key`` (timed once per GPU model; the only one under the interpreter)."""
    x = args[0]
    candidates = _prune(CONFIGS, dict(M_BUCKET=key[0], N_BUCKET=key[1], K_BUCKET=key[2]))
    by_name = {_config_name(c): c for c in candidates}
    device_name = torch.cuda.get_device_name(x.device) if x.is_cuda else x.device.type
    portable = tuple(str(k) if isinstance(k, torch.dtype) else k for k in key)
    name = _CONFIG_TUNER.choose(device_name, portable, {n: functools.partial(_run, c, *args)
                                                        for n, c in by_name.items()})
    if (device_name, *portable) in _CONFIG_TUNER.memory or len(by_name) == 1:  # measured (not a capture default)
        _CHOSEN[key] = by_name[name]
    return by_name[name]


def _run(config, x, w, bias, base, u, z, rank, alpha, out, flags) -> torch.Tensor:
    """One launch with ``config``: descriptors with its block shapes, the persistent grid."""
    M, K = x.shape
    N, R = z.shape
    x_block, w_block, out_block = descriptor_blocks(config, flags["Y_KN"])
    descs = (TensorDescriptor(x, [M, K], list(x.stride()), x_block),
             TensorDescriptor(w, list(w.shape), list(w.stride()), w_block),
             TensorDescriptor(out, [M, N], list(out.stride()), out_block))
    programs = flags["NUM_SMS"] * config.kwargs["CTAS_PER_SM"]
    grid = (min(programs, cdiv(M, out_block[0]) * cdiv(N, config.kwargs["BLOCK_N"])),)
    _LAUNCH(grid, (*descs, u, z, bias, base, rank, M, N, K, R, float(alpha),
                   *u.stride(), *z.stride(), *_strides(bias, 1), *_strides(base)),
            {**flags, **config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages})
    return out
