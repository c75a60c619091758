"""dylora_kernels: fused kernels and PyTorch modules for DyLoRA (dynamic-rank LoRA)."""
from .nn import DyLoRALinear
from .ops import dylora_linear

__all__ = ["DyLoRALinear", "dylora_linear"]
__version__ = "0.1.0"
