"""fastlm: a fast, sturdy LLM pretraining framework.

Importing fastlm is cheap on purpose: no torch, no kernel compilation, no CUDA initialisation. The data
commands (`fastlm data ...`) never import torch.
"""

__version__ = "0.1.0"


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask), the default thread count of the data verbs."""
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
