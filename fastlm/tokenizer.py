"""Loading a `tokenizer.json` and choosing how to run it.

The native path (fastlm._C.ByteLevelBPE, multithreaded C++) covers byte-level BPE tokenizers of the GPT-2
family. Anything else (WordPiece, Unigram/Metaspace, normalizers, other pre-tokenizers, template
post-processors) runs through the `tokenizers` library itself with identical results; `native_reason`
says why a tokenizer was not taken natively.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


class TokenizerError(ValueError):
    """A tokenizer that cannot be loaded or used; the message names the file."""


def resolve_tokenizer_file(path: str | os.PathLike) -> Path:
    """A folder holding tokenizer.json, or the file itself."""
    p = Path(path)
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        from fastlm.atomic import relative_note

        raise TokenizerError(f"{path}: no tokenizer found (expected a tokenizer.json file or a folder that "
                             f"holds one){relative_note(path)}")
    return p


GPT2_SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map, the alphabet of byte-level vocabularies."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs = list(bs)
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def tiktoken_encoding(path: str | os.PathLike):
    """A `tiktoken` Encoding of a GPT-2-style tokenizer.json, built offline (for benchmarks): ranks are
    the vocabulary ids, the split pattern GPT-2's, the added tokens its special tokens."""
    import tiktoken

    spec = json.loads(resolve_tokenizer_file(path).read_text(encoding="utf-8"))
    unbyte = {c: b for b, c in bytes_to_unicode().items()}
    special = {t["content"]: t["id"] for t in spec.get("added_tokens") or []}
    ranks = {bytes(unbyte[ch] for ch in token): i for token, i in spec["model"]["vocab"].items()
             if token not in special and all(ch in unbyte for ch in token)}
    return tiktoken.Encoding("offline-byte-level-bpe", pat_str=GPT2_SPLIT_PATTERN, mergeable_ranks=ranks,
                             special_tokens=special)


def token_size_for(num_ids: int) -> int:
    """Bytes per token in a .pbin: the smallest of 1, 2, 4 that holds ids 0..num_ids-1."""
    for size in (1, 2, 4):
        if num_ids <= 1 << (8 * size):
            return size
    raise TokenizerError(f"a vocabulary of {num_ids:,} ids does not fit 4-byte tokens")


class Tokenizer:
    """A parsed tokenizer.json with lazy native and library-backed encoders."""

    def __init__(self, path: str | os.PathLike):
        self.path = resolve_tokenizer_file(path)
        try:
            self.spec = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise TokenizerError(f"{self.path}: cannot read tokenizer.json: {err}") from None
        if not isinstance(self.spec, dict) or not isinstance(self.spec.get("model"), dict):
            raise TokenizerError(f"{self.path}: not a tokenizers tokenizer.json (no 'model' section)")
        model = self.spec["model"]
        vocab = model.get("vocab")
        self._vocab: dict[str, int] = vocab if isinstance(vocab, dict) else {}
        if isinstance(vocab, list):  # Unigram: a list of [piece, score]
            self._vocab = {piece: i for i, (piece, _score) in enumerate(vocab)}
        self._native = None
        self._hf = None
        self.added_tokens = list(self.spec.get("added_tokens") or [])
        self._added = {t["content"]: t["id"] for t in self.added_tokens}
        self.native_reason = self._native_blocker()
        if self.native_reason is None:
            ids = list(self._vocab.values()) + list(self._added.values())
            self.max_id = max(ids) if ids else 0
        else:  # the library is the authority on ids it assigns
            self.max_id = max(self.library().get_vocab(with_added_tokens=True).values(), default=0)

    @property
    def native(self) -> bool:
        return self.native_reason is None

    @property
    def token_size(self) -> int:
        return token_size_for(self.max_id + 1)

    def token_to_id(self, token: str) -> int | None:
        if self.native_reason is not None:
            return self.library().token_to_id(token)
        if token in self._added:
            return self._added[token]
        return self._vocab.get(token)

    def _native_blocker(self) -> str | None:
        spec, model = self.spec, self.spec["model"]
        if model.get("type", "BPE") != "BPE" or "merges" not in model:
            return f"model type {model.get('type')!r} is not BPE"
        if model.get("dropout") not in (None, 0, 0.0):
            return "BPE dropout is set"
        if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
            return "BPE with a subword prefix or word suffix"
        if model.get("byte_fallback"):
            return "BPE with byte_fallback"
        if spec.get("normalizer") is not None:
            return f"normalizer {spec['normalizer'].get('type')!r}"
        pre = spec.get("pre_tokenizer") or {}
        if pre.get("type") != "ByteLevel":
            return f"pre-tokenizer {pre.get('type')!r} is not ByteLevel"
        if pre.get("add_prefix_space", True) or not pre.get("use_regex", True):
            return "ByteLevel pre-tokenizer with add_prefix_space or without its regex"
        missing = sorted(b for b, symbol in bytes_to_unicode().items() if symbol not in self._vocab)
        if missing:
            # (a BpeTrainer run without the byte-level initial alphabet leaves out bytes its corpus lacks;
            # tokenizers then drops such bytes or maps them to the unk token)
            return (f"the vocab lacks the byte-level symbols of {len(missing)} of the 256 bytes (byte "
                    f"{missing[0]} first)")
        post = spec.get("post_processor")
        if post is not None and post.get("type") != "ByteLevel":
            return f"post-processor {post.get('type')!r} adds tokens"
        if len({bool(t.get("normalized", True)) for t in self.added_tokens}) > 1:
            # tokenizers matches non-normalized added tokens before normalized ones; the native matcher
            # makes one leftmost-longest pass, which is the same only when all share the flag.
            return "added tokens mix normalized and non-normalized matching"
        next_id = len(self._vocab)
        for t in self.added_tokens:
            if t.get("single_word") or t.get("lstrip") or t.get("rstrip"):
                return f"added token {t['content']!r} uses single_word/lstrip/rstrip"
            # tokenizers gives an added token its vocabulary id, or else the next free id, whatever the
            # file says; the native path takes the file's ids, so they must agree.
            expected = self._vocab.get(t["content"])
            if expected is None:
                expected, next_id = next_id, next_id + 1
            if t["id"] != expected:
                return f"added token {t['content']!r} has id {t['id']} but tokenizers assigns {expected}"
        return None

    def native_encoder(self):
        """The C++ byte-level BPE (fastlm._C.ByteLevelBPE); only when `native` is true."""
        if self.native_reason is not None:
            raise TokenizerError(f"{self.path}: the native path does not cover this tokenizer: "
                                 f"{self.native_reason}")
        if self._native is None:
            from fastlm import _C

            model = self.spec["model"]
            added = [(t["content"], int(t["id"])) for t in self.added_tokens]
            try:
                self._native = _C.ByteLevelBPE(
                    self._vocab, model["merges"], added, bool(model.get("ignore_merges", False))
                )
            except ValueError as err:
                raise TokenizerError(f"{self.path}: {err}") from None
        return self._native

    def library(self):
        """The same tokenizer in the `tokenizers` library."""
        if self._hf is None:
            from tokenizers import Tokenizer as HFTokenizer

            try:
                self._hf = HFTokenizer.from_file(str(self.path))
            except Exception as err:  # the library raises plain Exception subclasses
                raise TokenizerError(f"{self.path}: the tokenizers library cannot load it: {err}") from None
        return self._hf

    def encode(self, text: str) -> list[int]:
        """Ids of one text, by the native path where it applies."""
        if self.native:
            return self.native_encoder().encode(text)
        return self.library().encode(text, add_special_tokens=True).ids

    def decode(self, ids) -> str:
        return self.library().decode(list(ids), skip_special_tokens=False)

    def describe(self) -> str:
        if self.native:
            return "native byte-level BPE"
        return f"tokenizers library ({self.native_reason})"
