"""DyLoRA on convolutions: the public functions, their validation (written once) and the fake impls.

    dylora_conv2d(x, W, bias, A, B, rank, alpha, stride=, padding=, dilation=)
        y = conv2d(x, W) + bias + (α/b)·conv1x1(conv2d(x, A[:b]), B[:, :b])
    dylora_conv1d / dylora_conv3d: the same with one / three spatial dimensions
      validate (here, once) → torch.ops.dylora.conv (csrc/conv.cpp: autograd, autocast)
        → torch.ops.dylora.conv_forward / conv_backward: ATen convolutions on views of A and B
          (oneDNN on CPU, cuDNN on CUDA), the rank read on the host (a CPU tensor) or on the device

Shapes: x (N, C_in, *spatial); weight (C_out, C_in, *k); lora_A (r_max, C_in, *k) — the first conv,
with the base layer's kernel size, stride, padding and dilation; lora_B (C_out, r_max) — the 1×1
expand (PEFT stores it as a (C_out, r, 1, 1) Conv2d weight). The rank: an int, a 0-d integer tensor,
or a 1-D integer tensor with one rank per sample (x.shape[0] entries). groups = 1 only.
"""
from __future__ import annotations

import numbers

import torch
from torch import Tensor

from . import ops

DTYPES = (torch.float32, torch.float64, torch.bfloat16)  # CPU (oneDNN); CUDA also float16
CUDA_DTYPES = DTYPES + (torch.float16,)


def dylora_conv2d(x: Tensor, weight: Tensor | None, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor, rank,
                  alpha, *, stride=1, padding=0, dilation=1, frozen_prefix: bool = False,
                  base: Tensor | None = None) -> Tensor:
    """``y = conv2d(x, W) + bias + base + (alpha/b)·conv1x1(conv2d(x, A[:b]), B[:, :b])``, rank b at run time.

    Args:
        x: (N, C_in, H, W) input.
        weight: (C_out, C_in, kh, kw) frozen base weight, or None (the low-rank term alone, plus
            ``base`` and ``bias`` if given); bias: (C_out,) or None. Same dtype as x.
        lora_A: (r_max, C_in, kh, kw) (the kernel size of weight); lora_B: (C_out, r_max). Their dtype
            may differ from x's (float32 adapters on a bfloat16 model): they are cast to x's dtype.
        rank: an int in [1, r_max], a 0-d integer tensor, or a 1-D integer tensor with one rank per
            sample (N entries).
        alpha: the LoRA alpha; the low-rank term is scaled by alpha / b.
        stride, padding, dilation: of the base convolution (an int or a pair); lora_A uses the same.
        frozen_prefix: in the backward, train only slot b-1 of A and B (DyLoRA's frozen mode).
        base: (N, C_out, H_out, W_out) a base output the term is added to (its gradient passes through).
    Returns:
        (N, C_out, H_out, W_out) tensor in x's dtype.
    """
    return _call(2, x, weight, bias, base, lora_A, lora_B, rank, alpha, stride, padding, dilation, frozen_prefix)


def dylora_conv1d(x: Tensor, weight: Tensor | None, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor, rank,
                  alpha, *, stride=1, padding=0, dilation=1, frozen_prefix: bool = False,
                  base: Tensor | None = None) -> Tensor:
    """:func:`dylora_conv2d` for x (N, C_in, L), weight and lora_A (·, C_in, k)."""
    return _call(1, x, weight, bias, base, lora_A, lora_B, rank, alpha, stride, padding, dilation, frozen_prefix)


def dylora_conv3d(x: Tensor, weight: Tensor | None, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor, rank,
                  alpha, *, stride=1, padding=0, dilation=1, frozen_prefix: bool = False,
                  base: Tensor | None = None) -> Tensor:
    """:func:`dylora_conv2d` for x (N, C_in, D, H, W), weight and lora_A (·, C_in, kd, kh, kw)."""
    return _call(3, x, weight, bias, base, lora_A, lora_B, rank, alpha, stride, padding, dilation, frozen_prefix)


def _call(dims, x, weight, bias, base, lora_A, lora_B, rank, alpha, stride, padding, dilation, frozen_prefix):
    if ops._C is None:
        raise RuntimeError(f"dylora_conv{dims}d needs the C++ extension, which failed to import ({ops._C_ERROR}); "
                           "build it with `pip install --no-build-isolation -e .`")
    geometry = [_int_tuple(name, v, dims, low) for name, v, low in
                (("stride", stride, 1), ("padding", padding, 0), ("dilation", dilation, 1))]
    _check_tensors(dims, x, weight, bias, base, lora_A, lora_B, *geometry)
    if type(frozen_prefix) is not bool:
        raise TypeError(f"frozen_prefix must be a bool, got {type(frozen_prefix).__name__} {frozen_prefix!r}")
    r_max = lora_A.shape[0]
    if isinstance(rank, Tensor):
        if rank.dim() > 1 or (rank.dim() == 1 and rank.shape[0] != x.shape[0]):
            raise ValueError(f"rank tensor must be 0-d or 1-D with one rank per sample ({x.shape[0]} for x of "
                             f"shape {tuple(x.shape)}), got shape {tuple(rank.shape)}")
        rank = ops._check_rank_tensor(rank, x.device, "x's device", None)
    else:
        rank = ops._host_rank(ops.check_int_rank(rank, r_max))
    alpha = ops.check_alpha(alpha, ops.intermediate_dtype(x.dtype, lora_A.dtype))
    return torch.ops.dylora.conv(x, weight, bias, base, lora_A, lora_B, rank, alpha, *geometry, frozen_prefix)


def _int_tuple(name: str, value, dims: int, low: int) -> list[int]:
    """An int or a sequence of ``dims`` ints, each >= low, as a list (what the op's int[] takes)."""
    values = [value] * dims if isinstance(value, numbers.Integral) and not isinstance(value, bool) else value
    if isinstance(values, str):
        raise ValueError(f"{name}={value!r}: string padding is not supported by the op; pass ints "
                         "(DyLoRAConv{1,2,3}d.from_conv resolves padding='same'/'valid')")
    try:
        values = list(values)
    except TypeError:
        values = None
    if (values is None or len(values) != dims
            or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= low for v in values)):
        raise ValueError(f"{name} must be an int >= {low} or a sequence of {dims} such ints, got {value!r}")
    return [int(v) for v in values]


def out_size(size: int, k: int, stride: int, padding: int, dilation: int) -> int:
    """A convolution's output length along one dimension (PyTorch's formula)."""
    return (size + 2 * padding - dilation * (k - 1) - 1) // stride + 1


def _check_tensors(dims, x, weight, bias, base, lora_A, lora_B, stride, padding, dilation) -> None:
    """Shapes, devices and dtypes, or a clear error (once per call, here and nowhere below)."""
    for name, t, optional in (("x", x, False), ("weight", weight, True), ("bias", bias, True),
                              ("base", base, True), ("lora_A", lora_A, False), ("lora_B", lora_B, False)):
        if not (isinstance(t, Tensor) or (optional and t is None)):
            raise TypeError(f"{name} must be a torch.Tensor{' or None' if optional else ''}, got {type(t).__name__}")
    kernel = "(kh, kw)" if dims == 2 else ("(k,)" if dims == 1 else "(kd, kh, kw)")
    if x.ndim != dims + 2:
        raise ValueError(f"x must be {dims + 2}-D (N, C_in, {'spatial' if dims > 1 else 'L'}...) for a {dims}-d "
                         f"convolution, got shape {tuple(x.shape)} (unbatched input: x.unsqueeze(0))")
    if lora_A.ndim != dims + 2:
        raise ValueError(f"lora_A must be {dims + 2}-D (r_max, C_in, *{kernel}), got shape {tuple(lora_A.shape)}")
    r_max, C_in, ksize = lora_A.shape[0], lora_A.shape[1], tuple(lora_A.shape[2:])
    if r_max == 0:
        raise ValueError("lora_A has r_max = 0 rows: DyLoRA needs r_max >= 1")
    if x.shape[1] != C_in:
        raise ValueError(f"x has {x.shape[1]} channels but lora_A expects C_in = lora_A.shape[1] = {C_in}")
    if weight is None:
        C_out = lora_B.shape[0] if lora_B.ndim else 0
    else:
        if weight.ndim != dims + 2:
            raise ValueError(f"weight must be {dims + 2}-D (C_out, C_in, *{kernel}), got {tuple(weight.shape)}")
        if weight.shape[1] != C_in:
            raise ValueError(f"weight has C_in = {weight.shape[1]} input channels but lora_A and x have {C_in} "
                             "(grouped convolutions are not supported: groups = 1 only)")
        if tuple(weight.shape[2:]) != ksize:
            raise ValueError(f"lora_A's kernel size {ksize} must equal weight's {tuple(weight.shape[2:])}")
        C_out = weight.shape[0]
    if lora_B.shape != (C_out, r_max):
        raise ValueError(f"lora_B must have shape (C_out, r_max) = ({C_out}, {r_max}), got {tuple(lora_B.shape)} "
                         "(a PEFT lora_B Conv weight (C_out, r, 1, 1) is passed as weight.flatten(1))")
    if bias is not None and bias.shape != (C_out,):
        raise ValueError(f"bias must have shape (C_out,) = ({C_out},) or be None, got {tuple(bias.shape)}")
    spatial = [out_size(n, k, s, p, d) for n, k, s, p, d in zip(x.shape[2:], ksize, stride, padding, dilation)]
    if any(n < 1 for n in spatial):
        raise ValueError(f"input spatial size {tuple(x.shape[2:])} (padded by {tuple(padding)}) is smaller than "
                         f"the dilated kernel {ksize} (dilation {tuple(dilation)}): no output")
    if base is not None and base.shape != (x.shape[0], C_out, *spatial):
        raise ValueError(f"base must have the convolution's output shape {(x.shape[0], C_out, *spatial)}, "
                         f"got {tuple(base.shape)}")
    device = x.device
    named = (("x", x), ("weight", weight), ("bias", bias), ("base", base), ("lora_A", lora_A), ("lora_B", lora_B))
    if any(t is not None and t.device != device for _, t in named):
        devices = {n: str(t.device) for n, t in named if t is not None}
        raise ValueError(f"x, weight, bias, base, lora_A and lora_B must be on one device, got {devices}")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"dylora_conv has kernels for CPU and CUDA tensors, got x on {device}")
    allowed = CUDA_DTYPES if device.type == "cuda" else DTYPES
    for name, t in named:
        if t is not None and t.dtype not in allowed:
            names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
            raise TypeError(f"dylora_conv on {device.type} supports dtypes {names}; got {name} {t.dtype}")
    ops._check_mixed_dtypes(x, weight, bias, base, lora_A, lora_B)


# --------------------------------------------------------------------------------------------
# Fake implementations (torch.compile, opcheck)
# --------------------------------------------------------------------------------------------
def _out_shape(x, weight, lora_A, lora_B, stride, padding, dilation) -> list:
    C_out = weight.shape[0] if weight is not None else lora_B.shape[0]
    spatial = [out_size(n, k, s, p, d)
               for n, k, s, p, d in zip(x.shape[2:], lora_A.shape[2:], stride, padding, dilation)]
    return [x.shape[0], C_out, *spatial]


def _fake_conv(x, weight, bias, base, lora_A, lora_B, rank, alpha, stride, padding, dilation, frozen_prefix):
    return x.new_empty(_out_shape(x, weight, lora_A, lora_B, stride, padding, dilation))


def _fake_forward(x, weight, bias, base, lora_A, lora_B, rank, alpha, stride, padding, dilation, need_u):
    shape = _out_shape(x, weight, lora_A, lora_B, stride, padding, dilation)
    return x.new_empty(shape), x.new_empty([shape[0], lora_A.shape[0], *shape[2:]] if need_u else [0])


def _fake_backward(grad, x, weight, lora_A, lora_B, u, rank, alpha, stride, padding, dilation, frozen_prefix,
                   compute_dx, compute_lora):
    empty_or = lambda t, wanted: t.new_empty(t.shape if wanted else (0,))
    return empty_or(x, compute_dx), empty_or(lora_A, compute_lora), empty_or(lora_B, compute_lora)


if ops._C is not None:
    torch.library.register_fake("dylora::conv")(_fake_conv)
    torch.library.register_fake("dylora::conv_forward")(_fake_forward)
    torch.library.register_fake("dylora::conv_backward")(_fake_backward)


def merged_delta(lora_A: Tensor, lora_B: Tensor, rank: int, alpha: float, dtype: torch.dtype) -> Tensor:
    """(alpha/b)·B[:, :b]·A[:b] as a convolution weight (C_out, C_in, *k), in ``dtype``: what merging adds to W
    (a 1×1 conv after a k×k conv with the same stride is one k×k conv)."""
    A = lora_A[:rank].to(dtype)
    return (alpha / rank) * (lora_B[:, :rank].to(dtype) @ A.flatten(1)).view(lora_B.shape[0], *A.shape[1:])


__all__ = ["dylora_conv1d", "dylora_conv2d", "dylora_conv3d", "merged_delta"]
