"""DyLoRALinear: a drop-in nn.Linear with a DyLoRA adapter whose rank is chosen at run time."""
from __future__ import annotations

import math
import numbers
import sys

import torch
from torch import Tensor, nn

from .conv import dylora_conv1d, dylora_conv2d, dylora_conv3d
from .ops import check_alpha, check_dropout, check_int_rank, check_rank, dylora_linear


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is transformers' ``Conv1D`` (GPT-2's linear layers, weight stored (K, N)).
    Looked up, not imported: without transformers imported no Conv1D can exist."""
    utils = sys.modules.get("transformers.pytorch_utils")
    return utils is not None and isinstance(module, utils.Conv1D)


class DyLoRALinear(nn.Module):
    """``y = x·Wᵀ + bias + (alpha/b)·(x·A[:b]ᵀ)·B[:, :b]ᵀ`` with a frozen base layer.

    ``lora_A`` (r_max, in_features) starts Kaiming-uniform and ``lora_B`` (out_features, r_max) at
    zero, as in LoRA, so a fresh layer equals its base layer. The rank b (default r_max) is set
    with :meth:`set_rank`: an int, a 0-d integer tensor, or a 1-D tensor with one rank per row of
    the flattened input (or one per sample along the first dimension of a batch-first input of 3 or
    more dimensions). It is kept as a tensor buffer so that changing it never recompiles.

    ``fan_in_fan_out=True`` (what :meth:`from_conv1d` builds for GPT-2's ``Conv1D``): ``weight`` is
    stored (in_features, out_features) and the kernels read its transpose, a strided view (no copy).

    ``dropout`` (PEFT's ``lora_dropout``): in training mode the adapter sees dropout(x) with probability
    ``dropout``, the base layer x; fused into the kernels (the mask is regenerated in the backward, never
    stored). No dropout in eval mode.
    """

    def __init__(self, in_features: int, out_features: int, r_max: int, alpha: float,
                 bias: bool = True, frozen_prefix: bool = True, device=None, dtype=None, dropout: float = 0.0):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        base = nn.Linear(in_features, out_features, bias=bias, **factory)
        self._init(base.weight, base.bias, r_max, alpha, frozen_prefix, dropout=dropout)

    @classmethod
    def from_linear(cls, linear: nn.Linear, r_max: int, alpha: float,
                    frozen_prefix: bool = True, dropout: float = 0.0) -> "DyLoRALinear":
        """Wrap an existing nn.Linear: its weight and bias Parameters are shared (no copy) and frozen."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        return cls._wrap(linear.weight, linear.bias, r_max, alpha, frozen_prefix, False, dropout)

    @classmethod
    def from_conv1d(cls, conv: nn.Module, r_max: int, alpha: float,
                    frozen_prefix: bool = True, dropout: float = 0.0) -> "DyLoRALinear":
        """Wrap transformers' ``Conv1D`` (GPT-2: ``y = x·W + bias`` with W stored (in, out)): its weight
        and bias Parameters are shared (no copy, same shape, so state-dict keys and shapes stay the
        model's) and frozen; the kernels read ``weight.t()``, a view."""
        if not is_conv1d(conv):
            raise TypeError(f"from_conv1d expects a transformers Conv1D, got {type(conv).__name__}")
        return cls._wrap(conv.weight, conv.bias, r_max, alpha, frozen_prefix, True, dropout)

    @classmethod
    def _wrap(cls, weight, bias, r_max, alpha, frozen_prefix, fan_in_fan_out, dropout) -> "DyLoRALinear":
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._init(weight, bias, r_max, alpha, frozen_prefix, fan_in_fan_out, dropout)
        return layer

    def _init(self, weight: nn.Parameter, bias: nn.Parameter | None, r_max: int, alpha: float,
              frozen_prefix: bool, fan_in_fan_out: bool = False, dropout: float = 0.0) -> None:
        if isinstance(r_max, bool) or not isinstance(r_max, numbers.Integral) or r_max < 1:
            raise ValueError(f"r_max must be an int >= 1, got {r_max!r}")
        if type(frozen_prefix) is not bool:
            raise TypeError(f"frozen_prefix must be a bool, got {type(frozen_prefix).__name__} {frozen_prefix!r}")
        self.fan_in_fan_out = fan_in_fan_out
        self.out_features, self.in_features = weight.shape[::-1] if fan_in_fan_out else weight.shape
        self.r_max, self.alpha, self.frozen_prefix = int(r_max), check_alpha(alpha), frozen_prefix
        self.dropout = check_dropout(dropout)
        self.weight = weight
        self.bias = bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        factory = {"device": weight.device, "dtype": weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(self.r_max, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, self.r_max, **factory))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear and PEFT's LoRA
        # The rank is runtime data, always int64; not saved in the state_dict (a choice, not a weight).
        self.register_buffer("_rank", torch.tensor(self.r_max, device=weight.device), persistent=False)
        self._rank_shared = False  # True while _rank is a model-wide tensor (RankSampler(shared=True))

    @property
    def weight_nk(self) -> Tensor:
        """The base weight as (out_features, in_features): the weight itself, or for a Conv1D its
        transpose (a view)."""
        return self.weight.t() if self.fan_in_fan_out else self.weight

    def share_rank(self, rank: Tensor) -> None:
        """Read the rank from ``rank`` (a 0-d int64 tensor on the layer's device, owned by the caller,
        e.g. RankSampler's model-wide rank) from now on: writing into it changes this layer's rank, with
        no per-layer work. A later :meth:`set_rank` gives the layer its own buffer again."""
        if not (isinstance(rank, Tensor) and rank.dim() == 0 and rank.dtype == torch.int64
                and rank.device == self._rank.device):
            got = (f"{rank.dtype} of shape {tuple(rank.shape)} on {rank.device}" if isinstance(rank, Tensor)
                   else type(rank).__name__)
            raise ValueError(f"share_rank needs a 0-d int64 tensor on {self._rank.device}, got {got}")
        self._rank, self._rank_shared = rank, True

    @property
    def rank(self) -> int | Tensor:
        """The current rank: an int, or the per-row rank tensor."""
        return self._rank if self._rank.dim() else int(self._rank)

    @property
    def rank_tensor(self) -> Tensor:
        """A copy of the current rank as a tensor (0-d or per-row): ``set_rank(saved)`` restores it."""
        return self._rank.clone()

    def set_rank(self, rank: int | Tensor) -> None:
        """Use rank ``rank`` from now on: an int in [1, r_max], a 0-d or a per-row integer tensor.

        A one-rank change (int or 0-d tensor) while the layer holds one rank is written into the same
        buffer (no new tensor: no recompilation); a per-row rank replaces the buffer with an int64 copy
        (the caller's tensor is never kept: a later in-place change would write into it). A layer that
        shared a model-wide rank tensor (:meth:`share_rank`) gets its own buffer first, so the others
        keep theirs."""
        if self._rank_shared:
            self._rank, self._rank_shared = self._rank.clone(), False
        if not isinstance(rank, Tensor) and self._rank.dim() == 0:
            self._rank.fill_(check_int_rank(rank, self.r_max))  # in place: no new tensor, no recompilation
            return
        checked = check_rank(rank, self.r_max, self._rank.device)  # a new int64 tensor
        if checked.dim() == 0 and self._rank.dim() == 0:
            self._rank.copy_(checked)
        else:
            self._rank = checked

    def forward(self, x: Tensor) -> Tensor:
        rank = self._rank
        if rank.dim() == 1 and x.dim() > 2 and rank.shape[0] == x.shape[0]:
            # One rank per sample of a batch-first input: the same rank for all of its rows.
            rank = rank.repeat_interleave(math.prod(x.shape[1:-1]))
        return dylora_linear(x, self.weight_nk, self.bias, self.lora_A, self.lora_B, rank,
                             self.alpha, frozen_prefix=self.frozen_prefix,
                             dropout_p=self.dropout if self.training else 0.0)

    def extra_repr(self) -> str:
        rank = self.rank if isinstance(self.rank, int) else f"per-row{tuple(self._rank.shape)}"
        mode = "frozen_prefix" if self.frozen_prefix else "full"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, r_max={self.r_max}, alpha={self.alpha}, "
                f"rank={rank}, mode={mode}" + (", fan_in_fan_out=True" if self.fan_in_fan_out else "")
                + (f", dropout={self.dropout}" if self.dropout else ""))


class DyLoRAConvNd(nn.Module):
    """A drop-in nn.Conv1d/2d/3d (groups = 1, zero padding) with a DyLoRA adapter: ``y = conv(x, W) + bias +
    (alpha/b)·conv1x1(conv(x, A[:b]), B[:, :b])``, the base weight and bias frozen.

    ``lora_A`` (r_max, C_in, *kernel_size) convolves with the base's stride, padding and dilation;
    ``lora_B`` (C_out, r_max) is the 1×1 expand (PEFT's LoRA Conv layout, flattened). ``lora_A`` starts
    Kaiming-uniform and ``lora_B`` at zero, so a fresh layer equals its base. The rank (default r_max) is an
    int, a 0-d tensor or a 1-D tensor with one rank per sample, set with :meth:`set_rank` (kept as a
    tensor buffer: changing it never recompiles). Build one with :meth:`from_conv`.
    """
    _dims = 0
    _base_type: type = nn.Module

    @classmethod
    def from_conv(cls, conv: nn.Module, r_max: int, alpha: float, frozen_prefix: bool = True) -> "DyLoRAConvNd":
        """Wrap an existing convolution: its weight and bias Parameters are shared (no copy) and frozen."""
        if cls is DyLoRAConvNd:
            cls = {1: DyLoRAConv1d, 2: DyLoRAConv2d, 3: DyLoRAConv3d}.get(_conv_dims(conv), cls)
        if type(conv) is not cls._base_type:
            raise TypeError(f"{cls.__name__}.from_conv expects an {cls._base_type.__name__}, got {type(conv).__name__}")
        if conv.groups != 1:
            raise ValueError(f"{cls.__name__}: grouped convolutions (groups={conv.groups}) are not supported, groups=1 only")
        if conv.padding_mode != "zeros":
            raise ValueError(f"{cls.__name__}: padding_mode={conv.padding_mode!r} is not supported, only 'zeros'")
        padding = conv.padding
        if isinstance(padding, str):  # 'valid' = 0; 'same' where it is symmetric (odd dilated kernels)
            total = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
            if padding == "same" and any(t % 2 for t in total):
                raise ValueError(f"{cls.__name__}: padding='same' with an even dilated kernel {conv.kernel_size} "
                                 "needs asymmetric padding, which is not supported")
            padding = tuple(t // 2 for t in total) if padding == "same" else (0,) * cls._dims
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._init(conv.weight, conv.bias, tuple(conv.stride), tuple(padding), tuple(conv.dilation), r_max, alpha,
                    frozen_prefix)
        return layer

    def _init(self, weight, bias, stride, padding, dilation, r_max, alpha, frozen_prefix) -> None:
        if isinstance(r_max, bool) or not isinstance(r_max, numbers.Integral) or r_max < 1:
            raise ValueError(f"r_max must be an int >= 1, got {r_max!r}")
        if type(frozen_prefix) is not bool:
            raise TypeError(f"frozen_prefix must be a bool, got {type(frozen_prefix).__name__} {frozen_prefix!r}")
        self.out_channels, self.in_channels = weight.shape[:2]
        self.kernel_size = tuple(weight.shape[2:])
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self.r_max, self.alpha, self.frozen_prefix = int(r_max), check_alpha(alpha), frozen_prefix
        self.weight, self.bias = weight, bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        factory = {"device": weight.device, "dtype": weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(self.r_max, self.in_channels, *self.kernel_size, **factory))
        self.lora_B = nn.Parameter(torch.zeros(self.out_channels, self.r_max, **factory))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Conv2d and PEFT's LoRA
        self.register_buffer("_rank", torch.tensor(self.r_max, device=weight.device), persistent=False)
        self._rank_shared = False

    fan_in_fan_out = False  # the base weight is stored as the convolution has it (see DyLoRALinear's Conv1D case)

    # The rank is held as in DyLoRALinear (one int64 buffer, or a model-wide tensor shared with share_rank).
    rank = DyLoRALinear.rank
    rank_tensor = DyLoRALinear.rank_tensor
    set_rank = DyLoRALinear.set_rank
    share_rank = DyLoRALinear.share_rank

    def forward(self, x: Tensor) -> Tensor:
        unbatched = x.dim() == self._dims + 1
        y = _CONV_OPS[self._dims](x.unsqueeze(0) if unbatched else x, self.weight, self.bias, self.lora_A,
                                  self.lora_B, self._rank, self.alpha, stride=self.stride, padding=self.padding,
                                  dilation=self.dilation, frozen_prefix=self.frozen_prefix)
        return y.squeeze(0) if unbatched else y

    def extra_repr(self) -> str:
        rank = self.rank if isinstance(self.rank, int) else f"per-sample{tuple(self._rank.shape)}"
        mode = "frozen_prefix" if self.frozen_prefix else "full"
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, bias={self.bias is not None}, "
                f"r_max={self.r_max}, alpha={self.alpha}, rank={rank}, mode={mode}")


def _conv_dims(conv: nn.Module) -> int:
    return {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}.get(type(conv), 0)


class DyLoRAConv1d(DyLoRAConvNd):
    """:class:`DyLoRAConvNd` for nn.Conv1d."""
    _dims, _base_type = 1, nn.Conv1d


class DyLoRAConv2d(DyLoRAConvNd):
    """:class:`DyLoRAConvNd` for nn.Conv2d."""
    _dims, _base_type = 2, nn.Conv2d


class DyLoRAConv3d(DyLoRAConvNd):
    """:class:`DyLoRAConvNd` for nn.Conv3d."""
    _dims, _base_type = 3, nn.Conv3d


_CONV_OPS = {1: dylora_conv1d, 2: dylora_conv2d, 3: dylora_conv3d}
