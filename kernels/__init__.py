"""Triton kernels of fastlm (flash attention, fused cross-entropy); imported as fastlm.kernels."""
