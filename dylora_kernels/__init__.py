"""dylora_kernels: fused kernels and PyTorch modules for DyLoRA (dynamic-rank LoRA)."""
__version__ = "0.2.0"  # first: dispatch.py keys its on-disk cache by it

from .models import (MergedLinear, RankSampler, evaluate_ranks, export_peft, freeze_untrained_slots,  # noqa: E402
                     inject, load_peft, merge, set_rank, unmerge)
from .nn import DyLoRALinear  # noqa: E402
from .ops import dylora_delta, dylora_linear  # noqa: E402

__all__ = ["DyLoRALinear", "dylora_linear", "dylora_delta", "inject", "set_rank", "RankSampler", "evaluate_ranks",
           "merge", "unmerge", "MergedLinear", "freeze_untrained_slots", "export_peft", "load_peft"]
