"""Map-style datasets of fixed-length token blocks over a .pbin file (numpy only, no torch).

Every sample is `sequence_length + 1` consecutive tokens (inputs are sample[:-1], targets sample[1:]),
returned as `{sample_key: np.ndarray[int64]}`, a fresh copy that a collate function may keep.

- `PackedMemMapDatasetContinuous`: Modalities' continuous blocks over the whole token stream, ignoring
  document boundaries.
- `PackedMemMapDatasetDocumentAligned`: blocks that start at a document start wherever they can (rule in
  the class docstring); no padding.
"""

from __future__ import annotations

import array
import numbers
import os

import numpy as np

from fastlm.data.pbin import PACK_HINT, PackedFile


def continuous_sample_count(num_tokens: int, sequence_length: int, reuse_last_target: bool = True) -> int:
    """Number of samples of `PackedMemMapDatasetContinuous` for a stream of `num_tokens` tokens.

    With reuse_last_target, consecutive blocks of S + 1 tokens share one token: (N - 1) // S
    (e.g. 68,414,190 tokens at S = 512 give 133,621). Without it they are disjoint: N // (S + 1).
    Zero when N < S + 1.
    """
    _check_sequence_length(sequence_length)
    if num_tokens < sequence_length + 1:
        return 0
    if reuse_last_target:
        return (num_tokens - 1) // sequence_length
    return num_tokens // (sequence_length + 1)


def _check_sequence_length(sequence_length) -> None:
    if (isinstance(sequence_length, bool) or not isinstance(sequence_length, numbers.Integral)
            or sequence_length < 1):
        raise ValueError(f"sequence_length must be an integer >= 1, got {sequence_length!r}")


def _check_enough_tokens(packed: PackedFile, sequence_length: int) -> None:
    if packed.num_tokens < sequence_length + 1:
        raise ValueError(
            f"{packed.path}: a sample needs sequence_length + 1 = {sequence_length + 1:,} tokens "
            f"but the file holds {packed.num_tokens:,}. HINT: lower sequence_length or pack more data "
            f"({PACK_HINT.removeprefix('HINT: ')})"
        )


def _normalize_index(i, n: int, path) -> int:
    if isinstance(i, bool) or not isinstance(i, numbers.Integral):  # (int(1.5) would silently give 1)
        raise TypeError(f"sample index must be an integer, got {i!r}")
    i = int(i)  # (numpy integers)
    if not -n <= i < n:
        raise IndexError(f"sample {i} out of range for the {n:,} samples of {path}")
    return i % n


class PackedMemMapDatasetContinuous:
    """Blocks of `sequence_length + 1` tokens over the concatenated token stream (Modalities semantics).

    reuse_last_target=True: sample i = tokens[i*S : i*S + S + 1]; the last target of a sample is the first
    input of the next, so every token after the first is a target exactly once. Count (N - 1) // S.
    reuse_last_target=False: sample i = tokens[i*(S+1) : (i+1)*(S+1)]; count N // (S + 1).
    The tail that does not fill a block is dropped.
    """

    def __init__(
        self,
        raw_data_path: str | os.PathLike,
        sequence_length: int,
        sample_key: str = "input_ids",
        reuse_last_target: bool = True,
    ):
        _check_sequence_length(sequence_length)
        self.packed = PackedFile(raw_data_path)
        self.sequence_length = sequence_length
        self.sample_key = sample_key
        self.reuse_last_target = reuse_last_target
        _check_enough_tokens(self.packed, sequence_length)
        self._num_samples = continuous_sample_count(self.packed.num_tokens, sequence_length,
                                                    reuse_last_target)
        self._stride = sequence_length if reuse_last_target else sequence_length + 1

    def __len__(self) -> int:
        return self._num_samples

    def __getitem__(self, i) -> dict[str, np.ndarray]:
        i = _normalize_index(i, self._num_samples, self.packed.path)
        start = i * self._stride
        return {self.sample_key:
                self.packed.tokens[start : start + self.sequence_length + 1].astype(np.int64)}


def document_aligned_starts(doc_offsets: np.ndarray, doc_lengths: np.ndarray, num_tokens: int,
                            sequence_length: int) -> np.ndarray:
    """Start token of every sample of `PackedMemMapDatasetDocumentAligned` (int64, increasing).

    `doc_offsets` / `doc_lengths` are in tokens, contiguous and in order (as `PackedFile` gives them).
    The per-document work is vectorised; only the walk from one aligned start to the next visits the
    chosen documents one by one (a tight loop, ~0.1 us per document that starts a block).
    """
    S = sequence_length
    starts = np.asarray(doc_offsets, dtype=np.int64)
    lengths = np.asarray(doc_lengths, dtype=np.int64)
    n_docs = len(starts)
    if n_docs == 0 or num_tokens < S + 1:
        return np.zeros(0, np.int64)
    # A block started at the start of document j continues inside j (step S, sharing one token like
    # reuse_last_target) until a block's last token e reaches the document's last token.
    blocks_in_doc = np.maximum(1, -(-(lengths - 1) // S))  # ceil((L - 1) / S), at least one
    last_e = starts + (blocks_in_doc - 1) * S + S  # last token of the document's last block
    # The next block starts at the document holding token e + 1: e + 1 itself when the block ended exactly
    # at a document end, else the start of the document cut at e (side="right" skips empty documents).
    nxt = np.searchsorted(starts, last_e + 1, side="right") - 1
    nxt[last_e + 1 >= num_tokens] = n_docs
    first = int(np.searchsorted(starts, 0, side="right") - 1)

    step = array.array("q", nxt.tobytes())
    chain = array.array("q")
    j = first
    while j < n_docs:
        chain.append(j)
        j = step[j]
    chain = np.frombuffer(chain, dtype=np.int64) if len(chain) else np.zeros(0, np.int64)

    counts = blocks_in_doc[chain]
    doc_of_block = np.repeat(chain, counts)
    k = np.arange(len(doc_of_block), dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
    block_starts = starts[doc_of_block] + k * S
    return block_starts[block_starts + S + 1 <= num_tokens]


class PackedMemMapDatasetDocumentAligned:
    """Blocks of `sequence_length + 1` tokens that start at a document start wherever they can.

    Rule (greedy, no padding, nothing skipped). With S = sequence_length, a block starting at p holds
    tokens[p : p + S + 1]; let e = p + S be its last token and d the document holding e:
      - e is d's last token (usually its EOD): the next block starts at e + 1, the next document's start;
      - else if d started at or before p (a long document): the next block continues inside d at e, sharing
        one token as in reuse_last_target, so later blocks of a long document start mid-document;
      - else d was cut by the block end: the next block restarts at d's start, and the tokens of d seen at
        the end of this block are seen again there (filler that keeps blocks full without padding).
    The first block starts at token 0; blocks that would run past the last token are dropped (so the last
    documents may go unused). Every token is a target of some block except the first token of documents
    whose block starts right at them; short documents share blocks with the documents that follow them.
    """

    def __init__(self, raw_data_path: str | os.PathLike, sequence_length: int, sample_key: str = "input_ids"):
        _check_sequence_length(sequence_length)
        self.packed = PackedFile(raw_data_path)
        self.sequence_length = sequence_length
        self.sample_key = sample_key
        _check_enough_tokens(self.packed, sequence_length)
        p = self.packed
        if p.num_documents and (
            p.doc_token_offsets[0] != 0
            or np.any(p.doc_token_offsets[1:] != p.doc_token_offsets[:-1] + p.doc_token_lengths[:-1])
        ):
            raise ValueError(
                f"{p.path}: document-aligned sampling expects documents stored back to back from the start "
                f"of the data segment, found gaps or overlaps. {PACK_HINT}"
            )
        self.sample_starts = document_aligned_starts(p.doc_token_offsets, p.doc_token_lengths, p.num_tokens,
                                                     sequence_length)

    def __len__(self) -> int:
        return len(self.sample_starts)

    def __getitem__(self, i) -> dict[str, np.ndarray]:
        i = _normalize_index(i, len(self.sample_starts), self.packed.path)
        start = self.sample_starts[i]
        return {self.sample_key:
                self.packed.tokens[start : start + self.sequence_length + 1].astype(np.int64)}
