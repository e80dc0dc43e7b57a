#!/usr/bin/env python3
"""Quick tokens/s comparison: fastlm._C.ByteLevelBPE vs HF tokenizers vs tiktoken (GPT-2).

Each document of the RedPajama sample gets one EOD ("<|endoftext|>") appended, as the packer does.
tiktoken is built offline from tokenizer.json (vocab bytes -> rank); it is not id-for-id identical to
tokenizers in every corner case, but it is the usual speed reference.

Usage: python benchmarks/bench_bpe_quick.py [--data FILE.jsonl] [--tokenizer tokenizer.json] [--repeat 5]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
import os
import time

from fastlm.tokenizer import tiktoken_encoding

DATA = str(Path(__file__).resolve().parent.parent
           / "examples/getting_started/data/raw/redpajama_v2_samples_512_train.jsonl")
TOKENIZER = str(Path(__file__).resolve().parent.parent / "examples/getting_started/tokenizer/tokenizer.json")


def best_of(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=DATA)
    ap.add_argument("--tokenizer", default=TOKENIZER)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()

    from tokenizers import Tokenizer

    from fastlm._C import ByteLevelBPE

    tj = json.load(open(args.tokenizer, encoding="utf-8"))
    eod = "<|endoftext|>"
    docs = [json.loads(line)["raw_content"] + eod for line in open(args.data, encoding="utf-8")]
    nbytes = sum(len(d.encode()) for d in docs)

    hf = Tokenizer.from_file(args.tokenizer)
    m = tj["model"]
    ours = ByteLevelBPE(m["vocab"], m["merges"], [(a["content"], a["id"]) for a in tj["added_tokens"]],
                        bool(m.get("ignore_merges", False)))
    ntok = sum(len(e.ids) for e in hf.encode_batch(docs))
    assert ours._count_tokens(docs, 1) == ntok, "token count differs from tokenizers"

    print(f"data: {os.path.basename(args.data)}: {len(docs)} docs, {nbytes / 1e6:.2f} MB, {ntok} tokens "
          f"(incl. {len(docs)} EODs); best of {args.repeat}; {os.cpu_count()} CPUs")
    rows = []

    def add(name, fn):
        t = best_of(fn, args.repeat)
        rows.append((name, t))
        print(f"  {name:<48s} {t * 1e3:8.1f} ms  {ntok / t / 1e6:7.2f} M tok/s  {nbytes / t / 1e6:7.1f} MB/s",
              flush=True)

    add("fastlm ByteLevelBPE, 1 thread, cold cache", lambda: ours._count_tokens(docs, 1, True))
    add("fastlm ByteLevelBPE, 1 thread, warm cache", lambda: ours._count_tokens(docs, 1, False))
    add("fastlm ByteLevelBPE.encode per doc (lists)", lambda: [ours.encode(d) for d in docs])
    add("fastlm ByteLevelBPE, 2 threads, cold caches", lambda: ours._count_tokens(docs, 2, True))
    add("tokenizers encode per doc (1 thread)", lambda: [hf.encode(d) for d in docs])
    add("tokenizers encode_batch (all threads)", lambda: hf.encode_batch(docs))
    try:
        enc = tiktoken_encoding(args.tokenizer)
        allowed = {eod}
        add("tiktoken encode per doc (1 thread)",
            lambda: [enc.encode(d, allowed_special=allowed) for d in docs])
        add("tiktoken encode_batch (2 threads)",
            lambda: enc.encode_batch(docs, allowed_special=allowed, num_threads=2))
    except ImportError:
        print("  tiktoken not installed")


if __name__ == "__main__":
    main()
