#!/usr/bin/env python3
"""Generate csrc/unicode_tables.h: code-point classes as seen by the `tokenizers` library.

The GPT-2 pre-tokenizer regex of `tokenizers` runs on Oniguruma, whose Unicode tables can be newer
(or older) than Python's `unicodedata`. So we do not use `unicodedata` at all: we ask `tokenizers`
itself, for every code point U+0000..U+10FFFF except surrogates, whether it matches `\\p{L}`,
`\\p{N}` and `\\s` (three `Split(Regex(...), "removed")` passes over one string holding all code
points), then cross-check the result against the real `ByteLevel` pre-tokenizer: a pure-Python
model of the GPT-2 regex, driven by the probed classes, must split context strings built from every
code point ("a"+c, "1"+c, "!"+c, " "+c, "\\n"+c, c+c, ...) exactly like `ByteLevel` does.

Classes: 0 = other, 1 = letter (\\p{L}), 2 = number (\\p{N}), 3 = whitespace (\\s).

Output layout (two-stage table, 2 bits per code point):
  kCpStage1[cp >> 8]            -> block index (uint16)
  kCpStage2[block * 64 + ((cp & 255) >> 2)] >> (2 * (cp & 3)) & 3 -> class

Usage: python tools/gen_unicode_tables.py [--out csrc/unicode_tables.h] [--no-verify]
"""
from __future__ import annotations

import argparse
import os
import sys

import tokenizers
from tokenizers import Regex, pre_tokenizers

from fastlm.tokenizer import bytes_to_unicode

OTHER, LETTER, NUMBER, SPACE = 0, 1, 2, 3
MAX_CP = 0x110000


def all_code_points() -> list[int]:
    return [cp for cp in range(MAX_CP) if not (0xD800 <= cp <= 0xDFFF)]


def probe_class(pattern: str, cps: list[int]) -> bytearray:
    """member[cp] = 1 iff cp matches `pattern` in tokenizers' regex engine."""
    member = bytearray(MAX_CP)
    split = pre_tokenizers.Split(Regex(pattern), behavior="removed")
    chunk = 1 << 16
    for i in range(0, len(cps), chunk):
        part = cps[i:i + chunk]
        s = "".join(map(chr, part))
        for cp in part:
            member[cp] = 1
        # The pieces left after removing matches are exactly the non-members.
        for _piece, (a, b) in split.pre_tokenize_str(s):
            for k in range(a, b):
                member[part[k]] = 0
    return member


def classify() -> bytearray:
    cps = all_code_points()
    letter = probe_class(r"\p{L}", cps)
    number = probe_class(r"\p{N}", cps)
    space = probe_class(r"\s", cps)
    cls = bytearray(MAX_CP)
    for cp in cps:
        n = letter[cp] + number[cp] + space[cp]
        if n > 1:
            raise SystemExit(f"U+{cp:04X} is in more than one class (L={letter[cp]} N={number[cp]} "
                             f"S={space[cp]}); the GPT-2 scanner model cannot represent that")
        cls[cp] = LETTER if letter[cp] else NUMBER if number[cp] else SPACE if space[cp] else OTHER
    return cls


# ---- pure-Python model of the GPT-2 pre-tokenizer, for verification ----------------------------

def gpt2_split(s: str, cls: bytearray) -> list[str]:
    out = []
    n = len(s)
    i = 0

    def c(k):
        return cls[ord(s[k])]

    while i < n:
        ch = s[i]
        if ch == "'" and i + 1 < n:
            nxt = s[i + 1]
            if nxt in "stmd":
                out.append(s[i:i + 2])
                i += 2
                continue
            if i + 2 < n and s[i + 1:i + 3] in ("re", "ve", "ll"):
                out.append(s[i:i + 3])
                i += 3
                continue
        j = i + 1 if (ch == " " and i + 1 < n) else i
        k = c(j)
        if j != i and k == SPACE:
            j = i  # ' ' followed by whitespace: no ' ?' prefix possible
            k = SPACE
        if k == LETTER or k == NUMBER or k == OTHER:
            e = j + 1
            while e < n and c(e) == k:
                e += 1
            out.append(s[i:e])
            i = e
            continue
        # whitespace run
        e = i
        while e < n and c(e) == SPACE:
            e += 1
        if e == n or e - i == 1:
            out.append(s[i:e])
            i = e
        else:
            out.append(s[i:e - 1])
            i = e - 1
    return out


def verify(cls: bytearray) -> None:
    b2u = bytes_to_unicode()
    bl = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    cps = all_code_points()
    chunk = 4096
    for i in range(0, len(cps), chunk):
        parts = []
        for cp in cps[i:i + chunk]:
            ch = chr(cp)
            parts.append("a" + ch + "1" + ch + "!" + ch + " " + ch + "\n" + ch + ch + " " + ch + "'" + ch)
        s = "".join(parts) + "\u3000 x"
        got = [p for p, _ in bl.pre_tokenize_str(s)]
        want = ["".join(b2u[b] for b in piece.encode("utf-8")) for piece in gpt2_split(s, cls)]
        if got != want:
            for k, (g, w) in enumerate(zip(got, want)):
                if g != w:
                    raise SystemExit(f"verification failed near code points {cps[i]:#x}..: piece {k}: "
                                     f"tokenizers {g!r} vs model {w!r}")
            raise SystemExit(f"verification failed: {len(got)} vs {len(want)} pieces")


# ---- emit -----------------------------------------------------------------------------------------

def emit(cls: bytearray, path: str) -> None:
    blocks: dict[bytes, int] = {}
    stage1 = []
    stage2 = bytearray()
    for hi in range(MAX_CP >> 8):
        packed = bytearray(64)
        for lo in range(256):
            packed[lo >> 2] |= cls[(hi << 8) | lo] << (2 * (lo & 3))
        key = bytes(packed)
        if key not in blocks:
            blocks[key] = len(blocks)
            stage2 += key
        stage1.append(blocks[key])
    counts = [cls.count(k) for k in range(4)]
    lines = [
        "// GENERATED by tools/gen_unicode_tables.py -- do not edit by hand.",
        f"// Source of truth: the `tokenizers` library {tokenizers.__version__} (Oniguruma regex engine),",
        "// probed over every code point U+0000..U+10FFFF except surrogates.",
        f"// Counts: other={counts[0] - 2048} (excluding surrogates), letter={counts[1]}, "
        f"number={counts[2]}, whitespace={counts[3]}.",
        "// Classes: 0 other, 1 letter (\\p{L}), 2 number (\\p{N}), 3 whitespace (\\s).",
        "#pragma once",
        "#include <cstdint>",
        "",
        "namespace fastlm {",
        "namespace unicode_tables {",
        "",
        "enum CpClass : uint8_t { kOther = 0, kLetter = 1, kNumber = 2, kSpace = 3 };",
        "",
        f"inline constexpr uint16_t kCpStage1[{len(stage1)}] = {{",
    ]
    for i in range(0, len(stage1), 24):
        lines.append("  " + ",".join(str(v) for v in stage1[i:i + 24]) + ",")
    lines.append("};")
    lines.append("")
    lines.append(f"inline constexpr uint8_t kCpStage2[{len(stage2)}] = {{")
    for i in range(0, len(stage2), 32):
        lines.append("  " + ",".join(str(v) for v in stage2[i:i + 32]) + ",")
    lines.append("};")
    lines += [
        "",
        "// Class of a code point (cp < 0x110000).",
        "inline uint8_t cp_class(uint32_t cp) {",
        "  const uint32_t blk = kCpStage1[cp >> 8];",
        "  return (kCpStage2[blk * 64 + ((cp & 255) >> 2)] >> (2 * (cp & 3))) & 3;",
        "}",
        "",
        "}  // namespace unicode_tables",
        "}  // namespace fastlm",
        "",
    ]
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    print(f"wrote {path}: {len(blocks)} distinct blocks, letter={counts[1]} number={counts[2]} "
          f"space={counts[3]}", file=sys.stderr)


def main() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(here, "..", "csrc", "unicode_tables.h"))
    ap.add_argument("--no-verify", action="store_true")
    args = ap.parse_args()
    cls = classify()
    if not args.no_verify:
        verify(cls)
        print("verified against ByteLevel pre-tokenizer", file=sys.stderr)
    emit(cls, args.out)


if __name__ == "__main__":
    main()
