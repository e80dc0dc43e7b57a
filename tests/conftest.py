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


@pytest.fixture(scope="session")
def gpt2_hf():
    """The GPT-2 tokenizer in the `tokenizers` library: the reference for every id."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(GPT2 / "tokenizer.json"))
