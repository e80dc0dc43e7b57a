"""The native JSONL line scanner against Python's json module (the reference)."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastlm import _C


def extract(line: bytes, pattern: str = ".text"):
    return _C.scan_json_line(line, pattern)


@pytest.mark.parametrize(
    "value",
    [
        "",
        "plain ascii",
        "quotes \" and \\ backslash / slash",
        "controls \b\f\n\r\t and \x01\x1f",
        "NUL inside \x00 text",
        "accents éàü, CJK 漢字, emoji 😀👩‍👩‍👧 and a flag 🇩🇪",
        "\u2028\u2029 line separators",
        "x" * 100_000,
    ],
)
@pytest.mark.parametrize("ensure_ascii", [True, False])
def test_extracts_what_json_loads_gives(value, ensure_ascii):
    line = json.dumps({"id": 1, "text": value, "meta": [1, 2.5e-3, None, True, {"x": "y"}]},
                      ensure_ascii=ensure_ascii).encode()
    r = extract(line)
    assert r["fault"] == "ok", r
    assert r["text"].decode("utf-8") == value


def test_nested_path_and_last_duplicate_wins():
    line = b'{"a": {"b": "first"}, "c": 1, "a": {"b": "second", "z": [1, {"b": "no"}]}}'
    assert extract(line, ".a.b")["text"] == b"second"
    assert json.loads(line)["a"]["b"] == "second"
    # a later non-object at an intermediate key replaces the earlier object, as in jq
    r = extract(b'{"a": {"b": "x"}, "a": 3}', ".a.b")
    assert r["fault"] == "not_a_string" and "expected an object at .a, found a number" in r["message"]


def test_escaped_keys_match():
    assert extract(b'{"t\\u0065xt": "hi"}')["text"] == b"hi"


def test_surrogate_pair_escape():
    r = extract(b'{"text": "\\ud83d\\ude00 \\u00e9"}')
    assert r["fault"] == "ok" and r["text"].decode() == "😀 é"


@pytest.mark.parametrize(
    "line, fault, words",
    [
        (b'{"text": "abc"', "invalid_json", "expected ',' or '}'"),
        (b'{"text": "abc}', "invalid_json", "not closed"),
        (b'{"text": abc}', "invalid_json", "expected a value"),
        (b'{"text": "a"} trailing', "invalid_json", "after the end of the object"),
        (b'{"text": "a",}', "invalid_json", "expected a key"),
        (b'{"text": 01}', "invalid_json", "expected ',' or '}'"),
        (b'{"text": "\\x41"}', "invalid_json", "unknown escape"),
        (b'{"text": "\\u12"}', "invalid_json", "four hex digits"),
        (b'{"text": "\\ud800"}', "invalid_json", "lone high surrogate"),
        (b'{"text": "\\ud800\\u0041"}', "invalid_json", "lone high surrogate"),
        (b'{"text": "\\udc00"}', "invalid_json", "lone low surrogate"),
        (b'{"text": "a\x00b"}', "invalid_json", "raw NUL byte"),
        (b'{"text": "a\tb"}', "invalid_json", "unescaped control character"),
        (b'{"text": "\xff"}', "invalid_json", "invalid UTF-8"),
        (b'{"text": "\xc0\xaf"}', "invalid_json", "invalid UTF-8"),  # overlong '/'
        (b'{"text": "\xed\xa0\x80"}', "invalid_json", "invalid UTF-8"),  # an encoded surrogate
        (b'{"text": "\xe2\x82"}', "invalid_json", "invalid UTF-8"),  # truncated sequence
        (b'{"text": "\xf4\x90\x80\x80"}', "invalid_json", "invalid UTF-8"),  # above U+10FFFF
        (b"[1, 2]", "not_an_object", "found an array"),
        (b'"text"', "not_an_object", "found a string"),
        (b"", "invalid_json", "empty line"),
        (b'{"other": "x"}', "missing_key", "missing key .text"),
        (b'{"text": 5}', "not_a_string", "expected a string at .text, found a number"),
        (b'{"text": null}', "not_a_string", "found null"),
        (b'{"text": ["a"]}', "not_a_string", "found an array"),
        (b'{"x": ' + b"[" * 600 + b"]" * 600 + b"}", "invalid_json", "nesting deeper"),
    ],
)
def test_faults(line, fault, words):
    r = extract(line)
    assert r["fault"] == fault, r
    assert words in r["message"], r


def test_fault_column_points_at_the_problem():
    r = extract(b'{"text": "ok", "n": tru}')
    assert r["column"] == len(b'{"text": "ok", "n": ') + 1


def test_python_json_float_literals_are_accepted_where_the_text_is_not():
    """json.dumps writes NaN, Infinity and -Infinity for such floats (not JSON, but Python's json and
    Modalities' indexer read them): a document is kept when another field holds one; as the text they are
    a number, not a string; other spellings stay invalid."""
    for value in (b"NaN", b"Infinity", b"-Infinity", b"[NaN, {\"x\": -Infinity}]"):
        r = extract(b'{"score": ' + value + b', "text": "kept"}')
        assert r["fault"] == "ok" and r["text"] == b"kept", (value, r)
    r = extract(b'{"text": NaN}')
    assert r["fault"] == "not_a_string" and "found a number" in r["message"]
    for bad in (b"nan", b"Inf", b"-Inf", b"NaNa", b"+Infinity", b"-NaN"):
        assert extract(b'{"score": ' + bad + b', "text": "x"}')["fault"] == "invalid_json", bad


@pytest.mark.parametrize(
    "line,pattern,column,words",
    [
        (b'{}', ".text", 1, "missing key .text (the line's object is empty)"),
        (b'  {"txt": "a", "id": 3}', ".text", 3,
         'missing key .text (the line\'s object has keys "txt", "id")'),
        # the path stops at .meta: the keys shown are .meta's, the column is .meta's opening brace
        (b'{"meta": {"title": "x"}, "other": 1}', ".meta.text", 10, '(.meta has keys "title")'),
        (b'{"a": 1}', ".meta.text", 1, 'missing key .meta.text (the line\'s object has keys "a")'),
        # a repeated key replaces the earlier value, as in jq: the keys are the last object's
        (b'{"meta": {"a": 1}, "meta": {"b": 2}}', ".meta.text", 28, '(.meta has keys "b")'),
        (b'{' + b", ".join(b'"k%d": %d' % (i, i) for i in range(12)) + b'}', ".text", 1,
         '"k6", "k7" and 4 more)'),
        (b'{"' + "\u00e9".encode() * 30 + b'": 1}', ".text", 1, '"' + "\u00e9" * 20 + '...")'),
        (b'{"text": 5}', ".text", 10, "expected a string at .text, found a number"),
        (b'{"meta": [1]}', ".meta.text", 10, "expected an object at .meta, found an array"),
    ],
)
def test_lookup_faults_show_what_the_line_has(line, pattern, column, words):
    """A missing key names the keys of the object in which it was looked for (the usual cause is a
    jq_pattern that does not match the corpus); both lookup faults point at the object or value."""
    r = extract(line, pattern)
    assert r["column"] == column, r
    assert words in r["message"], r


@pytest.mark.parametrize("pattern", ["raw_content", ".", ".a..b", ".a[0]", ".a | .b", ""])
def test_unsupported_patterns_say_what_is_supported(pattern):
    with pytest.raises(ValueError, match="supported patterns are `.key`"):
        extract(b"{}", pattern)


json_values = st.recursive(
    # (floats include NaN and ±Infinity, which json.dumps writes as such)
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda children: (st.lists(children, max_size=4)
                      | st.dictionaries(st.text(max_size=5), children, max_size=4)),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.text(max_size=6), json_values, max_size=5), st.text(), st.booleans())
def test_random_objects_match_json(obj, text, ensure_ascii):
    obj = dict(obj)
    obj["text"] = text
    line = json.dumps(obj, ensure_ascii=ensure_ascii).encode("utf-8", "surrogatepass")
    r = extract(line)
    # json.dumps(ensure_ascii=False) may emit lone surrogates from st.text(): then the line is not UTF-8
    try:
        expected = json.loads(line.decode("utf-8"))["text"].encode("utf-8")
    except UnicodeError:
        assert r["fault"] == "invalid_json"
        return
    assert r["fault"] == "ok", r
    assert r["text"] == expected


def _utf8_ok(data: bytes) -> bool:
    try:
        data.decode("utf-8")  # Python's strict decoder: no overlongs, surrogates or code points past U+10FFFF
        return True
    except UnicodeDecodeError:
        return False


def test_utf8_validators_agree_on_every_short_sequence():
    """Every 1- and 2-byte string, and every 3- and 4-byte string that starts with a lead byte (with
    continuation bytes from a spread that covers each boundary), across the edges of the vector validators'
    blocks: the 16-byte lanes and 32-byte blocks of the AVX2 validator."""
    conts = [0x00, 0x41, 0x7F, 0x80, 0x8F, 0x90, 0x9F, 0xA0, 0xBF, 0xC0, 0xFF]
    cases = [bytes([a]) for a in range(256)] + [bytes([a, b]) for a in range(256) for b in range(256)]
    cases += [bytes([a, b, c]) for a in range(0xC0, 0x100) for b in conts for c in conts]
    cases += [bytes([a, b, c, d]) for a in range(0xF0, 0x100) for b in conts for c in conts for d in conts]
    for case in cases:
        for pad in (0, 13, 14, 15, 16, 29, 30, 31, 32):
            text = b"a" * pad + case + b"z"
            verdicts, first = _C._check_utf8(text)
            ok = _utf8_ok(text)
            assert all(v == ok for v in verdicts) and (first == len(text)) == ok, (text, verdicts, first)


@settings(max_examples=2000, deadline=None)
@given(st.text(max_size=80), st.binary(max_size=6), st.integers(0, 90))
def test_utf8_validators_agree_on_damaged_text(text, junk, at):
    data = text.encode("utf-8")
    at = min(at, len(data))
    data = data[:at] + junk + data[at:]
    verdicts, first = _C._check_utf8(data)
    ok = _utf8_ok(data)
    assert all(v == ok for v in verdicts) and (first == len(data)) == ok
    if not ok:
        with pytest.raises(UnicodeDecodeError) as err:
            data.decode("utf-8")
        assert first == err.value.start  # the same first bad byte as Python reports
