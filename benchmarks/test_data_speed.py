"""Data pipeline speed on this machine: fastlm against what a user would otherwise run, side by side.

- create_raw_index on ~200 MB of JSONL: the whole `fastlm data create_raw_index` command against
  Python-level scans (Modalities' algorithm, and the leanest loop: read lines, json.loads each,
  pickle the index) and `wc -l`.
- Packing with the GPT-2 tokenizer on 2 threads: fastlm's pack (reading, JSON, BPE, writing) against
  tokenize-only baselines on the already extracted texts: HF `tokenizers` encode_batch and `tiktoken`
  (built offline from tokenizer.json). Modalities itself is a quoted figure, not run here: ~1.1 M tokens/s,
  the reference figure the data-pipeline issue set its bar against.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import GPT2, REDPAJAMA, record, wall

THREADS = 2

PY_SCAN = textwrap.dedent(
    """
    import json, pickle, sys
    index = []
    with open(sys.argv[1], "rb") as f:
        offset = 0
        for line in f:
            body = line[:-1] if line.endswith(b"\\n") else line
            if body.strip():
                json.loads(body)
                index.append((offset, len(body)))
            offset += len(line)
    with open(sys.argv[2], "wb") as out:
        pickle.dump(index, out)
    """
)

# The algorithm of Modalities' create_raw_index (its IndexGenerator, line-based since Modalities 0.2),
# rewritten here so that the framework's ~5 s import is not counted: the file opened in text mode, a reader
# thread that calls tell() and readline() for every line and feeds a queue, an indexer thread that
# json.loads each line under a tqdm bar, the list pickled at the end. Text mode makes tell() slow (it
# replays the decoder) and lengths come out in characters, not bytes: the offsets equal fastlm's, the
# lengths of non-ASCII lines do not.
PY_SCAN_MODALITIES = textwrap.dedent(
    """
    import json, os, pickle, queue, sys, threading
    try:
        from tqdm import tqdm
    except ImportError:  # Modalities needs tqdm; without it the baseline only gets faster
        tqdm = lambda items, **kwargs: items
    src, dst = sys.argv[1], sys.argv[2]
    with open(src, "r") as f:
        total_chars = f.seek(0, os.SEEK_END)
    lines, index, errors = queue.Queue(), [], []
    def reader():
        with open(src, "r") as f:
            while not errors:
                cursor = f.tell()
                line = f.readline()
                if f.tell() == total_chars:
                    lines.put((cursor, line))
                    break
                lines.put((cursor, line[:-1]))
        lines.put(None)
    def indexer():
        def queued():
            while (item := lines.get()) is not None:
                yield item
        for cursor, line in tqdm(queued(), desc="Processed Lines"):
            if errors:
                return
            try:
                json.loads(line)
                index.append((cursor, len(line)))
            except Exception as err:
                errors.append(err)
    threads = [threading.Thread(target=reader), threading.Thread(target=indexer)]
    for t in threads: t.start()
    for t in threads: t.join()
    with open(dst, "wb") as out:
        pickle.dump(index, out)
    """
)

# Tokenize-only baselines, run in a fresh process with the thread count fixed in the environment.
BASELINE = textwrap.dedent(
    """
    import json, sys, time
    which, corpus, tok_path, threads = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    with open(corpus, encoding="utf-8") as f:
        texts = [json.loads(line)["raw_content"] for line in f]
    if which == "tokenizers":
        from tokenizers import Tokenizer
        tok = Tokenizer.from_file(tok_path)
        t0 = time.perf_counter()
        n = 0
        for i in range(0, len(texts), 1024):
            n += sum(len(e.ids) for e in tok.encode_batch(texts[i:i + 1024]))
    else:
        from fastlm.tokenizer import tiktoken_encoding
        enc = tiktoken_encoding(tok_path)
        t0 = time.perf_counter()
        n = sum(len(ids) for ids in enc.encode_ordinary_batch(texts, num_threads=threads))
    dt = time.perf_counter() - t0
    print(json.dumps({"tokens": n + len(texts), "seconds": dt}))
    """
)


def fastlm_cmd() -> list[str]:
    search = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    exe = shutil.which("fastlm", path=search)
    return [exe] if exe else [sys.executable, "-m", "fastlm"]


def baseline(which: str, corpus) -> dict:
    env = dict(os.environ, RAYON_NUM_THREADS=str(THREADS), TOKENIZERS_PARALLELISM="true")
    out = subprocess.run([sys.executable, "-c", BASELINE, which, str(corpus), str(GPT2 / "tokenizer.json"),
                          str(THREADS)], capture_output=True, text=True, env=env, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def fastlm_pack(corpus, dst) -> dict:
    from fastlm.pack import PackJob, pack

    job = PackJob(src_path=corpus, dst_path=dst, tokenizer_path=GPT2, jq_pattern=".raw_content",
                  num_cpus=THREADS, file_existence_policy="override")
    return pack(job, show_progress=False)


def test_create_raw_index(corpus_200mb, tmp_path):
    """The whole command as a user types it: default thread count (every usable CPU), start-up included."""
    from fastlm import usable_cpus

    idx = tmp_path / "x.idx"
    cmd = fastlm_cmd() + ["data", "create_raw_index", "--file_existence_policy", "override",
                          "--index_path", str(idx), str(corpus_200mb)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)  # warm the page cache
    # fastlm, wc -l and a bare Python take turns (best of 15 each): all see the same moments of a busy machine
    wc_cmd = ["wc", "-l", str(corpus_200mb)]
    python_cmd = [sys.executable, "-c", "pass"]
    fast, wc, start_up = float("inf"), float("inf"), float("inf")
    for _ in range(15):
        fast, wc, start_up = min(fast, wall(cmd)), min(wc, wall(wc_cmd)), min(start_up, wall(python_cmd))
    native = native_index_seconds(corpus_200mb, tmp_path / "native.idx")
    py = wall([sys.executable, "-c", PY_SCAN, str(corpus_200mb), str(tmp_path / "py.idx")], repeat=3)
    py_mod = wall([sys.executable, "-c", PY_SCAN_MODALITIES, str(corpus_200mb), str(tmp_path / "pym.idx")])
    # the baselines really ran: the lean loop's index equals fastlm's; Modalities' has the same offsets
    ours = pickle.loads(idx.read_bytes())
    assert pickle.loads((tmp_path / "py.idx").read_bytes()) == ours
    assert [offset for offset, _ in pickle.loads((tmp_path / "pym.idx").read_bytes())] == [o for o, _ in ours]
    mb = corpus_200mb.stat().st_size / 1e6
    name = f"create_raw_index {mb:.0f} MB, {usable_cpus()} threads (whole command)"
    record(name, fast, "s", "Modalities' IndexGenerator scan (text mode, tell() per line, thread + queue)",
           py_mod, higher_is_better=False, bar=20)
    record(name, fast, "s", "python scan (lean loop)", py, higher_is_better=False, bar=20,
           python_start_up_s=start_up, native_index_s=native)
    record(name, fast, "s", "wc -l", wc, higher_is_better=False, bar=1 / 3)
    # Where the whole command's time goes, against what a given ratio to the lean loop allows.
    print(f"  breakdown: Python start-up {start_up * 1e3:.1f} ms + imports and arguments "
          f"{max(0.0, fast - start_up - native) * 1e3:.1f} ms + native index (map, scan, validate, write) "
          f"{native * 1e3:.1f} ms = {fast * 1e3:.1f} ms; 20x the lean loop allows {py / 20 * 1e3:.1f} ms, "
          f"{py / 20 / wc:.2f}x wc -l")


def native_index_seconds(corpus, dst, repeat: int = 5) -> float:
    """Best seconds of the native indexer alone, in this process (no start-up): what the command adds to
    Python's start-up and its own imports."""
    from fastlm import _C, usable_cpus

    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        _C.build_raw_index(str(corpus), usable_cpus(), False, None, out_path=str(dst), return_arrays=False)
        best = min(best, time.perf_counter() - t0)
    return best


def test_pack_200mb(benchmark, corpus_200mb, tmp_path):
    fastlm_pack(corpus_200mb, tmp_path / "warm.pbin")  # builds nothing lasting; warms the page cache
    summary = benchmark.pedantic(fastlm_pack, args=(corpus_200mb, tmp_path / "x.pbin"), rounds=1,
                                 iterations=1)
    # the whole job (tokenizer load, indexing, JSON, BPE, writing) against tokenize-only baselines
    rate = summary["tokens"] / summary["seconds"]
    print(f"\nfastlm pack: {summary['tokens']:,} tokens in {summary['seconds']:.2f} s "
          f"({summary['setup_seconds']:.2f} s tokenizer and index), {summary['tokenizer']}")
    record("pack 200 MB, GPT-2, 2 threads", rate / 1e6, "M tokens/s", "Modalities (quoted reference figure)",
           1.1, bar=8, measured_baseline=False)
    tk = baseline("tiktoken", corpus_200mb)
    record("pack 200 MB, GPT-2, 2 threads", rate / 1e6, "M tokens/s", "tiktoken tokenize-only",
           tk["tokens"] / tk["seconds"] / 1e6, bar=1.5)
    hf = baseline("tokenizers", corpus_200mb)
    assert hf["tokens"] == summary["tokens"] == tk["tokens"]  # all three saw the same corpus
    record("pack 200 MB, GPT-2, 2 threads", rate / 1e6, "M tokens/s", "HF tokenizers encode_batch",
           hf["tokens"] / hf["seconds"] / 1e6)


@pytest.mark.parametrize("split", ["train", "test"])
def test_pack_unrepeated(benchmark, split, tmp_path):
    """The tutorial's files as they are: the word cache helps less than on a repeated corpus. Packing time
    (JSON, BPE, writing) against encode_batch time; neither counts loading its tokenizer."""
    src = REDPAJAMA / f"redpajama_v2_samples_512_{split}.jsonl"
    fastlm_pack(src, tmp_path / "warm.pbin")
    summary = benchmark.pedantic(fastlm_pack, args=(src, tmp_path / "x.pbin"), rounds=3, iterations=1)
    hf = baseline("tokenizers", src)
    name = f"pack {split} split ({src.stat().st_size / 1e6:.1f} MB), 2 threads"
    record(name, summary["tokens_per_s"] / 1e6, "M tokens/s", "HF tokenizers encode_batch",
           hf["tokens"] / hf["seconds"] / 1e6)
