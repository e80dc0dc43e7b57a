"""fastlm: a fast, sturdy LLM pretraining framework.

Importing fastlm is cheap on purpose: no torch, no kernel compilation, no CUDA initialisation. The data
commands (`fastlm data ...`) never import torch.
"""

__version__ = "0.1.0"
