"""Packed token files (.pbin) and raw JSONL indexes (.idx), byte-compatible with Modalities.

.pbin layout (Modalities' "Packed MemMap" file):

    | uint64 LE data-segment length in bytes | uint32 LE token size (1, 2 or 4) |
    | data segment: token ids, little-endian |
    | index segment: pickle.dumps([(byte_offset, byte_length), ...], protocol=4), one pair per document |

Offsets are relative to the data segment in files written by Modalities >= 0.5 and by fastlm (first offset
0); older files count the 12-byte header too (first offset 12). `PackedFile` reads both and never
unpickles: the index is parsed by `fastlm._C.parse_pairs`, which accepts only a list of int pairs.

Limits: documents are kept in file order; the whole index (16 bytes per document) is held in memory while
reading or writing, the tokens never are.
"""

from __future__ import annotations

import array
import os
from pathlib import Path
from typing import Iterable

import numpy as np

from fastlm import _C
from fastlm.atomic import atomic_output, should_write

HEADER_SIZE = 12  # uint64 data length + uint32 token size
TOKEN_DTYPES = {1: np.dtype("<u1"), 2: np.dtype("<u2"), 4: np.dtype("<u4")}
PACK_HINT = "HINT: re-run python -m fastlm.pack on the source JSONL to regenerate it."
RAW_INDEX_HINT = "HINT: regenerate it with `fastlm data create_raw_index {jsonl}`."

DATA_RELATIVE = "data-relative"  # Modalities >= 0.5, fastlm: first offset 0
HEADER_RELATIVE = "header-relative"  # older Modalities: offsets include the 12-byte header


# ------------------------------------------------------------------------------------------ raw index


def read_raw_index(path: str | os.PathLike, jsonl: str | os.PathLike | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(byte offsets, byte lengths without the newline) of every line of a JSONL file, from its .idx file.

    Both arrays are uint64. Raises FileNotFoundError / ValueError naming the file and how to regenerate it
    (from `jsonl`, the file the index describes, when the caller knows it).
    """
    path = Path(path)
    if jsonl is None:
        hint = RAW_INDEX_HINT.format(jsonl=path.with_suffix(".jsonl"))
    else:
        hint = RAW_INDEX_HINT.format(jsonl=f"--index_path {path} {jsonl}")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: raw index not found. {hint}")
    data = path.read_bytes()
    try:
        offsets, lengths = _C.parse_pairs(data)
    except ValueError as e:
        raise ValueError(
            f"{path}: expected a pickled list of (offset, length) pairs ({len(data):,} bytes), "
            f"found: {e}. {hint}"
        ) from None
    return offsets, lengths


def write_raw_index(path: str | os.PathLike, offsets: np.ndarray, lengths: np.ndarray) -> None:
    """Write a .idx file byte-identical to Modalities' (pickle protocol 4), atomically; replaces `path`."""
    offsets = np.asarray(offsets)
    lengths = np.asarray(lengths)
    if offsets.shape != lengths.shape or offsets.ndim != 1:
        raise ValueError(f"offsets and lengths must be 1-D and equal in length, "
                         f"got {offsets.shape} and {lengths.shape}")
    payload = _C.pickle_pairs(offsets, lengths)
    with atomic_output(path) as tmp, open(tmp, "wb") as f:
        f.write(payload)


# ------------------------------------------------------------------------------------------ reading


class PackedFile:
    """A .pbin file opened read-only as a numpy memmap and validated on open.

    Attributes: `path`, `token_size`, `dtype` (little-endian uint8/16/32), `tokens` (1-D memmap of the data
    segment), `num_tokens`, `num_documents`, `doc_token_offsets` / `doc_token_lengths` (int64, in tokens,
    relative to `tokens`), `offsets_convention` ("data-relative" or "header-relative" as found on disk).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            from fastlm.atomic import missing_file

            err = missing_file(self.path, "packed file")
            raise type(err)(f"{err}. {PACK_HINT}")
        file_size = self.path.stat().st_size
        if file_size < HEADER_SIZE:
            self._fail(f"expected at least a {HEADER_SIZE}-byte header, found a {file_size}-byte file")
        raw = np.memmap(self.path, dtype=np.uint8, mode="r")
        data_len = int(raw[:8].view("<u8")[0])
        token_size = int(raw[8:12].view("<u4")[0])
        if token_size not in TOKEN_DTYPES:
            head = bytes(raw[:2])
            if head in (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05") or head[:1] == b"{":
                looks = "a raw index (.idx)" if head[:1] == b"\x80" else "a JSONL file"
                raise ValueError(f"{self.path}: not a packed .pbin file, this looks like {looks}; expected "
                                 f"the .pbin that the pack step writes")
            self._fail(f"expected a token size of 1, 2 or 4 bytes in the header, found {token_size}")
        if data_len % token_size:
            self._fail(f"data segment says {data_len:,} bytes, not a multiple of the token size {token_size}")
        if data_len > file_size - HEADER_SIZE:
            self._fail(
                f"data segment says {data_len:,} bytes but the file holds {file_size - HEADER_SIZE:,} "
                "after the header (truncated file?)"
            )
        index_start = HEADER_SIZE + data_len
        try:
            offsets, lengths = _C.parse_pairs(raw[index_start:])
            parse_error = None
        except ValueError as e:
            parse_error = str(e)
        if parse_error is not None:
            self._fail(
                f"expected the index segment (bytes {index_start:,}..{file_size:,}) to be a pickled list of "
                f"(offset, length) pairs, found: {parse_error}"
            )

        self.offsets_convention = DATA_RELATIVE
        if len(offsets):
            # Writers put the first document at the start of the data segment, so its offset tells the
            # convention. Nothing else can: a data-relative document may well start at byte 12.
            if offsets[0] == HEADER_SIZE:
                self.offsets_convention = HEADER_RELATIVE
                offsets = offsets - np.uint64(HEADER_SIZE)
            elif offsets[0] != 0:
                self._fail(
                    f"expected the first document at offset 0 (data-relative) or {HEADER_SIZE} "
                    f"(header-relative), found offset {int(offsets[0]):,}"
                )
            self._check_index(offsets, lengths, data_len, token_size)

        self.token_size = token_size
        self.dtype = TOKEN_DTYPES[token_size]
        self.tokens = raw[HEADER_SIZE:index_start].view(self.dtype)
        self.num_tokens = data_len // token_size
        self.num_documents = len(offsets)
        self.doc_token_offsets = (offsets // np.uint64(token_size)).astype(np.int64)
        self.doc_token_lengths = (lengths // np.uint64(token_size)).astype(np.int64)

    def _fail(self, what: str):
        raise ValueError(f"{self.path}: {what}. {PACK_HINT}")

    def _check_index(self, offsets: np.ndarray, lengths: np.ndarray, data_len: int, token_size: int) -> None:
        """Every document inside the data segment, token-aligned, in non-decreasing order (offsets are
        data-relative)."""
        where = lambda mask: int(np.flatnonzero(mask)[0])  # noqa: E731 - first offending document
        bad = offsets % np.uint64(token_size) != 0
        bad |= lengths % np.uint64(token_size) != 0
        if bad.any():
            i = where(bad)
            self._fail(
                f"expected document offsets and lengths in whole tokens of {token_size} bytes, "
                f"found document {i:,} at offset {int(offsets[i]):,} with length {int(lengths[i]):,}"
            )
        if len(offsets) > 1 and (offsets[1:] < offsets[:-1]).any():
            i = where(offsets[1:] < offsets[:-1]) + 1
            self._fail(
                f"expected non-decreasing document offsets, found document {i:,} at {int(offsets[i]):,} "
                f"after document {i - 1:,} at {int(offsets[i - 1]):,}"
            )
        # Written as length > limit - offset so that huge values cannot wrap around in uint64.
        limit = np.uint64(data_len)
        outside = (offsets > limit) | (lengths > limit - np.minimum(offsets, limit))
        if outside.any():
            i = where(outside)
            self._fail(
                f"expected every document inside the {data_len:,}-byte data segment "
                f"({self.offsets_convention} offsets), found document {i:,} at offset {int(offsets[i]):,} "
                f"with length {int(lengths[i]):,}"
            )

    def __len__(self) -> int:
        return self.num_documents

    def document(self, i: int) -> np.ndarray:
        """Tokens of document `i` (negative counts from the end): a read-only view into the memmap."""
        n = self.num_documents
        if not -n <= i < n:
            raise IndexError(f"document {i} out of range for {self.path} with {n:,} documents")
        i %= n
        start = self.doc_token_offsets[i]
        return self.tokens[start : start + self.doc_token_lengths[i]]

    def __repr__(self) -> str:
        return (
            f"PackedFile({str(self.path)!r}, documents={self.num_documents:,}, tokens={self.num_tokens:,}, "
            f"token_size={self.token_size}, offsets={self.offsets_convention})"
        )


# ------------------------------------------------------------------------------------------ writing


def write_packed(
    dst: str | os.PathLike,
    documents: Iterable,
    token_size: int,
    file_existence_policy: str = "error",
) -> int | None:
    """Write `documents` (an iterable of integer token-id sequences) to a .pbin file, atomically.

    Each document is written exactly as given (the caller appends EOD). Tokens stream to disk as they come;
    only the document lengths are kept (8 bytes each), and the index is pickled at the end with
    `_C.pickle_pairs`, giving data-relative offsets, byte-identical to Modalities 0.5.
    Returns the number of documents written, or None when `file_existence_policy` says to skip.
    """
    if token_size not in TOKEN_DTYPES:
        raise ValueError(f"token_size must be 1, 2 or 4, got {token_size}")
    dst = Path(dst)
    if not should_write(dst, file_existence_policy):
        return None
    dtype = TOKEN_DTYPES[token_size]
    max_id = np.iinfo(dtype).max
    byte_lengths = array.array("Q")
    with atomic_output(dst) as tmp, open(tmp, "wb") as f:
        f.write(bytes(HEADER_SIZE))  # patched once the data length is known
        for i, doc in enumerate(documents):
            tokens = np.asarray(doc)
            if tokens.ndim != 1 or (tokens.size and tokens.dtype.kind not in "iu"):
                raise TypeError(f"document {i} must be a 1-D sequence of ints, "
                                f"got dtype {tokens.dtype} shape {tokens.shape}")
            if tokens.size and (tokens.min() < 0 or tokens.max() > max_id):
                raise ValueError(
                    f"document {i} holds token ids in [{tokens.min()}, {tokens.max()}], outside the "
                    f"{token_size}-byte range [0, {max_id}]"
                )
            f.write(tokens.astype(dtype, copy=False).tobytes())
            byte_lengths.append(tokens.size * token_size)
        lengths = np.frombuffer(byte_lengths, dtype=np.uint64) if byte_lengths else np.zeros(0, np.uint64)
        offsets = np.cumsum(lengths, dtype=np.uint64) - lengths
        data_len = int(lengths.sum(dtype=np.uint64))
        f.write(_C.pickle_pairs(offsets, lengths))
        f.seek(0)
        f.write(np.array([data_len], "<u8").tobytes() + np.array([token_size], "<u4").tobytes())
    return len(lengths)
