"""Pickled index writer/parser (fastlm._C) against Python's pickle, .pbin reading/writing, inspect and merge.

pickle is the reference here (tests only): the library never unpickles.
"""

import json
import os
import pickle
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastlm import _C
from fastlm.data.pbin import PackedFile, read_raw_index, write_packed, write_raw_index
from fastlm.data.tools import inspect_packed, merge_packed

from conftest import GPT2 as _GPT2_DIR, MODALITIES as GOLDEN
GPT2 = _GPT2_DIR / "tokenizer.json"
EOD = 50256
MAGNITUDES = [1, 256, 65536, 2**31, 2**64]  # exclusive bounds: BININT1 / BININT2 / BININT / LONG1 ranges


def random_pairs(rng, n, bound=None):
    """Two uint64 arrays; each element gets its own magnitude class unless `bound` is given."""
    def column():
        bounds = (np.array(MAGNITUDES, dtype=object)[rng.integers(0, len(MAGNITUDES), n)] if bound is None
                  else [bound] * n)
        return np.array([int(rng.integers(0, b, dtype=np.uint64)) if b > 1 else 0 for b in bounds],
                        dtype=np.uint64)
    return column(), column()


def reference_pickle(first, second):
    # Fresh tuple objects (no constant folding), like Modalities' index list.
    return pickle.dumps([(int(a), int(b)) for a, b in zip(first.tolist(), second.tolist())], protocol=4)


# ---------------------------------------------------------------------------------------------- writer


@pytest.mark.parametrize("n", [0, 1, 2, 3, 999, 1000, 1001, 1002, 2000, 2001, 5432])
@pytest.mark.parametrize("bound", MAGNITUDES + [None])
def test_pickle_pairs_matches_pickle_dumps(n, bound):
    rng = np.random.default_rng(n)
    first, second = random_pairs(rng, n, bound)
    assert _C.pickle_pairs(first, second) == reference_pickle(first, second)


def test_pickle_pairs_matches_pickle_dumps_many_frames():
    rng = np.random.default_rng(7)
    for n in [int(x) for x in rng.integers(0, 300_000, 8)] + [300_000]:
        first, second = random_pairs(rng, n, bound=2**64 if n % 2 else None)
        ref = reference_pickle(first, second)
        assert len(ref) > 64 * 1024 or n < 5000
        assert _C.pickle_pairs(first, second) == ref, n


def test_pickle_pairs_frame_boundaries_everywhere():
    # Same-size items shift where the 64 KiB frame limit falls: between the two ints of a tuple, right
    # after a MARK, after an APPENDS. Sweep item sizes 4..20 bytes over a few frames.
    for bound_a in [256, 65536, 2**31, 2**64]:
        for bound_b in [256, 65536, 2**31, 2**40, 2**64]:
            rng = np.random.default_rng(bound_a % 1000 + bound_b % 997)
            first = rng.integers(bound_a // 2 if bound_a > 256 else 0, bound_a, 20_000, dtype=np.uint64)
            second = rng.integers(bound_b // 2 if bound_b > 256 else 0, bound_b, 20_000, dtype=np.uint64)
            for n in (6553, 6554, 9000, 20_000):
                assert _C.pickle_pairs(first[:n], second[:n]) == reference_pickle(first[:n], second[:n])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1)), max_size=2500))
def test_pickle_pairs_property(pairs):
    first = np.array([a for a, _ in pairs], dtype=np.uint64)
    second = np.array([b for _, b in pairs], dtype=np.uint64)
    ref = pickle.dumps(pairs, protocol=4)
    assert _C.pickle_pairs(first, second) == ref
    f, s = _C.parse_pairs(ref)
    assert f.tolist() == first.tolist() and s.tolist() == second.tolist()


def test_pickle_pairs_accepts_signed_and_small_dtypes_but_not_negative():
    assert _C.pickle_pairs(np.array([1, 300], np.int32), np.array([2, 4], np.uint8)) == pickle.dumps(
        [(1, 2), (300, 4)], protocol=4
    )
    with pytest.raises(ValueError, match="negative"):
        _C.pickle_pairs(np.array([1, -1]), np.array([2, 3]))
    with pytest.raises(ValueError, match="length"):
        _C.pickle_pairs(np.array([1, 2]), np.array([2]))
    with pytest.raises(TypeError):
        _C.pickle_pairs(np.array([1.5]), np.array([2.0]))


@pytest.mark.parametrize("name", ["lorem_ipsum", "lorem_ipsum_long"])
def test_golden_indexes_roundtrip_bytes(name):
    idx = (GOLDEN / f"{name}.idx").read_bytes()
    assert _C.pickle_pairs(*_C.parse_pairs(idx)) == idx
    pbin = (GOLDEN / f"{name}.pbin").read_bytes()
    data_len = struct.unpack("<Q", pbin[:8])[0]
    segment = pbin[12 + data_len :]
    first, second = _C.parse_pairs(segment)
    assert list(zip(first.tolist(), second.tolist())) == pickle.loads(segment)
    assert _C.pickle_pairs(first, second) == segment


# ---------------------------------------------------------------------------------------------- parser


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_parse_pairs_all_protocols_with_memo_references(protocol):
    shared = (5, 70000)
    # > 256 memo entries: LONG_BINPUT / LONG_BINGET at protocol 2, 3
    distinct = [(i, i * 3) for i in range(300)]
    pairs = [shared, *distinct, shared, distinct[280], distinct[3], (2**63 + 1, 0), shared]
    data = pickle.dumps(pairs, protocol=protocol)
    f, s = _C.parse_pairs(data)
    assert list(zip(f.tolist(), s.tolist())) == pickle.loads(data)
    if protocol < 4:
        assert b"j" in data  # LONG_BINGET present


def test_parse_pairs_inputs_and_tuple_with_mark():
    data = b"\x80\x02]q\x00(K\x01M\x00\x01tq\x01a."  # [(1, 256)] built with MARK ... TUPLE
    assert pickle.loads(data) == [(1, 256)]
    for buf in (data, memoryview(data), np.frombuffer(data, np.uint8), bytearray(data)):
        f, s = _C.parse_pairs(buf)
        assert f.dtype == np.uint64 and f.tolist() == [1] and s.tolist() == [256]
    # sparse BINPUT keys and a BINGET of one of them
    data = b"\x80\x02]q\x07(K\x01K\x02\x86q\x09h\x09e."
    assert pickle.loads(data) == [(1, 2), (1, 2)]
    assert _C.parse_pairs(data)[0].tolist() == [1, 1]
    # LONG1 with leading zero bytes still fits
    data = b"\x80\x02]q\x00(\x8a\x0a" + (5).to_bytes(10, "little") + b"K\x00\x86e."
    assert pickle.loads(data) == [(5, 0)]
    assert _C.parse_pairs(data)[0].tolist() == [5]


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


BAD_PICKLES = {
    "reduce_os_system_p4": pickle.dumps(_Evil(), protocol=4),
    "reduce_os_system_p2": pickle.dumps(_Evil(), protocol=2),
    "evil_inside_list": pickle.dumps([(1, 2), _Evil()], protocol=4),
    "dict": pickle.dumps({1: 2}, protocol=4),
    "negative_binint": pickle.dumps([(1, 2), (-1, 5)], protocol=4),
    "negative_long1": pickle.dumps([(-(2**40), 5)], protocol=4),
    "huge_int": pickle.dumps([(2**64, 5)], protocol=4),
    "triple": pickle.dumps([(1, 2, 3)], protocol=4),
    "single": pickle.dumps([(1,)], protocol=4),
    "str_in_pair": pickle.dumps([(1, "a")], protocol=4),
    "float_in_pair": pickle.dumps([(1.0, 2)], protocol=4),
    "list_of_ints": pickle.dumps([1, 2], protocol=4),
    "list_of_lists": pickle.dumps([[1, 2]], protocol=4),
    "nested_pair": pickle.dumps([((1, 2), 3)], protocol=4),
    "tuple_root": pickle.dumps(((1, 2),), protocol=4),
    "protocol_0": pickle.dumps([(1, 2)], protocol=0),
    "protocol_1": pickle.dumps([(1, 2)], protocol=1),
    "empty": b"",
    "trailing_bytes": pickle.dumps([(1, 2)], protocol=4) + b"\x00",
    "two_pickles": pickle.dumps([(1, 2)], protocol=4) * 2,
    "no_stop": pickle.dumps([(1, 2)], protocol=4)[:-1],
    "frame_too_long": b"\x80\x04\x95\xff\x00\x00\x00\x00\x00\x00\x00]\x94.",
    "binget_unknown": b"\x80\x02]q\x00h\x05a.",
    "binget_list_itself": b"\x80\x02]q\x00h\x00a.",
    "appends_without_mark": b"\x80\x02]q\x00K\x01K\x02\x86e.",
}


@pytest.mark.parametrize("name", sorted(BAD_PICKLES))
def test_parse_pairs_rejects(name):
    with pytest.raises(ValueError, match="at byte"):
        _C.parse_pairs(BAD_PICKLES[name])


def test_parse_pairs_error_messages_say_what_and_where():
    with pytest.raises(ValueError, match=r"at byte 11 of \d+: found opcode SHORT_BINUNICODE"):
        _C.parse_pairs(BAD_PICKLES["reduce_os_system_p4"])
    with pytest.raises(ValueError, match=r"at byte 2 of \d+: found opcode GLOBAL \(0x63\)"):
        _C.parse_pairs(BAD_PICKLES["reduce_os_system_p2"])
    with pytest.raises(ValueError, match="negative int -1"):
        _C.parse_pairs(BAD_PICKLES["negative_binint"])
    with pytest.raises(ValueError, match="does not fit in 64 bits"):
        _C.parse_pairs(BAD_PICKLES["huge_int"])
    with pytest.raises(ValueError, match="trailing bytes"):
        _C.parse_pairs(BAD_PICKLES["trailing_bytes"])


def test_parse_pairs_rejects_every_truncation():
    data = pickle.dumps([(i, i * 1000) for i in range(1500)], protocol=4)
    for cut in list(range(len(data) - 1)) if len(data) < 3000 else range(0, len(data) - 1, 7):
        with pytest.raises(ValueError):
            _C.parse_pairs(data[:cut])


def test_parse_pairs_rejects_opcode_straddling_frames():
    # Shrink the frame by one byte so that STOP falls outside it ... still valid (STOP unframed)
    body = b"]\x94K\x01K\x02\x86\x94a"
    ok = b"\x80\x04\x95" + struct.pack("<Q", len(body)) + body + b"."
    assert _C.parse_pairs(ok)[0].tolist() == [1]
    # ... but a frame ending inside BININT2's argument is an error, like Python's own unframer
    body = b"]\x94M\x01\x01K\x02\x86\x94a."
    bad = b"\x80\x04\x95" + struct.pack("<Q", 4) + body
    with pytest.raises(ValueError, match="past the end of its frame"):
        _C.parse_pairs(bad)


# ---------------------------------------------------------------------------------------------- raw index


def test_raw_index_read_write(tmp_path):
    offsets, lengths = read_raw_index(GOLDEN / "lorem_ipsum.idx")
    assert (list(zip(offsets.tolist(), lengths.tolist()))
            == pickle.loads((GOLDEN / "lorem_ipsum.idx").read_bytes()))
    write_raw_index(tmp_path / "x.idx", offsets, lengths)
    assert (tmp_path / "x.idx").read_bytes() == (GOLDEN / "lorem_ipsum.idx").read_bytes()
    (tmp_path / "bad.idx").write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(ValueError, match=r"bad\.idx.*HINT: .*create_raw_index"):
        read_raw_index(tmp_path / "bad.idx")
    with pytest.raises(FileNotFoundError, match="create_raw_index"):
        read_raw_index(tmp_path / "missing.idx")


# ---------------------------------------------------------------------------------------------- PackedFile


def golden_documents(name):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(GPT2))
    with open(GOLDEN / f"{name}.jsonl") as f:
        return [tok.encode(json.loads(line)["text"]).ids + [EOD] for line in f]


def pbin_bytes(docs, token_size, header_relative=False):
    """A .pbin built by hand with pickle (the reference writer for these tests)."""
    dtype = {1: "<u1", 2: "<u2", 4: "<u4"}[token_size]
    data = b"".join(np.asarray(d, dtype).tobytes() for d in docs)
    index, pos = [], 12 if header_relative else 0
    for d in docs:
        index.append((pos, len(d) * token_size))
        pos += len(d) * token_size
    return struct.pack("<QI", len(data), token_size) + data + pickle.dumps(index, protocol=4)


@pytest.mark.parametrize("name,count", [("lorem_ipsum", 12), ("lorem_ipsum_long", 500)])
def test_packed_file_golden(name, count):
    p = PackedFile(GOLDEN / f"{name}.pbin")
    docs = golden_documents(name)
    assert ((p.num_documents, p.token_size, p.dtype, p.offsets_convention)
            == (count, 2, np.dtype("<u2"), "data-relative"))
    assert p.num_tokens == sum(map(len, docs)) == len(p.tokens)
    for i, d in enumerate(docs):
        assert p.document(i).tolist() == d
    assert p.document(-1).tolist() == docs[-1]
    with pytest.raises(IndexError):
        p.document(count)
    assert p.doc_token_offsets.dtype == np.int64 and p.doc_token_lengths.dtype == np.int64


def test_write_packed_is_byte_identical_to_modalities(tmp_path):
    for name in ["lorem_ipsum", "lorem_ipsum_long"]:
        assert write_packed(tmp_path / f"{name}.pbin", iter(golden_documents(name)), 2) > 0
        assert (tmp_path / f"{name}.pbin").read_bytes() == (GOLDEN / f"{name}.pbin").read_bytes()


def test_packed_file_header_relative(tmp_path):
    docs = golden_documents("lorem_ipsum")
    (tmp_path / "old.pbin").write_bytes(pbin_bytes(docs, 2, header_relative=True))
    p = PackedFile(tmp_path / "old.pbin")
    assert p.offsets_convention == "header-relative"
    assert [p.document(i).tolist() for i in range(len(docs))] == docs


def test_packed_file_data_relative_document_at_byte_12(tmp_path):
    # The second document of a data-relative file starts at byte 12: not to be mistaken for the old
    # convention.
    docs = [[1, 2, 3, 4, 5, 9], [6, 7, 9], [9]]
    (tmp_path / "a.pbin").write_bytes(pbin_bytes(docs, 2))
    p = PackedFile(tmp_path / "a.pbin")
    assert p.offsets_convention == "data-relative"
    assert [p.document(i).tolist() for i in range(3)] == docs


def test_packed_file_empty(tmp_path):
    assert write_packed(tmp_path / "e.pbin", [], 4) == 0
    p = PackedFile(tmp_path / "e.pbin")
    assert (p.num_documents, p.num_tokens, p.token_size, len(p.tokens)) == (0, 0, 4, 0)
    assert (tmp_path / "e.pbin").read_bytes() == struct.pack("<QI", 0, 4) + pickle.dumps([], protocol=4)


def corrupt(tmp_path, name, data):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_packed_file_rejects_corrupt_files(tmp_path):
    good = (GOLDEN / "lorem_ipsum.pbin").read_bytes()
    data_len = struct.unpack("<Q", good[:8])[0]
    cases = {
        "tiny.pbin": (good[:7], "at least a 12-byte header"),
        "truncated_data.pbin": (good[: 12 + data_len - 10], "data segment says 15,978 bytes"),
        "truncated_index.pbin": (good[:-5], "index segment"),
        "no_index.pbin": (good[: 12 + data_len], "index segment"),
        "token_size3.pbin": (good[:8] + struct.pack("<I", 3) + good[12:], "token size of 1, 2 or 4 bytes"),
        "huge_header.pbin": (struct.pack("<Q", 2**62) + good[8:], "data segment says"),
        "odd_length.pbin": (struct.pack("<Q", data_len - 1) + good[8:], "multiple of the token size"),
        "evil_index.pbin": (good[: 12 + data_len] + pickle.dumps(_Evil(), protocol=4), "SHORT_BINUNICODE"),
        "first_offset_7.pbin": (
            good[: 12 + data_len] + pickle.dumps([(8, 10), (18, 2)], protocol=4),
            "first document at offset 0",
        ),
        "outside.pbin": (good[: 12 + data_len] + pickle.dumps([(0, 10), (10, data_len)], protocol=4),
                         "inside"),
        "half_token.pbin": (good[: 12 + data_len] + pickle.dumps([(0, 11)], protocol=4), "whole tokens"),
        "decreasing.pbin": (
            good[: 12 + data_len] + pickle.dumps([(0, 10), (20, 2), (10, 2)], protocol=4),
            "non-decreasing",
        ),
        "header_relative_overrun.pbin": (
            good[: 12 + data_len] + pickle.dumps([(12, 10), (22, data_len - 8)], protocol=4),
            "inside",
        ),
    }
    for name, (data, expected) in cases.items():
        path = corrupt(tmp_path, name, data)
        with pytest.raises(ValueError) as err:
            PackedFile(path)
            pytest.fail(f"{name} accepted")
        msg = str(err.value)
        assert name in msg and expected in msg and "HINT: re-run python -m fastlm.pack" in msg, msg


def test_packed_file_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pbin"):
        PackedFile(tmp_path / "nope.pbin")


# ---------------------------------------------------------------------------------------------- write_packed


@pytest.mark.parametrize("token_size", [1, 2, 4])
def test_write_packed_roundtrip(tmp_path, token_size):
    rng = np.random.default_rng(token_size)
    top = 256**token_size
    docs = [rng.integers(0, top, int(rng.integers(0, 50)), dtype=np.uint64) for _ in range(300)]
    docs.append(np.array([top - 1], np.int64))
    dst = tmp_path / "r.pbin"
    assert write_packed(dst, (d for d in docs), token_size) == len(docs)
    assert dst.read_bytes() == pbin_bytes([d.tolist() for d in docs], token_size)
    p = PackedFile(dst)
    assert [p.document(i).tolist() for i in range(len(docs))] == [d.tolist() for d in docs]


def test_write_packed_policy_and_atomicity(tmp_path):
    dst = tmp_path / "w.pbin"
    write_packed(dst, [[1, 2]], 1)
    with pytest.raises(FileExistsError):
        write_packed(dst, [[3]], 1)
    assert write_packed(dst, [[3]], 1, file_existence_policy="skip") is None
    assert PackedFile(dst).document(0).tolist() == [1, 2]
    assert write_packed(dst, [[3]], 1, file_existence_policy="override") == 1
    assert PackedFile(dst).document(0).tolist() == [3]
    bad = tmp_path / "bad.pbin"
    with pytest.raises(ValueError, match="outside the 1-byte range"):
        write_packed(bad, [[1], [256]], 1)
    assert not bad.exists() and list(tmp_path.iterdir()) == [dst]


# ---------------------------------------------------------------------------------------------- tools


def test_inspect_packed(tmp_path):
    report = inspect_packed(GOLDEN / "lorem_ipsum.pbin")
    for expected in ["documents:       12", "tokens:          7,989", "token size:      2 bytes",
                     "data-relative", "token 50256"]:
        assert expected in report
    assert "decoded" not in report
    text = json.loads((GOLDEN / "lorem_ipsum.jsonl").open().readline())["text"]
    for tok in (GPT2, GPT2.parent):
        report = inspect_packed(GOLDEN / "lorem_ipsum.pbin", tok, max_chars=100_000)
        assert text + "<|endoftext|>" in report
    (tmp_path / "old.pbin").write_bytes(pbin_bytes(golden_documents("lorem_ipsum"), 2, header_relative=True))
    assert "header-relative" in inspect_packed(tmp_path / "old.pbin")


def test_merge_packed(tmp_path):
    a, b = golden_documents("lorem_ipsum"), golden_documents("lorem_ipsum_long")[:40]
    (tmp_path / "a.pbin").write_bytes(pbin_bytes(a, 2, header_relative=True))
    (tmp_path / "b.pbin").write_bytes(pbin_bytes(b, 2))
    dst = tmp_path / "out" / "m.pbin"
    assert merge_packed(dst, [tmp_path / "a.pbin", tmp_path / "b.pbin", tmp_path / "a.pbin"]) == 64
    assert dst.read_bytes() == pbin_bytes(a + b + a, 2)  # data-relative, as Modalities 0.5 writes it
    with pytest.raises(FileExistsError):
        merge_packed(dst, [tmp_path / "a.pbin"])
    before = (tmp_path / "a.pbin").read_bytes()
    for policy in ("override", "skip", "error"):  # no policy lets the output replace a source
        with pytest.raises(ValueError, match=r"a\.pbin: the merged output would replace its source"):
            merge_packed(tmp_path / "a.pbin", [tmp_path / "b.pbin", tmp_path / "a.pbin"], policy)
    assert (tmp_path / "a.pbin").read_bytes() == before


def test_merge_packed_rejects_mismatches_without_leaving_output(tmp_path):
    (tmp_path / "a.pbin").write_bytes(pbin_bytes([[1, 2, 9], [3, 9]], 2))
    (tmp_path / "four.pbin").write_bytes(pbin_bytes([[1, 2, 9]], 4))
    (tmp_path / "eod7.pbin").write_bytes(pbin_bytes([[1, 2, 7]], 2))
    (tmp_path / "mixed.pbin").write_bytes(pbin_bytes([[1, 9], [1, 7]], 2))
    dst = tmp_path / "m.pbin"
    with pytest.raises(ValueError, match=r"four\.pbin \(token size 4\).*a\.pbin \(token size 2\)"):
        merge_packed(dst, [tmp_path / "a.pbin", tmp_path / "four.pbin"])
    with pytest.raises(ValueError,
                       match=r"eod7\.pbin \(end-of-document token 7\).*a\.pbin \(end-of-document token 9\)"):
        merge_packed(dst, [tmp_path / "a.pbin", tmp_path / "eod7.pbin"])
    with pytest.raises(ValueError, match=r"mixed\.pbin.*2 different last tokens"):
        merge_packed(dst, [tmp_path / "a.pbin", tmp_path / "mixed.pbin"])
    (tmp_path / "broken.pbin").write_bytes(pbin_bytes([[1, 9]], 2)[:-3])
    with pytest.raises(ValueError, match="broken.pbin"):
        merge_packed(dst, [tmp_path / "a.pbin", tmp_path / "broken.pbin"])
    assert not dst.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pbin", "broken.pbin", "eod7.pbin", "four.pbin",
                                                         "mixed.pbin"]


def test_a_missing_relative_path_says_where_it_was_looked_for(tmp_path, monkeypatch):
    from fastlm.data.pbin import PackedFile

    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=rf"data/x.pbin: packed file not found \(relative paths "
                                                rf"resolve against the working directory, {tmp_path}\)"):
        PackedFile("data/x.pbin")
    with pytest.raises(FileNotFoundError) as err:
        PackedFile(tmp_path / "x.pbin")  # absolute: no note
    assert "relative paths" not in str(err.value)


@pytest.mark.parametrize("content, looks", [(b"\x80\x04\x95" + bytes(20), "a raw index"),
                                            (b'{"text": "hello world, a jsonl line"}\n', "a JSONL file")])
def test_an_index_or_jsonl_given_as_pbin_is_named_for_what_it_is(tmp_path, content, looks):
    from fastlm.data.pbin import PackedFile

    path = tmp_path / "x.idx"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=rf"x.idx: not a packed .pbin file, this looks like {looks}"):
        PackedFile(path)
