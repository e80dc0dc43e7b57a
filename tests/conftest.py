"""Shared paths of the test data shipped in the repository."""

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data"
MODALITIES = DATA / "modalities_format"  # golden files written by Modalities 0.5 (GPT-2 tokenizer)
EXAMPLE = ROOT / "examples" / "getting_started"
REDPAJAMA = EXAMPLE / "data" / "raw"
GPT2 = EXAMPLE / "tokenizer"

os.environ.setdefault("OMP_NUM_THREADS", "1")
# Without a GPU, the Triton kernels run on CPU tensors in Triton's interpreter. It is chosen when a kernel
# is defined, so it must be set before fastlm.kernels is imported.
HAS_GPU = os.path.exists("/dev/nvidiactl")
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run benchmarks/device_check.sh on one)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def gpt2_hf():
    """The GPT-2 tokenizer in the `tokenizers` library: the reference for every id."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(GPT2 / "tokenizer.json"))
