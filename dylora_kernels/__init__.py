"""dylora_kernels: fused kernels and PyTorch modules for DyLoRA (dynamic-rank LoRA)."""
from .models import (MergedLinear, RankSampler, evaluate_ranks, export_peft, freeze_untrained_slots,
                     inject, load_peft, merge, set_rank, unmerge)
from .nn import DyLoRALinear
from .ops import dylora_linear

__all__ = ["DyLoRALinear", "dylora_linear", "inject", "set_rank", "RankSampler", "evaluate_ranks",
           "merge", "unmerge", "MergedLinear", "freeze_untrained_slots", "export_peft", "load_peft"]
__version__ = "0.1.0"
