"""Tests of fastlm._C.ByteLevelBPE: id-for-id equality with HuggingFace `tokenizers`."""
from __future__ import annotations

import json
import os

import pytest

from tokenizers import Regex, Tokenizer, pre_tokenizers

from fastlm._C import ByteLevelBPE
from fastlm.tokenizer import bytes_to_unicode

from conftest import GPT2, REDPAJAMA as _REDPAJAMA_DIR

GPT2_JSON = str(GPT2 / "tokenizer.json")
REDPAJAMA = [str(_REDPAJAMA_DIR / f"redpajama_v2_samples_512_{s}.jsonl") for s in ("train", "test")]
HERE = os.path.dirname(os.path.abspath(__file__))
HARD_UNICODE = os.path.join(HERE, "data", "hard_unicode.txt")
EOD = "<|endoftext|>"

WHITESPACE_KINDS = ("\t\n\x0b\x0c\r \x85\xa0\u1680" + "".join(chr(c) for c in range(0x2000, 0x200B))
                    + "\u2028\u2029\u202f\u205f\u3000")
ZERO_WIDTH = "\u200b\u200c\u200d\ufeff"


def from_tokenizer_json(tj: dict) -> ByteLevelBPE:
    m = tj["model"]
    return ByteLevelBPE(m["vocab"], m["merges"], [(a["content"], a["id"]) for a in tj["added_tokens"]],
                        bool(m.get("ignore_merges", False)))


@pytest.fixture(scope="module")
def gpt2_json() -> dict:
    if not os.path.exists(GPT2_JSON):
        pytest.skip("GPT-2 tokenizer.json not available")
    with open(GPT2_JSON, encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def hf(gpt2_json) -> Tokenizer:
    return Tokenizer.from_str(json.dumps(gpt2_json))


@pytest.fixture(scope="module")
def bpe(gpt2_json) -> ByteLevelBPE:
    return from_tokenizer_json(gpt2_json)


def hf_ids(hf: Tokenizer, texts: list[str]) -> list[list[int]]:
    return [e.ids for e in hf.encode_batch(texts)]


def assert_same(bpe: ByteLevelBPE, hf: Tokenizer, texts: list[str]) -> None:
    want = hf_ids(hf, texts)
    got = bpe.encode_batch(texts, 2)
    for i, (g, w) in enumerate(zip(got, want)):
        if g != w:
            k = next((j for j, (a, b) in enumerate(zip(g, w)) if a != b), min(len(g), len(w)))
            raise AssertionError(f"text #{i} {texts[i][:80]!r}: first difference at token {k}: "
                                 f"ours {g[max(0, k - 3):k + 3]} vs tokenizers {w[max(0, k - 3):k + 3]}")
    assert len(got) == len(want)


def load_docs(path: str) -> list[str]:
    if not os.path.exists(path):
        pytest.skip(f"{path} not available")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["raw_content"] for line in f]


# ---- real data -----------------------------------------------------------------------------------

@pytest.mark.parametrize("path", REDPAJAMA, ids=["train", "test"])
def test_redpajama_equal(bpe, hf, path):
    docs = load_docs(path)
    assert len(docs) == 512
    assert_same(bpe, hf, docs)
    # and with one EOD appended per document, as the packer does
    assert_same(bpe, hf, [d + EOD for d in docs[:128]])


def test_redpajama_token_count(bpe):
    docs = load_docs(REDPAJAMA[0])
    assert sum(len(x) for x in bpe.encode_batch([d + EOD for d in docs], 2)) == 786370


def test_single_encode_matches_batch(bpe, hf):
    docs = load_docs(REDPAJAMA[1])[:64]
    assert [bpe.encode(d) for d in docs] == hf_ids(hf, docs)


# ---- hand-made hard cases --------------------------------------------------------------------------

def read_hard_unicode() -> str:
    with open(HARD_UNICODE, encoding="utf-8", newline="") as f:
        return f.read()


def test_hard_unicode_file(bpe, hf):
    text = read_hard_unicode()
    for must in ["\u200d", "\U0001F1FA", "\u0301", "\u0e20", "\u05e9", "\u0627", "\u3000", "\u2029", "\u0663",
                 "\u0967", "\uff11", "\u00b2", "\u2163", "\u2019", EOD]:
        assert must in text, f"hard_unicode.txt lost {must!r}"
    assert_same(bpe, hf, [text])
    assert_same(bpe, hf, text.split("\n"))
    assert_same(bpe, hf, text.splitlines(keepends=True))


def test_every_whitespace_kind_in_context(bpe, hf):
    ws = WHITESPACE_KINDS + ZERO_WIDTH + "\x1c\x1d\x1e\x1f"
    texts = []
    tails = ["word", "!x", "123", "", " word", "'s", EOD, "\u3000a", "字"]
    for a in ws:
        for b in ws:
            for tail in tails:
                texts.append(a + b + tail)
                texts.append("x" + a + b + tail)
                texts.append("x " + a + " " + b + " " + tail)
                texts.append(a * 3 + b + " " + tail)
    assert_same(bpe, hf, texts)


def test_contractions_all_cases(bpe, hf):
    texts = []
    for suffix in ["s", "t", "re", "ve", "m", "ll", "d", "x", ""]:
        variants = {suffix, suffix.upper(), suffix.capitalize(), suffix[:1] + suffix[1:].upper()}
        for v in variants:
            for apos in ["'", "\u2019", "''", " '"]:
                for before in ["it", "IT", "", " ", "1", "!", "\n", "字"]:
                    for after in ["", " ", "a", "A", "1", "'", "!"]:
                        texts.append(before + apos + v + after)
    assert_same(bpe, hf, texts)


def test_added_token_positions(bpe, hf):
    texts = [EOD, EOD * 3, EOD + "x", "x" + EOD, " " + EOD + " ", "a" + EOD + "b" + EOD + "c", "<|endoftext|",
             "<|endoftext", "|endoftext|>", "<|endoftext|<|endoftext|>>", "<<|endoftext|>", "<|<|endoftext|>",
             "\n\n" + EOD + "\n\n", "  " + EOD, EOD + "  ", "'" + EOD + "s", "1" + EOD + "2",
             "<|endoftext|>" * 50, "<" * 20 + EOD + ">" * 20, "\u3000" + EOD + "\u3000"]
    assert_same(bpe, hf, texts)
    assert bpe.encode(EOD) == [50256]


@pytest.mark.parametrize("unit", ["a", "7", "!", "é", "字", "😀", "ab1", " a", "\u0663"])
def test_very_long_words(bpe, hf, unit):
    n = 100_000 // len(unit)
    assert_same(bpe, hf, [unit * n, "x " + unit * n + " y", unit * 70, unit * 333])


def test_long_random_word_uses_heap_path(bpe, hf):
    import random

    rng = random.Random(1234)
    letters = "etaoinshrdlucmfwypvbgkqjxz" + "ETAOIN" + "éüßø"
    texts = ["".join(rng.choice(letters) for _ in range(n))
             for n in [10, 47, 48, 49, 50, 64, 65, 100, 257, 1000, 5000, 60000]]
    punct = "!\"#$%&()*+,-./:;<=>?@[\\]^_`{|}~"
    texts += ["".join(rng.choice(punct) for _ in range(n)) for n in [49, 100, 3000]]
    texts += ["".join(rng.choice("0123456789") for _ in range(n)) for n in [49, 100, 3000]]
    assert_same(bpe, hf, texts)


# ---- every code point --------------------------------------------------------------------------------

def all_code_points() -> list[int]:
    return [c for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF]


def test_class_table_matches_tokenizers_regex():
    """The compiled class table equals tokenizers' own \\p{L} / \\p{N} / \\s for every code point."""
    cps = all_code_points()
    ours = ByteLevelBPE._cp_classes(0, 0x110000)
    for cls, pattern in [(1, r"\p{L}"), (2, r"\p{N}"), (3, r"\s")]:
        split = pre_tokenizers.Split(Regex(pattern), behavior="removed")
        member = bytearray(0x110000)
        chunk = 1 << 16
        for i in range(0, len(cps), chunk):
            part = cps[i:i + chunk]
            for c in part:
                member[c] = 1
            for _, (a, b) in split.pre_tokenize_str("".join(map(chr, part))):
                for k in range(a, b):
                    member[part[k]] = 0
        bad = [c for c in cps if member[c] != (ours[c] == cls)]
        assert not bad, f"class {pattern} differs for {len(bad)} code points, e.g. " + \
            ", ".join(f"U+{c:04X}" for c in bad[:10])


def test_every_code_point_pretokenized_in_context():
    """Every code point, in contexts that separate its 4 possible classes, splits like tokenizers'
    ByteLevel pre-tokenizer ("a"+c joins iff letter, "1"+c iff number, "!"+c iff other, else space)."""
    bl = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    b2u = bytes_to_unicode()
    cps = all_code_points()
    chunk = 128
    for i in range(0, len(cps), chunk):
        s = "".join("a" + chr(c) + "1" + chr(c) + "!" + chr(c) for c in cps[i:i + chunk])
        want = [p for p, _ in bl.pre_tokenize_str(s)]
        got = ["".join(b2u[b] for b in p.encode()) for p in ByteLevelBPE._pretokenize(s)]
        assert got == want, f"pieces differ in block starting at U+{cps[i]:04X}"


def test_every_bmp_code_point_encodes_in_context(bpe, hf):
    """Token ids for every BMP code point (and every 16th astral one) in context."""
    cps = [c for c in all_code_points() if c < 0x10000 or c % 16 == 0]
    texts = ["".join("a" + chr(c) + " " + chr(c) + "1" + chr(c) for c in cps[i:i + 16])
             for i in range(0, len(cps), 16)]
    assert_same(bpe, hf, texts)


# ---- fuzz ----------------------------------------------------------------------------------------------

def test_fuzz_against_tokenizers(bpe, hf):
    hyp = pytest.importorskip("hypothesis")
    from hypothesis import strategies as st

    fragments = st.sampled_from(["'s", "'S", "'t", "'re", "'RE", "'ll", "'Ll", "'ve", "'m", "'d", "\u2019s",
                                 EOD, "<|endoftext|", " ", "  ", "\n", "\r\n", "\t", "\u00a0", "\u3000",
                                 "\u200d", "\ufe0f", "\U0001F468\u200d\U0001F469", "\U0001F1FA\U0001F1F8",
                                 "123", "\u0661\u0662", "the", " the", "ing"])
    chars = st.one_of(
        st.characters(min_codepoint=0, max_codepoint=0x7F),
        st.sampled_from(WHITESPACE_KINDS + ZERO_WIDTH + "\x1c\x1f"),
        st.characters(categories=["Lu", "Ll", "Lo", "Lm", "Lt", "Mn", "Mc"]),
        st.characters(categories=["Nd", "Nl", "No"]),
        st.characters(codec="utf-8"),  # all of Unicode except surrogates
    )
    texts = st.lists(st.one_of(chars, fragments), max_size=60).map("".join)

    @hyp.settings(max_examples=400, deadline=None, derandomize=True)
    @hyp.given(texts)
    def check(text):
        assert bpe.encode(text) == hf.encode(text).ids, repr(text)
        assert (["".join(bytes_to_unicode()[b] for b in p.encode())
                 for p in ByteLevelBPE._pretokenize(text)]
                == [p for p, _ in
                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True).pre_tokenize_str(text)])

    check()


# ---- threads -------------------------------------------------------------------------------------------

def test_thread_safety(bpe):
    docs = load_docs(REDPAJAMA[1])
    docs = docs + [d + EOD for d in docs] + [read_hard_unicode()] * 8 + ["a" * 50_000, ""]
    seq = [bpe.encode(d) for d in docs]
    for nt in (2, 4):
        assert bpe.encode_batch(docs, nt) == seq
    assert bpe.encode_batch([], 4) == []


def test_python_threads_share_one_instance(bpe):
    from concurrent.futures import ThreadPoolExecutor

    docs = load_docs(REDPAJAMA[0])[:128]
    seq = [bpe.encode(d) for d in docs]
    with ThreadPoolExecutor(4) as ex:
        assert list(ex.map(bpe.encode, docs)) == seq


# ---- small synthetic models: merges format, ignore_merges, added tokens, errors ------------------------

def alphabet_vocab() -> dict[str, int]:
    return {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}


def make_json(vocab, merges, added=(), ignore_merges=False) -> dict:
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": c, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for c, i in added],
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                          "use_regex": True},
        "post_processor": None, "decoder": None,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": ignore_merges, "vocab": vocab, "merges": merges},
    }


def test_merges_string_and_pair_forms(gpt2_json, bpe):
    m = gpt2_json["model"]
    pairs = [mg.split(" ") if isinstance(mg, str) else mg for mg in m["merges"]]
    strings = [" ".join(p) for p in pairs]
    text = read_hard_unicode()
    a = ByteLevelBPE(m["vocab"], pairs, [(EOD, 50256)]).encode(text)
    b = ByteLevelBPE(m["vocab"], strings, [(EOD, 50256)]).encode(text)
    assert a == b == bpe.encode(text)
    assert bpe.max_id == 50256


@pytest.mark.parametrize("ignore_merges", [False, True])
def test_non_self_encoding_token_and_ignore_merges(ignore_merges):
    # "abc" is in the vocab but BPE of "abc" gives [a, bc] (b c merges first, (a, bc) has no merge).
    vocab = alphabet_vocab()
    n = len(vocab)
    vocab.update({"bc": n, "ab": n + 1, "abc": n + 2, "cc": n + 3, "ccc": n + 4, "Ġa": n + 5})
    merges = [["b", "c"], ["a", "b"], ["ab", "c"], ["c", "c"], ["cc", "c"], ["Ġ", "a"], ["a", "b"]]
    tj = make_json(vocab, merges, ignore_merges=ignore_merges)
    hf = Tokenizer.from_str(json.dumps(tj))
    ours = from_tokenizer_json(tj)
    texts = ["abc", " abc", "abcabc", "ccc", "cccc", "ccccc", "abcc", "ab", "a b c", "cab"]
    for t in texts:
        assert ours.encode(t) == hf.encode(t).ids, t
    assert (ours.encode("abc") == [n + 2]) == ignore_merges


def test_overlapping_added_tokens_leftmost_longest():
    vocab = alphabet_vocab()
    n = len(vocab)
    added = [("<a>", n), ("<a>b", n + 1), ("a>b", n + 2), ("<", n + 3), ("xyz", n + 4), ("yz", n + 5),
             ("é", n + 6), ("\u3000\u3000", n + 7)]
    tj = make_json(vocab, [], added)
    hf = Tokenizer.from_str(json.dumps(tj))
    # tokenizers ignores a JSON id when the content is already a model vocab string ("<", "é" here:
    # they get the ids of the byte-level vocab strings) and renumbers the rest; the authoritative
    # ids come from get_added_tokens_decoder().
    real = {t.content: i for i, t in hf.get_added_tokens_decoder().items()}
    assert real["<"] == vocab["<"] and real["é"] == vocab["é"]
    ours = ByteLevelBPE(vocab, [], list(real.items()))
    texts = ["<a>b", "<a>bc", "<a>", "x<a>b<a>y", "a>b", "<<a>b", "xyz", "wxyzyz", "café",
             "\u3000\u3000\u3000 a", "<", "<<", "ab<a", "<a>b<a>b<a>"]
    for t in texts:
        assert ours.encode(t) == hf.encode(t).ids, t
    assert ours.max_id == max(real.values())


def test_constructor_errors():
    vocab = alphabet_vocab()
    n = len(vocab)
    vocab["ab"] = n
    with pytest.raises(ValueError, match="not in the vocab"):
        ByteLevelBPE(vocab, [["a", "zz"]], [])
    with pytest.raises(ValueError, match="not in the vocab"):
        ByteLevelBPE(vocab, [["a", "c"]], [])  # merged token "ac" missing
    with pytest.raises(ValueError, match="two tokens"):
        ByteLevelBPE(vocab, ["a b c"], [])
    bad = dict(vocab)
    del bad["Ġ"]
    with pytest.raises(ValueError, match="byte 32"):
        ByteLevelBPE(bad, [], [])
    dup = dict(vocab)
    dup["xy"] = n
    with pytest.raises(ValueError, match="duplicate vocab id"):
        ByteLevelBPE(dup, [], [])
    ok = ByteLevelBPE(vocab, [["a", "b"]], [])
    assert ok.encode("ab") == [n]
