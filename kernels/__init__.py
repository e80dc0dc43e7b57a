"""Triton kernels of fastlm (flash attention, fused cross-entropy); imported as fastlm.kernels."""
from .cross_entropy import cross_entropy
from .fused_linear_cross_entropy import fused_linear_cross_entropy
