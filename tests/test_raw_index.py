"""`fastlm data create_raw_index`: byte-identical to Modalities' .idx, blank lines, BOM, CRLF, errors."""

import json
import pickle
import shutil
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastlm import _C
from fastlm.cli import main as cli

from conftest import MODALITIES, REDPAJAMA


def reference_index(data: bytes):
    """The contract, in plain Python: (offset, length without '\\n') of every non-blank line."""
    pos = 3 if data.startswith(b"\xef\xbb\xbf") else 0
    out = []
    while pos < len(data):
        end = data.find(b"\n", pos)
        end = len(data) if end < 0 else end
        line = data[pos:end]
        if line.strip(b" \t\r"):
            out.append((pos, len(line)))
        pos = end + 1
    return out


def native_index(path, **kw):
    r = _C.build_raw_index(str(path), **kw)
    return list(zip(r["offsets"].tolist(), r["lengths"].tolist())), r


@pytest.mark.parametrize("name", ["lorem_ipsum", "lorem_ipsum_long"])
def test_byte_identical_to_modalities(tmp_path, name):
    out = tmp_path / f"{name}.idx"
    assert cli(["data", "create_raw_index", "--index_path", str(out), str(MODALITIES / f"{name}.jsonl")]) == 0
    assert out.read_bytes() == (MODALITIES / f"{name}.idx").read_bytes()


@pytest.mark.parametrize("split", ["train", "test"])
@pytest.mark.parametrize("threads, chunk", [(1, 64 << 20), (2, 64 << 20), (3, 100_000), (2, 4096), (2, 1)])
def test_redpajama_matches_reference(split, threads, chunk):
    path = REDPAJAMA / f"redpajama_v2_samples_512_{split}.jsonl"
    got, r = native_index(path, num_threads=threads, chunk_bytes=chunk)
    assert got == reference_index(path.read_bytes())
    assert len(got) == 512 and r["blank_lines"] == 0


def test_blank_lines_bom_crlf_and_no_trailing_newline(tmp_path):
    data = (b"\xef\xbb\xbf" + b'{"text": "a"}\r\n' + b"\n" + b" \t\r\n" + b'{"text": "b"}\n' + b"\n\n"
            + b'{"text": "c"}')
    path = tmp_path / "x.jsonl"
    path.write_bytes(data)
    got, r = native_index(path)
    assert got == [(3, 14), (3 + 15 + 1 + 4, 13), (len(data) - 13, 13)]
    assert got == reference_index(data)
    assert data[3:3 + 14].endswith(b"\r")  # a CRLF line keeps its '\r', as in Modalities
    assert r["blank_lines"] == 4 and r["lines"] == 7


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(b"")
    got, r = native_index(path)
    assert got == [] and r["lines"] == 0


def test_line_longer_than_a_block(tmp_path):
    lines = [json.dumps({"text": "y" * n}).encode() for n in (10, 50_000, 3, 120_000, 7)]
    path = tmp_path / "long.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    got, _ = native_index(path, num_threads=2, chunk_bytes=4096)
    assert got == reference_index(path.read_bytes())


def test_invalid_line_names_file_line_and_column(tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "a"}\n\n{"text": "b",}\n{"text": "c"}\n')
    out = tmp_path / "bad.idx"
    assert cli(["data", "create_raw_index", "--index_path", str(out), str(path)]) == 1
    err = capsys.readouterr().err
    assert f"{path}:3:14: invalid JSON: expected a key" in err
    assert not out.exists()
    with pytest.raises(_C.InputError, match=r"bad.jsonl:3:14"):
        _C.build_raw_index(str(path))


def test_not_an_object_is_an_error(tmp_path):
    path = tmp_path / "arr.jsonl"
    path.write_bytes(b'{"text": "a"}\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"arr.jsonl:2:1: expected a JSON object, found an array"):
        _C.build_raw_index(str(path))


def test_skip_invalid_reports_lines(tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "a"}\nnope\n{"text": "b"}\n{"t": "\xff"}\n{"text": "c"}\n')
    out = tmp_path / "bad.idx"
    assert cli(["data", "create_raw_index", "--skip-invalid", "--index_path", str(out), str(path)]) == 0
    printed = capsys.readouterr().out
    assert "2 invalid skipped" in printed and "bad.jsonl:2" in printed and "bad.jsonl:4" in printed
    assert pickle.loads(out.read_bytes()) == [(0, 13), (19, 13), (44, 13)]


def test_file_existence_policy(tmp_path, capsys):
    src = MODALITIES / "lorem_ipsum.jsonl"
    out = tmp_path / "x.idx"
    out.write_bytes(b"keep me")
    assert cli(["data", "create_raw_index", "--index_path", str(out), str(src)]) == 1
    assert "already exists" in capsys.readouterr().err and out.read_bytes() == b"keep me"
    assert cli(["data", "create_raw_index", "--file_existence_policy", "skip", "--index_path", str(out),
                str(src)]) == 0
    assert out.read_bytes() == b"keep me"
    assert cli(["data", "create_raw_index", "--file_existence_policy", "override", "--index_path", str(out),
                str(src)]) == 0
    assert out.read_bytes() == (MODALITIES / "lorem_ipsum.idx").read_bytes()


def test_default_index_path_is_next_to_the_source(tmp_path):
    src = tmp_path / "lorem.jsonl"
    shutil.copy(MODALITIES / "lorem_ipsum.jsonl", src)
    assert cli(["data", "create_raw_index", str(src)]) == 0
    assert (tmp_path / "lorem.idx").read_bytes() == (MODALITIES / "lorem_ipsum.idx").read_bytes()


def test_command_line_entry_point_and_no_torch(tmp_path):
    out = tmp_path / "x.idx"
    code = (
        "import sys; from fastlm.cli import main; "
        f"rc = main(['data', 'create_raw_index', '--index_path', {str(out)!r}, "
        f"{str(MODALITIES / 'lorem_ipsum.jsonl')!r}]); "
        "assert 'torch' not in sys.modules, 'the data CLI imported torch'; sys.exit(rc)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    assert out.read_bytes() == (MODALITIES / "lorem_ipsum.idx").read_bytes()
    exe = shutil.which("fastlm")
    if exe is None:  # not on PATH when running from a source tree without the venv's bin/
        exe_cmd = [sys.executable, "-m", "fastlm"]
    else:
        exe_cmd = [exe]
    r = subprocess.run(exe_cmd + ["data", "create_raw_index", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--index_path" in r.stdout


def test_progress_bar_reports_every_byte(tmp_path):
    import io

    from fastlm.progress import ProgressBar

    src = MODALITIES / "lorem_ipsum.jsonl"
    out = io.StringIO()
    bar = ProgressBar(src.stat().st_size, "index", show_after_s=0.0, file=out)
    _C.build_raw_index(str(src), 2, False, bar, return_arrays=False)
    bar.close()
    assert bar.bar is not None and bar.shown_bytes == src.stat().st_size
    assert "index" in out.getvalue()


def test_short_job_shows_no_bar_and_never_imports_tqdm(tmp_path):
    """A bar appears only after SHOW_AFTER_S; a quicker job does not pay tqdm's ~0.1 s import."""
    code = (
        "import sys; from fastlm import _C; from fastlm.progress import ProgressBar; "
        f"bar = ProgressBar(1, 'index', show_after_s=3600); "
        f"_C.build_raw_index({str(MODALITIES / 'lorem_ipsum.jsonl')!r}, 1, False, bar, return_arrays=False); "
        "bar.close(); assert bar.bar is None; assert 'tqdm' not in sys.modules, 'tqdm was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


line_kinds = st.one_of(
    st.builds(lambda t: json.dumps({"text": t}, ensure_ascii=False), st.text(max_size=30)),
    st.sampled_from(["", " ", "\t \r", "\r", '{"a": 1}', '{"a": "x"}\r']),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(line_kinds, max_size=30), st.booleans(), st.booleans(), st.integers(1, 3),
       st.integers(16, 300))
def test_random_files_match_reference(tmp_path_factory, lines, bom, final_newline, threads, chunk):
    data = ("\n".join(lines) + ("\n" if final_newline else "")).encode()
    if bom:
        data = b"\xef\xbb\xbf" + data
    path = tmp_path_factory.mktemp("rand") / "r.jsonl"
    path.write_bytes(data)
    got, _ = native_index(path, num_threads=threads, chunk_bytes=chunk)
    assert got == reference_index(data)
