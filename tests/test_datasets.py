"""Block datasets over .pbin files: counts, contents, and the document-aligned rule against a plain loop."""

import re

import numpy as np
import pytest

from fastlm.data.datasets import (
    PackedMemMapDatasetContinuous,
    PackedMemMapDatasetDocumentAligned,
    continuous_sample_count,
    document_aligned_starts,
)
from fastlm.data.pbin import write_packed

from conftest import MODALITIES as GOLDEN


def test_continuous_sample_count_arithmetic():
    assert continuous_sample_count(68_414_190, 512) == 133_621
    assert continuous_sample_count(68_414_190, 512, reuse_last_target=False) == 68_414_190 // 513 == 133_360
    assert continuous_sample_count(513, 512) == 1
    assert continuous_sample_count(1025, 512) == 2
    assert continuous_sample_count(1026, 512, reuse_last_target=False) == 2
    assert continuous_sample_count(512, 512) == 0


@pytest.fixture
def stream_file(tmp_path):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 1000, int(rng.integers(1, 40))) for _ in range(50)]
    path = tmp_path / "s.pbin"
    write_packed(path, docs, 2)
    return path, np.concatenate(docs)


@pytest.mark.parametrize("reuse", [True, False])
@pytest.mark.parametrize("S", [1, 7, 64, 500])
def test_continuous_samples(stream_file, reuse, S):
    path, tokens = stream_file
    ds = PackedMemMapDatasetContinuous(path, S, sample_key="ids", reuse_last_target=reuse)
    stride = S if reuse else S + 1
    expected = [tokens[i : i + S + 1] for i in range(0, len(tokens) - S, stride)]
    assert len(ds) == len(expected) == continuous_sample_count(len(tokens), S, reuse)
    for i, e in enumerate(expected):
        sample = ds[i]["ids"]
        assert sample.dtype == np.int64 and sample.tolist() == e.tolist()
    assert ds[-1]["ids"].tolist() == expected[-1].tolist()
    assert ds[np.int64(0)]["ids"].tolist() == expected[0].tolist()
    for bad in (len(ds), -len(ds) - 1):
        with pytest.raises(IndexError):
            ds[bad]
    ds[0]["ids"][0] = -5  # a copy, not the read-only memmap
    if reuse:  # each token after the first is a target exactly once
        targets = np.concatenate([ds[i]["ids"][1:] for i in range(len(ds))])
        assert targets.tolist() == tokens[1 : 1 + len(targets)].tolist()


def test_continuous_golden_and_too_short(tmp_path):
    ds = PackedMemMapDatasetContinuous(GOLDEN / "lorem_ipsum.pbin", 512)
    assert len(ds) == (7989 - 1) // 512
    assert ds[0]["input_ids"][:3].tolist() == [15, 15639, 76]
    with pytest.raises(ValueError, match=r"lorem_ipsum\.pbin.*7,990 tokens.*holds 7,989"):
        PackedMemMapDatasetContinuous(GOLDEN / "lorem_ipsum.pbin", 7989)
    with pytest.raises(ValueError, match="holds 7,989"):
        PackedMemMapDatasetDocumentAligned(GOLDEN / "lorem_ipsum.pbin", 7989)
    for bad in (0, 1.5, True, "512"):  # at construction, not at the first len() or index
        for dataset in (PackedMemMapDatasetContinuous, PackedMemMapDatasetDocumentAligned):
            with pytest.raises(ValueError, match=rf"sequence_length must be an integer >= 1, got {bad!r}"):
                dataset(GOLDEN / "lorem_ipsum.pbin", bad)
    assert len(PackedMemMapDatasetContinuous(GOLDEN / "lorem_ipsum.pbin", np.int64(512))) == len(ds)


def reference_aligned_starts(lengths, S):
    """The rule of PackedMemMapDatasetDocumentAligned, one block at a time."""
    lengths = np.asarray(lengths)
    starts = np.cumsum(lengths) - lengths
    ends = starts + lengths
    n = int(lengths.sum())
    out, p = [], 0
    while p + S + 1 <= n:
        out.append(p)
        e = p + S
        d = np.searchsorted(starts, e, side="right") - 1  # document holding token e
        if e == ends[d] - 1:
            p = e + 1
        elif starts[d] <= p:
            p = e
        else:
            p = starts[d]
    return out


def test_document_aligned_starts_match_reference():
    rng = np.random.default_rng(3)
    for _ in range(1500):
        S = int(rng.integers(1, 24))
        lengths = rng.integers(0 if rng.random() < 0.3 else 1, 3 * S + 4, int(rng.integers(1, 25)))
        starts = np.cumsum(lengths) - lengths
        got = document_aligned_starts(starts, lengths, int(lengths.sum()), S)
        assert got.tolist() == reference_aligned_starts(lengths, S), (lengths.tolist(), S)


@pytest.mark.parametrize("S", [3, 16, 100])
def test_document_aligned_invariants(tmp_path, S):
    rng = np.random.default_rng(S)
    lengths = np.concatenate([rng.integers(1, S // 2 + 2, 200), rng.integers(S, 4 * S, 30),
                              [S + 1, S, S + 2]])
    rng.shuffle(lengths)
    docs = [np.full(L, i % 60000, np.int64) for i, L in enumerate(lengths)]  # token = document id
    path = tmp_path / "d.pbin"
    write_packed(path, docs, 2)
    ds = PackedMemMapDatasetDocumentAligned(path, S, sample_key="x")
    starts = ds.sample_starts
    doc_starts = np.cumsum(lengths) - lengths
    doc_of = np.repeat(np.arange(len(lengths)), lengths)
    n = int(lengths.sum())

    assert len(ds) == len(starts) > 0 and starts[0] == 0
    assert np.all(np.diff(starts) > 0) and starts[-1] + S + 1 <= n
    for i in range(len(ds)):
        sample = ds[i]["x"]
        assert len(sample) == S + 1 and sample.tolist() == (doc_of[starts[i] : starts[i] + S + 1]
                                                            % 60000).tolist()
    # A block starts at a document start, or continues the long document of the previous block.
    at_doc_start = np.isin(starts, doc_starts)
    continues = np.r_[False, (starts[1:] == starts[:-1] + S) & (doc_of[starts[1:]] == doc_of[starts[:-1]])]
    assert np.all(at_doc_start | continues)
    # Nothing is skipped: every token up to the last block's end is a target or a block's first token.
    covered = np.zeros(n, bool)
    for p in starts:
        covered[p : p + S + 1] = True
    assert covered[: starts[-1] + S + 1].all()
    # A document cut by the end of a block gets a block of its own that starts at its first token.
    for p in starts[:-1]:
        e = p + S
        d = doc_of[e]
        if doc_starts[d] > p and e < doc_starts[d] + lengths[d] - 1:
            assert doc_starts[d] in set(starts.tolist())
    assert np.mean(at_doc_start) > 0.5


def test_document_aligned_golden():
    ds = PackedMemMapDatasetDocumentAligned(GOLDEN / "lorem_ipsum_long.pbin", 256)
    p = ds.packed
    assert ds.sample_starts.tolist() == reference_aligned_starts(p.doc_token_lengths, 256)
    assert ds[0]["input_ids"].tolist() == p.tokens[:257].tolist()
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_document_aligned_many_documents_is_fast():
    import time

    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 600, 2_000_000)
    starts = np.cumsum(lengths) - lengths
    t = time.perf_counter()
    out = document_aligned_starts(starts, lengths, int(lengths.sum()), 1024)
    assert time.perf_counter() - t < 10  # ~1 s on a laptop core
    assert len(out) > 0 and np.all(np.diff(out) > 0)


def test_readers_are_exported_by_the_package_without_importing_torch():
    code = ("import sys; from fastlm.data import PackedFile, PackedMemMapDatasetContinuous, "
            "PackedMemMapDatasetDocumentAligned; import fastlm.data.pbin as p; "
            "assert PackedFile is p.PackedFile; assert 'torch' not in sys.modules")
    import subprocess
    import sys

    subprocess.run([sys.executable, "-c", code], check=True)


def test_sampler_ranks_take_disjoint_shares_and_bad_arguments_are_refused():
    """Each micro step the ranks take disjoint slices of one stream that covers every sample once per
    epoch; a rank outside [0, world_size), a batch or world below 1 or a negative position is an error
    (rank 2 of 2 used to read rank 0's next samples: duplicates, silently)."""
    from fastlm.data.loader import ResumableDistributedSampler as Sampler

    for n, world, micro in ((10, 2, 2), (11, 3, 1), (17, 2, 4)):
        ranks = [Sampler(n, micro, world, r, seed=1) for r in range(world)]
        steps = -(-n // (world * micro))
        taken = [np.concatenate([s.next_micro_batch() for _ in range(steps)]) for s in ranks]
        stream = np.concatenate([np.concatenate([t[i * micro:(i + 1) * micro] for t in taken])
                                 for i in range(steps)])
        assert sorted(stream[:n].tolist()) == list(range(n))  # the first epoch: every sample, once
    for kwargs, words in ((dict(rank=2), "rank must be an integer in [0, world_size = 2), got 2"),
                          (dict(rank=-1), "got -1"), (dict(micro_batch_size=0), "micro_batch_size must be"),
                          (dict(world_size=0, rank=0), "world_size must be"), (dict(position=-3), "position"),
                          (dict(rank=1.0), "got 1.0")):
        args = dict(num_samples=10, micro_batch_size=2, world_size=2, rank=0) | kwargs
        with pytest.raises(ValueError, match=re.escape(words)):
            Sampler(**args)


def test_a_float_sample_index_is_refused():
    ds = PackedMemMapDatasetContinuous(GOLDEN / "lorem_ipsum.pbin", 512)
    assert ds[np.int64(1)]["input_ids"].tolist() == ds[1]["input_ids"].tolist()
    for bad in (1.5, 1.0, True):
        with pytest.raises(TypeError, match="sample index must be an integer"):
            ds[bad]
