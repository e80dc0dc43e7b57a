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


def _brief_tuning() -> None:
    """On a GPU, Triton's autotuner times each config of each new key with triton.testing.do_bench's
    defaults (25 ms of warm-up, 100 ms of timed runs): with a handful of configs per kernel, three kernels per
    attention and a new key in most tests, that timing was most of the GPU test run. Tests check results,
    not which tiling is fastest: every config is still compiled and run, timed for a few ms only."""
    import functools

    import triton.testing
    from triton.runtime import driver

    try:
        active = driver.active
    except RuntimeError:  # (no usable GPU driver: the tests that need one skip)
        return
    active.get_benchmarker = lambda: functools.partial(triton.testing.do_bench, warmup=1, rep=5)


if HAS_GPU:
    _brief_tuning()


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


def assert_lowers_to_sm90(code: str, done: str = "LOWERED") -> None:
    """Run `code` (Python that lowers Triton kernels with triton.compile, or otherwise uses Triton's NVIDIA
    backend, and prints `done`) in a fresh process without Triton's interpreter: compiling for an H100
    needs no GPU. Skips where this Triton build has no NVIDIA backend."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    if "No module named 'triton.backends.nvidia" in out.stderr:
        pytest.skip("this Triton build has no NVIDIA backend")
    assert out.returncode == 0 and done in out.stdout, out.stderr[-3000:]
