"""DyLoRA in whole models: inject adapters, sample ranks, evaluate every rank at once, merge, PEFT I/O.

The workflow::

    names = inject(model, ["query", "value"], r_max=8, alpha=16)   # nn.Linear -> DyLoRALinear
    sampler = RankSampler(model, generator=0)
    freeze_untrained_slots(optimizer, model)                      # frozen-prefix that really freezes
    for batch in data:
        sampler.step()                                            # one rank b per step, all layers
        loss(model(batch)).backward(); optimizer.step(); optimizer.zero_grad()
    outputs = evaluate_ranks(model, batch, range(1, 9))           # {b: output}, one forward
    merge(model, 4)  or  export_peft(model, "adapter/", rank=4)   # deploy the rank you picked

Every function finds the adapters by walking ``model.named_modules()`` for DyLoRA layers (DyLoRALinear,
DyLoRAConv1d/2d/3d), so they work on any nn.Module: Hugging Face transformers and diffusers models,
nn.Sequential, your own.
"""
from __future__ import annotations

import functools
import json
import math
import re
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from .conv import merged_delta
from .nn import DyLoRAConv1d, DyLoRAConv2d, DyLoRAConv3d, DyLoRAConvNd, DyLoRALinear, is_conv1d
from .ops import check_int_rank, check_rank, intermediate_dtype
from .reference import rank_masks

PEFT_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> your model: PEFT's state-dict key prefix
ADAPTERS = (DyLoRALinear, DyLoRAConvNd)
CONVS = {nn.Conv1d: DyLoRAConv1d, nn.Conv2d: DyLoRAConv2d, nn.Conv3d: DyLoRAConv3d}  # the layers inject() wraps


# --------------------------------------------------------------------------------------------
# Finding, injecting and freezing
# --------------------------------------------------------------------------------------------
def _matches(name: str, target: str) -> bool:
    """PEFT's target_modules rule: the exact module name, or a suffix of it at a '.' boundary."""
    return name == target or name.endswith("." + target)


def _layers(model: nn.Module) -> list[tuple[str, DyLoRALinear | DyLoRAConvNd]]:
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, ADAPTERS)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no DyLoRALinear layers (nor DyLoRAConv1d/2d/3d): call inject() first "
                         "(or unmerge() a merged model)")
    return layers


def _unwrapped(model: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel / DataParallel (``.module``) and torch.compile
    (``._orig_mod``) wrappers, whose attribute names would otherwise prefix every module name."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def _is_sharded(t: Tensor) -> bool:
    """Whether ``t`` is a DTensor (as FSDP2 shards parameters). torch.distributed.tensor is slow to
    import and a DTensor cannot exist before it is, so it is looked up, not imported."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def _unsharded_layers(model: nn.Module, caller: str) -> list[tuple[str, DyLoRALinear | DyLoRAConvNd]]:
    layers = _layers(model)
    sharded = [name for name, layer in layers if _is_sharded(layer.lora_A)]
    if sharded:
        raise ValueError(f"{caller}: layer {sharded[0]} is sharded (FSDP2 fully_shard); gather the full "
                         "weights first: torch.distributed.checkpoint.state_dict.get_model_state_dict(model, "
                         "options=StateDictOptions(full_state_dict=True, cpu_offload=True)) on every process, "
                         f"load it into an unsharded copy of the model on process 0 and call {caller} on that")
    return layers


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def _freeze_all_but_adapters(model: nn.Module) -> None:
    adapters = {id(p) for _, layer in _layers(model) for p in (layer.lora_A, layer.lora_B)}
    for p in model.parameters():
        p.requires_grad_(id(p) in adapters)


def _adapter(module: nn.Module, r_max: int, alpha: float, frozen_prefix: bool,
             dropout: float = 0.0) -> DyLoRALinear | DyLoRAConvNd:
    """A DyLoRALinear sharing ``module``'s weight and bias (an nn.Linear, or transformers' Conv1D), or a
    DyLoRAConv1d/2d/3d for an nn.Conv1d/2d/3d."""
    if type(module) in CONVS:
        if dropout:
            raise ValueError(f"inject: adapter dropout is fused for linear layers only, not {type(module).__name__} "
                             "(target the linear layers, or use dropout=0.0)")
        return CONVS[type(module)].from_conv(module, r_max, alpha, frozen_prefix=frozen_prefix)
    if is_conv1d(module):
        return DyLoRALinear.from_conv1d(module, r_max, alpha, frozen_prefix=frozen_prefix, dropout=dropout)
    return DyLoRALinear.from_linear(module, r_max, alpha, frozen_prefix=frozen_prefix, dropout=dropout)


def inject(model: nn.Module, target_modules: str | Iterable[str], r_max: int, alpha: float,
           frozen_prefix: bool = True, dropout: float = 0.0) -> list[str]:
    """Replace the nn.Linear (or transformers Conv1D, as GPT-2's ``c_attn``; nn.Conv1d/2d/3d) modules named by
    ``target_modules`` by DyLoRALinear (DyLoRAConv1d/2d/3d) adapters, in place.

    A target matches a module whose name equals it or ends with ``"." + target`` (PEFT's rule, e.g.
    ``["query", "value"]`` on BERT, ``["q_proj", "v_proj"]`` on LLaMA, ``["c_attn"]`` on GPT-2,
    ``["0", "2"]`` on an nn.Sequential). Every parameter of the model except the adapters' lora_A /
    lora_B is frozen. The base weights are shared, not copied (a Conv1D's (in, out) weight is read
    through a transposed view). ``dropout``: adapter dropout of the linear adapters (PEFT's ``lora_dropout``,
    fused; active in training mode). Returns the names of the replaced modules.
    """
    targets = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    linears = [name for name, m in model.named_modules()
               if name and (isinstance(m, nn.Linear) or is_conv1d(m) or type(m) in CONVS)]
    missing = [t for t in targets if not any(_matches(name, t) for name in linears)]
    if missing or not targets:
        shown = ", ".join(linears[:8]) + (", ..." if len(linears) > 8 else "") or "none"
        raise ValueError(f"inject: target_modules {missing or targets} match no nn.Linear (nor Conv1D, "
                         f"nn.Conv1d/2d/3d) module of {type(model).__name__} (by exact name or '.'-suffix); its such modules "
                         f"include: {shown}")
    names = [name for name in linears if any(_matches(name, t) for t in targets)]
    # every target wrapped (from_conv refuses grouped convolutions) before any is replaced
    wrapped = {name: _adapter(model.get_submodule(name), r_max, alpha, frozen_prefix, dropout) for name in names}
    for name, layer in wrapped.items():
        _replace(model, name, layer)
    _freeze_all_but_adapters(model)
    return names


# --------------------------------------------------------------------------------------------
# Ranks
# --------------------------------------------------------------------------------------------
def set_rank(model: nn.Module, rank: int | Tensor) -> None:
    """Set the rank of every DyLoRA layer (an int, a 0-d or a per-row / per-sample rank tensor).
    When every layer reads one model-wide rank tensor (``RankSampler(shared=True)``), a single rank
    is written into that tensor once (the layers keep sharing it)."""
    layers = [layer for _, layer in _layers(model)]
    shared = layers[0]._rank
    if (layers[0]._rank_shared and all(layer._buffers["_rank"] is shared for layer in layers)
            and not (isinstance(rank, Tensor) and rank.dim())):
        shared.copy_(check_rank(rank, min(layer.r_max for layer in layers), shared.device))
        return
    for layer in layers:
        layer.set_rank(rank)


class RankSampler:
    """Draws the training rank: ``step(i)`` picks b uniformly in [r_min, r_max], sets it, returns it.

    Rank per optimizer step, not per forward: the draw for step ``i`` is a function of the seed and
    ``i`` alone. Pass the optimizer-step index (e.g. Trainer's ``state.global_step``) and every
    micro-batch of that step (gradient accumulation) and every data-parallel process gets the same
    b, with no communication, and a run resumed at step i draws what the uninterrupted run drew.
    ``step()`` without an index uses an internal counter (the step after the last one drawn): call
    it once per optimizer step. One draw shared by every layer (the DyLoRA recipe), or with
    ``per_layer=True`` one draw per layer (``step()`` then returns the list, in module order).

    ``r_max`` defaults to the smallest r_max of the model's layers. ``generator``: an int seed >= 0,
    a torch.Generator (its ``initial_seed()``) or None (``torch.initial_seed()``). When
    torch.distributed is initialised, the constructor is a collective (one all_gather, so build the
    sampler on every process): with ``generator=None`` every process takes process 0's seed; an
    explicit seed must be the same on every process, else ValueError. The layers' rank buffers are
    filled in place, so a compiled model is not recompiled.

    ``shared=True``: every layer reads ONE model-wide rank tensor, :attr:`rank` (0-d, or (layers,)
    with ``per_layer``, each layer reading its element through a view), on the layers' device, and
    ``step()`` writes the draw into it once (one fill; on CUDA one small kernel, no host sync)
    instead of setting every layer's buffer: the cost of a rank change no longer grows with the
    number of layers, and a CUDA graph captured once reads the rank from that tensor's fixed address
    at every replay. A layer whose rank is set otherwise (``layer.set_rank``, ``evaluate_ranks``
    leaves it as it was) gets its own buffer and is bound again at the next ``step()``.
    """

    def __init__(self, model: nn.Module, r_min: int = 1, r_max: int | None = None,
                 generator: torch.Generator | int | None = None, per_layer: bool = False,
                 shared: bool = False):
        self.layers = [layer for _, layer in _layers(model)]
        capacity = min(layer.r_max for layer in self.layers)
        r_max = capacity if r_max is None else r_max
        if not 1 <= r_min <= r_max <= capacity:
            raise ValueError(f"RankSampler needs 1 <= r_min <= r_max <= {capacity} (the smallest "
                             f"r_max of the model's layers), got r_min={r_min}, r_max={r_max}")
        if isinstance(generator, torch.Generator):
            seed = generator.initial_seed()
        else:
            seed = torch.initial_seed() if generator is None else generator
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"RankSampler: generator must be an int seed >= 0, a torch.Generator or "
                             f"None, got {generator!r}")
        self.seed = _same_seed_on_every_process(seed, explicit=generator is not None)
        self.r_min, self.r_max, self.per_layer, self.shared = r_min, r_max, per_layer, shared
        self.next_step = 0
        self.rank: Tensor | None = None  # the model-wide rank tensor (shared=True)
        self._views: list[Tensor] = []
        if shared:
            self._bind()

    def _bind(self) -> None:
        """Point every layer's rank buffer at the model-wide rank tensor (made on the layers' device,
        again if the model moved), initialised to r_max."""
        devices = {layer._rank.device for layer in self.layers}
        if len(devices) > 1:
            raise ValueError(f"RankSampler(shared=True) needs every DyLoRA layer on one device, got {sorted(map(str, devices))}; "
                             "use shared=False for a model split over devices")
        device = devices.pop()
        if self.rank is None or self.rank.device != device:
            self.rank = torch.full((len(self.layers),) if self.per_layer else (), self.r_max, dtype=torch.int64,
                                   device=device)
            self._views = list(self.rank.unbind()) if self.per_layer else [self.rank] * len(self.layers)
        for layer, view in zip(self.layers, self._views):
            layer.share_rank(view)

    def draw(self, step: int) -> int | list[int]:
        """The rank(s) for optimizer step ``step``, without setting them (the same on every call)."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"RankSampler: step must be the optimizer-step index, an int >= 0, got {step!r}")
        rng = np.random.default_rng([self.seed, step])  # SeedSequence: independent streams per (seed, step)
        draws = rng.integers(self.r_min, self.r_max + 1, len(self.layers) if self.per_layer else 1).tolist()
        return draws if self.per_layer else draws[0]

    def step(self, step: int | None = None) -> int | list[int]:
        """Set (and return) the rank(s) of optimizer step ``step``, or of the next step if None."""
        step = self.next_step if step is None else step
        draws = self.draw(step)
        if self.shared:
            if any(layer._buffers["_rank"] is not view for layer, view in zip(self.layers, self._views)):
                self._bind()  # a layer's rank was set otherwise, or the model moved
            if self.per_layer:  # from pinned memory: an asynchronous copy, no host sync on a GPU
                draws_t = torch.tensor(draws)
                self.rank.copy_(draws_t.pin_memory() if self.rank.is_cuda else draws_t, non_blocking=True)
            else:
                self.rank.fill_(draws)
        else:
            for i, layer in enumerate(self.layers):
                layer.set_rank(draws[i] if self.per_layer else draws)
        self.next_step = step + 1
        return draws


def _same_seed_on_every_process(seed: int, explicit: bool) -> int:
    """``seed`` as agreed by every process of torch.distributed's default group (unchanged outside one)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return seed
    seeds = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(seeds, seed)
    if explicit and len(set(seeds)) > 1:
        raise ValueError(f"RankSampler: the processes were given different seeds {seeds} (one per "
                         "process); every process must draw the same rank at each step: pass the same "
                         "generator=<int> on every process, or None to use process 0's seed")
    return seeds[0]


def capture_training_step(step, optimizer: torch.optim.Optimizer, warmup: int = 3):
    """Capture one training step in a CUDA graph once, to replay it at every rank: ``(graph, out)``.

    ``step()`` runs forward, backward and ``optimizer.step()`` (no ``zero_grad``: the gradients are
    left None before the capture, so each replay writes them afresh) and returns what you want to read
    after a replay (``out``, e.g. the detached loss). It runs ``warmup`` times first, on a side stream:
    real training steps at the current rank, which also make the dispatcher pick its kernels outside
    the capture. The optimizer must be ``capturable=True`` (Adam/AdamW keep their step on the GPU).
    Then, per step: write the rank into the model-wide rank tensor (``RankSampler(model,
    shared=True).step()``), put the batch into the tensors ``step`` reads (``copy_``), and
    ``graph.replay()``. Never draw or set the rank inside ``step``: the capture would record that
    value and every replay would reset the rank to it.
    """
    if not all(group.get("capturable", False) for group in optimizer.param_groups):
        raise ValueError(f"capture_training_step needs an optimizer built with capturable=True (e.g. "
                         f"torch.optim.AdamW(params, capturable=True)), got {type(optimizer).__name__} without it")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            optimizer.zero_grad(set_to_none=True)
            step()
    torch.cuda.current_stream().wait_stream(side)
    optimizer.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    return graph, out


# --------------------------------------------------------------------------------------------
# Every rank in one forward
# --------------------------------------------------------------------------------------------
def evaluate_ranks(model: nn.Module, inputs, ranks: Iterable[int]) -> dict:
    """Outputs of ``model`` at each rank in ``ranks``, computed in ONE batched forward (no grad).

    ``inputs`` is what the model takes: a tensor (``model(inputs)``), a tuple of positional
    arguments or a dict of keyword arguments (``model(**inputs)``, e.g. a Hugging Face batch).
    Every tensor argument with a batch dimension is repeated ``len(ranks)`` times along dim 0, and
    every DyLoRA layer gets one rank per sample (per-row ranks). The layers' previous ranks are
    restored afterwards, also on error. Returns ``{rank: output}``: the model's output split back
    along dim 0 (a tensor, or a dict / model-output object / tuple of them). Values that are not
    batch-first cannot be split (e.g. a loss averaged over the batch, a cache) and come back as
    None. Use eval mode (dropout would differ between the copies).
    """
    layers = [layer for _, layer in _layers(model)]
    ranks = list(ranks)
    r_cap = min(layer.r_max for layer in layers)
    if (not ranks or len(set(ranks)) != len(ranks)
            or not all(isinstance(b, int) and not isinstance(b, bool) and 1 <= b <= r_cap for b in ranks)):
        raise ValueError(f"evaluate_ranks: ranks must be distinct ints in [1, {r_cap}], got {ranks}")
    args, kwargs = ((), dict(inputs)) if isinstance(inputs, Mapping) else (
        (tuple(inputs), {}) if isinstance(inputs, (tuple, list)) else ((inputs,), {}))
    batched = [t for t in (*args, *kwargs.values()) if isinstance(t, Tensor) and t.dim()]
    if not batched:
        raise ValueError("evaluate_ranks: inputs hold no tensor with a batch dimension")
    n, copies = batched[0].shape[0], len(ranks)

    def repeat(t):
        return t.repeat(copies, *[1] * (t.dim() - 1)) if isinstance(t, Tensor) and t.dim() else t

    per_sample = torch.tensor(ranks).repeat_interleave(n)
    # The buffers themselves (set_rank with per-row ranks replaces them, never writes into them), put
    # back as they were: a model-wide rank tensor stays shared, a compiled model sees the same tensors.
    saved = [(layer._rank, layer._rank_shared) for layer in layers]
    try:
        for layer in layers:
            layer.set_rank(per_sample.to(layer.lora_A.device))
        with torch.no_grad():
            out = model(*map(repeat, args), **{k: repeat(v) for k, v in kwargs.items()})
    finally:
        for layer, (rank, shared) in zip(layers, saved):
            layer._rank, layer._rank_shared = rank, shared
    return dict(zip(ranks, _split(out, copies, n)))


def _split(obj, copies: int, n: int) -> list:
    """``obj`` cut into ``copies`` pieces of n samples each, recursing through dicts and tuples."""
    if isinstance(obj, Tensor) and obj.dim() and obj.shape[0] == copies * n:
        return list(obj.split(n))
    if isinstance(obj, Mapping):  # dict, OrderedDict, transformers' ModelOutput
        parts = {k: _split(v, copies, n) for k, v in obj.items()}
        return [type(obj)(**{k: v[i] for k, v in parts.items()}) for i in range(copies)]
    if isinstance(obj, (tuple, list)):
        parts = [_split(v, copies, n) for v in obj]
        rebuild = (lambda values: type(obj)(*values)) if hasattr(obj, "_fields") else type(obj)  # namedtuple
        return [rebuild([v[i] for v in parts]) for i in range(copies)]
    return [None] * copies


# --------------------------------------------------------------------------------------------
# Merge for deployment
# --------------------------------------------------------------------------------------------
class _Merged:
    """A base layer whose weight has a DyLoRA adapter folded in at ``merged_rank`` (see merge()).

    It shares the adapter's weight and bias Parameters, so a merged model's state_dict has exactly
    the base model's keys. The adapter itself is kept outside the module tree (not a submodule, not
    in the state_dict) for unmerge().
    """

    def _share(self, adapter: DyLoRALinear, rank: int) -> None:
        nn.Module.__init__(self)
        self.weight = adapter.weight
        self.register_parameter("bias", adapter.bias)  # None stays a registered None, as in nn.Linear
        self.__dict__["adapter"] = adapter  # a plain attribute: not registered as a submodule
        self.merged_rank = rank

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, merged_rank={self.merged_rank}"


class MergedLinear(_Merged, nn.Linear):
    """An nn.Linear with a DyLoRA adapter folded into its weight (see merge())."""

    def __init__(self, adapter: DyLoRALinear, rank: int):
        self._share(adapter, rank)
        self.in_features, self.out_features = adapter.in_features, adapter.out_features


@functools.cache
def _merged_conv1d_class() -> type:
    from transformers.pytorch_utils import Conv1D  # only called for a Conv1D, so transformers is there

    class MergedConv1D(_Merged, Conv1D):
        """A transformers Conv1D (GPT-2) with a DyLoRA adapter folded into its weight (see merge())."""

        def __init__(self, adapter: DyLoRALinear, rank: int):
            self._share(adapter, rank)
            self.nx, self.nf = adapter.in_features, adapter.out_features

    return MergedConv1D


class _MergedConv(_Merged):
    """A convolution whose weight has a DyLoRA adapter folded in (see merge(); as MergedLinear)."""

    def __init__(self, adapter: DyLoRAConvNd, rank: int):
        self._share(adapter, rank)
        self.in_channels, self.out_channels, self.kernel_size = adapter.in_channels, adapter.out_channels, adapter.kernel_size
        self.stride, self.padding, self.dilation = adapter.stride, adapter.padding, adapter.dilation
        self.transposed, self.output_padding, self.groups, self.padding_mode = False, (0,) * adapter._dims, 1, "zeros"
        self._reversed_padding_repeated_twice = [p for p in reversed(adapter.padding) for _ in range(2)]


class MergedConv1d(_MergedConv, nn.Conv1d):
    """An nn.Conv1d with a DyLoRA adapter folded in."""


class MergedConv2d(_MergedConv, nn.Conv2d):
    """An nn.Conv2d with a DyLoRA adapter folded in."""


class MergedConv3d(_MergedConv, nn.Conv3d):
    """An nn.Conv3d with a DyLoRA adapter folded in."""


MERGED = {DyLoRAConv1d: MergedConv1d, DyLoRAConv2d: MergedConv2d, DyLoRAConv3d: MergedConv3d}


def _delta(adapter: DyLoRALinear | DyLoRAConvNd, rank: int) -> Tensor:
    """(alpha / b) · B[:, :b] · A[:b] in the accumulation dtype (fp32, or fp64 for fp64 weights), laid out as the
    stored weight ((out, in); (in, out) for a Conv1D; for a convolution a 1×1 conv after a k×k conv is one k×k
    conv)."""
    delta = merged_delta(adapter.lora_A, adapter.lora_B, rank, adapter.alpha, intermediate_dtype(adapter.weight.dtype))
    return delta.t() if adapter.fan_in_fan_out else delta


@torch.no_grad()
def merge(model: nn.Module, rank: int | None = None) -> list[str]:
    """Fold every adapter into its base weight, ``W += (alpha/b)·B[:, :b]·A[:b]``, in place.

    ``rank``: the b to merge, or None for each layer's current (int) rank. Each DyLoRALinear is
    replaced by a MergedLinear (a plain nn.Linear forward: the adapter is not added again; for a
    GPT-2 Conv1D a MergedConv1D, a plain Conv1D forward; MergedConv1d/2d/3d for convolutions), which unmerge()
    takes back out. Returns the merged module names.
    """
    layers = _unsharded_layers(model, "merge")
    for name, adapter in layers:  # check every layer before changing any rank or weight
        b = adapter.rank if rank is None else rank
        if isinstance(b, bool) or not isinstance(b, int):
            raise ValueError(f"merge: layer {name} has a per-row rank; pass an int rank")
        check_int_rank(b, adapter.r_max)
    for name, adapter in layers:
        adapter.set_rank(adapter.rank if rank is None else rank)  # unmerge() keeps this rank
        W = adapter.weight
        W.copy_(W.to(intermediate_dtype(W.dtype)) + _delta(adapter, adapter.rank))
        if isinstance(adapter, DyLoRAConvNd):
            merged = MERGED[type(adapter)](adapter, adapter.rank)
        else:
            merged = (_merged_conv1d_class() if adapter.fan_in_fan_out else MergedLinear)(adapter, adapter.rank)
        _replace(model, name, merged)
    return [name for name, _ in layers]


@torch.no_grad()
def unmerge(model: nn.Module) -> list[str]:
    """Undo merge(): subtract each merged adapter from its base weight (equal to before up to the
    weight dtype's rounding) and put the DyLoRALinear back. Returns the unmerged module names."""
    merged = [(name, m) for name, m in model.named_modules() if isinstance(m, _Merged)]
    if not merged:
        raise ValueError(f"unmerge: {type(model).__name__} has no merged DyLoRA layers")
    for name, m in merged:
        adapter = m.adapter.to(device=m.weight.device, dtype=m.weight.dtype)  # if the model moved
        W = adapter.weight
        W.copy_(W.to(intermediate_dtype(W.dtype)) - _delta(adapter, m.merged_rank))
        _replace(model, name, adapter)
    return [name for name, _ in merged]


# --------------------------------------------------------------------------------------------
# Frozen prefix that really freezes
# --------------------------------------------------------------------------------------------
class _Hooks:
    def __init__(self, *handles):
        self.handles = handles

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _trained_slots(layer: DyLoRALinear | DyLoRAConvNd) -> Tensor:
    """(r_max,) bool: the rank slots the current rank(s) train (reference.rank_masks' rule)."""
    _, trained = rank_masks(layer.rank_tensor, layer.r_max, layer.frozen_prefix)
    return trained.ne(0).any(0)


def _shaped_like(mask: Tensor, p: Tensor) -> Tensor:
    """``mask`` broadcast to ``p``'s shape and, for a DTensor (FSDP2's sharded parameters and their
    optimizer state), sharded as ``p`` is: each process takes its own chunk, no communication."""
    mask = mask.expand(p.shape)
    if _is_sharded(p):
        from torch.distributed.tensor import distribute_tensor
        mask = distribute_tensor(mask.contiguous(), p.device_mesh, p.placements, src_data_rank=None)
    return mask


def freeze_untrained_slots(optimizer: torch.optim.Optimizer, model: nn.Module) -> _Hooks:
    """Make ``optimizer.step()`` leave every rank slot the current rank does not train untouched.

    In frozen-prefix mode a step at rank b trains row b-1 of lora_A and column b-1 of lora_B only;
    their gradient is zero elsewhere, yet AdamW's momentum and weight decay still move the other
    rows/columns. With this, those rows/columns of the parameters AND of the optimizer's
    per-element state (exp_avg, exp_avg_sq, momentum buffers) stay bit-identical across a step (a
    slot's state is zero until its first step): a "lazy" optimizer, as SparseAdam. The step count
    is per tensor, as in SparseAdam. In full mode the trained slots are those < b. Each layer uses
    its own rank(s), so per-layer and per-row ranks work. Set the rank before ``step()`` and keep
    it until after (RankSampler does). Works through optimizer step hooks, so LR schedulers,
    gradient clipping and trainers keep the optimizer object; a wrapper that keeps the torch optimizer
    in ``.optimizer`` (accelerate's, as the Trainer uses) gets the hooks on that one. Parameters
    sharded by FSDP2 (``fully_shard``) work too. Returns a handle with ``remove()``.
    """
    layers = [layer for _, layer in _layers(model)]
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the one that steps
    if not isinstance(inner, torch.optim.Optimizer):
        raise TypeError(f"freeze_untrained_slots needs a torch.optim.Optimizer (or a wrapper holding one in "
                        f".optimizer, as accelerate's), got {type(optimizer).__name__}")
    saved = []

    def snapshot(opt, args, kwargs):
        saved.clear()
        for layer in layers:
            slots = _trained_slots(layer)
            rows = slots.view(-1, *[1] * (layer.lora_A.dim() - 1))  # lora_A's slots: dim 0 (of 2 or 3-5 dims)
            for p, keep in ((layer.lora_A, rows), (layer.lora_B, slots[None, :])):
                keep = _shaped_like(keep, p)
                state = [v for v in opt.state.get(p, {}).values()
                         if isinstance(v, Tensor) and v.shape == p.shape]
                saved.append((p, keep, [(t, t.clone()) for t in (p.detach(), *state)]))

    @torch.no_grad()
    def restore(opt, args, kwargs):
        for p, keep, pairs in saved:
            for t, old in pairs:
                t.copy_(torch.where(keep, t, old))
            known = {id(t) for t, _ in pairs}
            for t in opt.state.get(p, {}).values():  # state created by this step: zero when untrained
                if isinstance(t, Tensor) and t.shape == p.shape and id(t) not in known:
                    t.masked_fill_(~keep, 0)
        saved.clear()

    return _Hooks(inner.register_step_pre_hook(snapshot), inner.register_step_post_hook(restore))


# --------------------------------------------------------------------------------------------
# PEFT LoRA format
# --------------------------------------------------------------------------------------------
def _safetensors():
    try:
        import safetensors.torch
    except ImportError as e:
        raise ImportError("PEFT import/export needs safetensors: pip install 'dylora_kernels[hf]'") from e
    return safetensors.torch


def _target_modules(model: nn.Module, names: list[str]) -> list[str]:
    """The module leaf names (e.g. ["query", "value"]) if they select exactly ``names``, else ``names``."""
    leaves = sorted({name.rpartition(".")[2] for name in names})
    candidates = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, *CONVS, *ADAPTERS)) or is_conv1d(m)]
    selected = [n for n in candidates if any(_matches(n, leaf) for leaf in leaves)]
    return leaves if sorted(selected) == sorted(names) else sorted(names)


def export_peft(model: nn.Module, path: str | Path, rank: int | None) -> Path:
    """Write the adapters at rank b = ``rank`` as a PEFT LoRA adapter directory.

    ``adapter_model.safetensors`` holds ``base_model.model.<name>.lora_A.weight`` = A[:b] and
    ``...lora_B.weight`` = B[:, :b]; ``adapter_config.json`` has r = b and lora_alpha = alpha, so
    PEFT's scale alpha / r equals DyLoRA's alpha / b. ``peft.PeftModel.from_pretrained(base, path)``
    then computes what this model computes at rank b. ``rank=None`` exports each layer at its
    current (int) rank, e.g. ranks picked per layer; layers whose rank or alpha differ from the
    first layer's get PEFT's rank_pattern / alpha_pattern. Only the adapters are written: other
    trainable parameters (a new head) are not. A model wrapped in DistributedDataParallel or
    torch.compile is unwrapped first, so the names are the same as for the plain model.
    """
    model = _unwrapped(model)
    layers = _unsharded_layers(model, "export_peft")
    ranks = {name: layer.rank if rank is None else rank for name, layer in layers}
    for name, layer in layers:
        if not isinstance(ranks[name], int) or not 1 <= ranks[name] <= layer.r_max:
            raise ValueError(f"export_peft: layer {name} needs an int rank in [1, {layer.r_max}], "
                             f"got {ranks[name]!r}")
        if isinstance(layer, DyLoRAConvNd) and any(d != 1 for d in layer.dilation):
            raise ValueError(f"export_peft: layer {name} is a dilated convolution (dilation={layer.dilation}); "
                             "PEFT's LoRA conv runs lora_A undilated, so it would compute something else")
    tensors = {}
    for name, layer in layers:
        b = ranks[name]
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = layer.lora_A[:b].detach().cpu().contiguous()
        B = layer.lora_B[:, :b].detach().cpu().contiguous()  # a conv's is PEFT's 1×1 conv weight (C_out, b, 1, ...)
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = B.view(*B.shape, *[1] * (layer.lora_A.dim() - 2))
    first, first_layer = layers[0]
    config = getattr(model, "config", None)
    base_name = getattr(config, "_name_or_path", None) or getattr(model, "name_or_path", None) or None
    adapter_config = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_name,
        "r": ranks[first], "lora_alpha": first_layer.alpha, "use_rslora": False,
        "lora_dropout": getattr(first_layer, "dropout", 0.0),
        # PEFT reads a Conv1D's (in, out) weight with fan_in_fan_out (it decides per layer type anyway)
        "bias": "none", "fan_in_fan_out": any(layer.fan_in_fan_out for _, layer in layers),
        "inference_mode": True, "init_lora_weights": True,
        "target_modules": _target_modules(model, [name for name, _ in layers]),
        # PEFT matches pattern keys as regexes against module names: escape the dots
        "rank_pattern": {re.escape(n): b for n, b in ranks.items() if b != ranks[first]},
        "alpha_pattern": {re.escape(n): l.alpha for n, l in layers if l.alpha != first_layer.alpha},
    }
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    _safetensors().save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    (path / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n")
    return path


def _peft_alpha(config: dict, name: str) -> float:
    """The lora_alpha PEFT uses for module ``name`` (alpha_pattern keys match as in PEFT)."""
    for key, alpha in config.get("alpha_pattern", {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return alpha
    return config["lora_alpha"]


def load_peft(model: nn.Module, path: str | Path, frozen_prefix: bool = True) -> list[str]:
    """Turn ``model`` (the base model) into a DyLoRA model holding a PEFT LoRA adapter from ``path``.

    Each adapted nn.Linear (GPT-2 Conv1D, nn.Conv1d/2d/3d) becomes a DyLoRALinear (DyLoRAConv1d/2d/3d) with r_max = the adapter's r and alpha chosen so
    that at rank r it computes what PEFT computes (alpha = PEFT's scale · r, rsLoRA included).
    Lower ranks then truncate the adapter; training on with RankSampler makes them good. Every other
    parameter is frozen. Returns the adapted module names.
    """
    path = Path(path)
    config = json.loads((path / "adapter_config.json").read_text())
    # fan_in_fan_out only says how the base weight is stored (PEFT follows the layer type: Conv1D or not)
    unsupported = [k for k in ("use_dora", "lora_bias") if config.get(k)]
    if config.get("peft_type") != "LORA" or unsupported:
        raise ValueError(f"load_peft: {path} is not a plain PEFT LoRA adapter (peft_type="
                         f"{config.get('peft_type')!r}, unsupported options: {unsupported})")
    state = _safetensors().load_file(str(path / "adapter_model.safetensors"))
    # Only the low-rank factors are carried over: refuse an adapter that trained anything else
    # (biases, modules_to_save) instead of silently dropping it.
    extra = sorted(k for k in state if not k.endswith((".lora_A.weight", ".lora_B.weight")))
    if config.get("bias", "none") != "none" or config.get("modules_to_save") or extra:
        raise ValueError(f"load_peft: {path} holds more than LoRA factors (bias={config.get('bias')!r}, "
                         f"modules_to_save={config.get('modules_to_save')!r}, other tensors: {extra[:4]}); "
                         "only plain LoRA adapters (bias='none', no modules_to_save) can be loaded")
    suffix = ".lora_A.weight"
    names = sorted(k[len(PEFT_PREFIX):-len(suffix)] for k in state if k.endswith(suffix))
    for name in names:
        A, B = state[f"{PEFT_PREFIX}{name}.lora_A.weight"], state[f"{PEFT_PREFIX}{name}.lora_B.weight"]
        r = A.shape[0]
        scale = _peft_alpha(config, name) / (math.sqrt(r) if config.get("use_rslora") else r)
        layer = _adapter(model.get_submodule(name), r, scale * r, frozen_prefix)
        with torch.no_grad():
            layer.lora_A.copy_(A)
            layer.lora_B.copy_(B.flatten(1))  # a conv's (C_out, r, 1, ...) 1×1 weight as (C_out, r)
        _replace(model, name, layer)
    _freeze_all_but_adapters(model)
    return names
