"""Tools on packed files behind `fastlm data inspect` and `fastlm data merge_packed_data`.

Both work on .pbin files of any size: tokens are read through the memmap and copied in chunks, never
loaded whole.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from fastlm.atomic import atomic_output, same_file, should_write
from fastlm.data.pbin import HEADER_SIZE, PACK_HINT, PackedFile
from fastlm import _C

COPY_CHUNK_BYTES = 16 * 1024 * 1024


def end_of_document_tokens(packed: PackedFile) -> np.ndarray:
    """The distinct last tokens of the non-empty documents of `packed` (one value when EOD is consistent)."""
    lengths = packed.doc_token_lengths
    last = packed.doc_token_offsets[lengths > 0] + lengths[lengths > 0] - 1
    return np.unique(np.asarray(packed.tokens[last]))


def inspect_packed(path: str | os.PathLike, tokenizer_path: str | os.PathLike | None = None,
                   max_chars: int = 2000) -> str:
    """The report of `fastlm data inspect FILE.pbin [--tokenizer PATH]`, as a string.

    Lists documents, tokens, token size, the offsets convention and the end-of-document token(s); with a
    tokenizer (a tokenizer.json or a folder holding one) it also decodes the first document, cut to
    `max_chars` characters.
    """
    packed = PackedFile(path)
    eods = end_of_document_tokens(packed)
    lengths = packed.doc_token_lengths
    lines = [
        f"file:            {packed.path} ({packed.path.stat().st_size:,} bytes)",
        f"documents:       {packed.num_documents:,}",
        f"tokens:          {packed.num_tokens:,}",
        f"token size:      {packed.token_size} bytes ({packed.dtype.name}, little-endian)",
        f"offsets:         {packed.offsets_convention}"
        + (" (Modalities >= 0.5, fastlm)" if packed.offsets_convention == "data-relative"
           else " (older Modalities)"),
    ]
    if len(eods) == 1:
        lines.append(f"end of document: token {int(eods[0])} (last token of every document)")
    elif len(eods) > 1:
        shown = ", ".join(str(int(t)) for t in eods[:10]) + (", ..." if len(eods) > 10 else "")
        lines.append(f"end of document: documents end with {len(eods):,} different tokens: {shown}")
    if packed.num_documents:
        lines.append(
            f"document tokens: min {int(lengths.min()):,}, mean {float(lengths.mean()):,.1f}, "
            f"max {int(lengths.max()):,}"
        )
        first = packed.document(0)
        lines.append(f"first document:  {len(first):,} tokens: {np.asarray(first[:20]).tolist()}"
                     + (" ..." if len(first) > 20 else ""))
        if tokenizer_path is not None:
            from fastlm.tokenizer import Tokenizer

            text = Tokenizer(tokenizer_path).decode(np.asarray(first).tolist())
            if len(text) > max_chars:
                text = text[:max_chars] + f" ... ({len(text) - max_chars:,} more characters)"
            lines.append("first document decoded:")
            lines.append(text)
    return "\n".join(lines)


def merge_packed(
    dst: str | os.PathLike, sources: Sequence[str | os.PathLike], file_existence_policy: str = "error"
) -> int | None:
    """Concatenate .pbin files into `dst` (`fastlm data merge_packed_data IN1.pbin IN2.pbin ... OUT.pbin`).

    All inputs must share the token size and the end-of-document token (the last token of every document:
    a different one means a different tokenizer). Data segments are streamed in chunks; the output has
    data-relative offsets (Modalities 0.5) whatever convention each input uses, and appears atomically:
    on any error there is no `dst`. Returns the number of documents, or None when skipped by the policy.
    """
    if not sources:
        raise ValueError("merge_packed needs at least one source file")
    dst = Path(dst)
    for source in sources:  # (as every command: no policy lets the output replace an input)
        if same_file(source, dst):
            raise ValueError(f"{dst}: the merged output would replace its source {source}; expected another "
                             f"path for the output")
    if not should_write(dst, file_existence_policy):
        return None
    packed = [PackedFile(s) for s in sources]
    ref = packed[0]
    ref_eod: tuple[PackedFile, int] | None = None
    for p in packed:
        if p.token_size != ref.token_size:
            raise ValueError(
                f"cannot merge {p.path} (token size {p.token_size}) with {ref.path} "
                f"(token size {ref.token_size}): "
                f"all inputs must share the token size. HINT: pack them with the same tokenizer."
            )
        eods = end_of_document_tokens(p)
        if len(eods) > 1:
            raise ValueError(
                f"{p.path}: expected every document to end with the same end-of-document token, found "
                f"{len(eods)} different last tokens ({', '.join(map(str, eods[:5].tolist()))}). {PACK_HINT}"
            )
        if len(eods) == 1:
            if ref_eod is None:
                ref_eod = (p, int(eods[0]))
            elif int(eods[0]) != ref_eod[1]:
                raise ValueError(
                    f"cannot merge {p.path} (end-of-document token {int(eods[0])}) with {ref_eod[0].path} "
                    f"(end-of-document token {ref_eod[1]}): different tokenizers. "
                    f"HINT: pack all inputs with the same tokenizer."
                )

    offsets, lengths = [], []
    base = 0  # byte offset of the current source's data segment in the output data segment
    for p in packed:
        offsets.append(p.doc_token_offsets.astype(np.uint64) * np.uint64(p.token_size) + np.uint64(base))
        lengths.append(p.doc_token_lengths.astype(np.uint64) * np.uint64(p.token_size))
        base += p.num_tokens * p.token_size
    index = _C.pickle_pairs(np.concatenate(offsets), np.concatenate(lengths))

    with atomic_output(dst) as tmp, open(tmp, "wb") as out:
        out.write(np.array([base], "<u8").tobytes() + np.array([ref.token_size], "<u4").tobytes())
        for p in packed:
            remaining = p.num_tokens * p.token_size
            with open(p.path, "rb") as src:
                src.seek(HEADER_SIZE)
                while remaining:
                    chunk = src.read(min(COPY_CHUNK_BYTES, remaining))
                    if not chunk:
                        raise ValueError(f"{p.path}: file shrank while merging. {PACK_HINT}")
                    out.write(chunk)
                    remaining -= len(chunk)
        out.write(index)
    return sum(p.num_documents for p in packed)
