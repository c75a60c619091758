"""dylora_kernels: fused kernels and PyTorch modules for DyLoRA (dynamic-rank LoRA)."""
__version__ = "0.2.0"  # first: dispatch.py keys its on-disk cache by it

from .conv import dylora_conv1d, dylora_conv2d, dylora_conv3d  # noqa: E402
from .models import (MergedConv1d, MergedConv2d, MergedConv3d, MergedLinear, RankSampler, evaluate_ranks,  # noqa: E402
                     export_peft, freeze_untrained_slots, inject, load_peft, merge, set_rank, unmerge)
from .nn import DyLoRAConv1d, DyLoRAConv2d, DyLoRAConv3d, DyLoRAConvNd, DyLoRALinear  # noqa: E402
from .ops import dylora_delta, dylora_linear  # noqa: E402

__all__ = ["DyLoRALinear", "dylora_linear", "dylora_delta", "inject", "set_rank", "RankSampler", "evaluate_ranks",
           "merge", "unmerge", "MergedLinear", "freeze_untrained_slots", "export_peft", "load_peft",
           "DyLoRAConvNd", "DyLoRAConv1d", "DyLoRAConv2d", "DyLoRAConv3d", "dylora_conv1d", "dylora_conv2d", "dylora_conv3d",
           "MergedConv1d", "MergedConv2d", "MergedConv3d"]
