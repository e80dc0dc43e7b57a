"""Triton kernels of fastlm, imported as fastlm.kernels: flash attention (forward and backward; q, k, v
apart or packed in one projection's output) and cross-entropy, plain and fused with the LM head.

Each public function always runs its Triton kernels: on CUDA tensors, or on CPU tensors when
TRITON_INTERPRET=1 was set before this package was first imported (Triton picks the interpreter when a
kernel is defined). Choosing a fallback is the model's job, not the kernels'.

Each function has the name of its module; importing the functions here binds the package attributes
to the functions, not the modules (reach private names with `from fastlm.kernels.cross_entropy import _x`).
"""

from .flash_attention import attention_reference, flash_attention, flash_attention_qkv
from .cross_entropy import cross_entropy
from .fused_linear_cross_entropy import fused_linear_cross_entropy

__all__ = ["flash_attention", "flash_attention_qkv", "attention_reference", "cross_entropy",
           "fused_linear_cross_entropy"]
