"""The packer: byte-identical to Modalities and to `tokenizers`, bad input, atomic output, configs."""

import json
import os
import pickle
import shutil
import signal
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastlm.cli import main as cli
from fastlm.data.pbin import PackedFile
from fastlm.pack import PackJob, load_pack_config, pack
from fastlm.yamlconf import ConfigError

from conftest import DATA, GPT2, MODALITIES, REDPAJAMA

EOD = 50256


def reference_pbin(docs, token_size=2):
    """The .pbin contract in plain Python: header, little-endian ids, pickled (offset, length) index."""
    dtype = {1: "<u1", 2: "<u2", 4: "<u4"}[token_size]
    data = b"".join(np.asarray(d, dtype=dtype).tobytes() for d in docs)
    index, offset = [], 0
    for d in docs:
        index.append((offset, len(d) * token_size))
        offset += len(d) * token_size
    return struct.pack("<QI", len(data), token_size) + data + pickle.dumps(index, protocol=4)


def expected_docs(hf, texts, eod=EOD):
    out = []
    for t in texts:
        ids = hf.encode(t).ids
        out.append(ids if ids and ids[-1] == eod else ids + [eod])
    return out


def write_jsonl(path, texts, key="text"):
    path.write_text("".join(json.dumps({key: t}) + "\n" for t in texts), encoding="utf-8")
    return path


def run_pack(tmp_path, src, **kw):
    job = PackJob(src_path=src, dst_path=tmp_path / "out.pbin", tokenizer_path=GPT2, **kw)
    return pack(job, show_progress=False), job.dst_path


@pytest.mark.parametrize("name", ["lorem_ipsum", "lorem_ipsum_long"])
def test_byte_identical_to_modalities_golden_files(tmp_path, name):
    summary, dst = run_pack(tmp_path, MODALITIES / f"{name}.jsonl", jq_pattern=".text", num_cpus=2)
    assert dst.read_bytes() == (MODALITIES / f"{name}.pbin").read_bytes()
    assert summary["tokenizer_path_used"] == "native"


@pytest.mark.parametrize("split", ["train", "test"])
def test_redpajama_equals_tokenizers(tmp_path, gpt2_hf, split):
    src = REDPAJAMA / f"redpajama_v2_samples_512_{split}.jsonl"
    texts = [json.loads(line)["raw_content"] for line in src.read_text(encoding="utf-8").splitlines()]
    summary, dst = run_pack(tmp_path, src, jq_pattern=".raw_content", num_cpus=2)
    assert dst.read_bytes() == reference_pbin(expected_docs(gpt2_hf, texts))
    if split == "train":
        assert summary["tokens"] == 786_370  # the tutorial's train split as Modalities packs it (512 EODs)
    assert summary["documents"] == 512


def test_hard_unicode_file(tmp_path, gpt2_hf):
    whole = (DATA / "hard_unicode.txt").read_bytes().decode("utf-8")
    texts = [line for line in whole.split("\n") if line] + [whole]
    assert len(texts) > 20
    src = write_jsonl(tmp_path / "hard.jsonl", texts)
    _, dst = run_pack(tmp_path, src, num_cpus=2)
    assert dst.read_bytes() == reference_pbin(expected_docs(gpt2_hf, texts))


unicode_text = st.text(
    alphabet=st.one_of(
        st.sampled_from(list(" \t\n\r\x0b\x0c\u00a0\u2003\u3000'sStTdDmM!?.,0123456789<|>endoftx")),
        st.characters(codec="utf-8"),
    ),
    max_size=60,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(unicode_text, min_size=1, max_size=12))
def test_random_documents_equal_tokenizers(tmp_path, gpt2_hf, texts):
    src = write_jsonl(tmp_path / "rand.jsonl", texts)
    job = PackJob(src_path=src, dst_path=tmp_path / "rand.pbin", tokenizer_path=GPT2,
                  num_cpus=2, file_existence_policy="override")
    pack(job, show_progress=False)
    assert job.dst_path.read_bytes() == reference_pbin(expected_docs(gpt2_hf, texts))


def test_unusual_but_valid_input(tmp_path, gpt2_hf):
    texts = ["", "ends with eod<|endoftext|>", "<|endoftext|>", "mid <|endoftext|> dle", "nul \x00 char",
             "crlf"]
    lines = [json.dumps({"text": t}).encode() for t in texts]
    # no final newline
    data = b"\xef\xbb\xbf" + b"\n".join(lines[:-1]) + b"\n" + lines[-1].replace(b"}", b"}\r")
    src = tmp_path / "odd.jsonl"
    src.write_bytes(data)
    summary, dst = run_pack(tmp_path, src)
    docs = expected_docs(gpt2_hf, texts)
    assert docs[0] == [EOD] and docs[1][-1] == EOD and docs[2] == [EOD]
    assert dst.read_bytes() == reference_pbin(docs)
    assert summary["documents"] == len(texts)


def test_thirty_documents_with_an_empty_fifth_are_all_kept(tmp_path, gpt2_hf):
    texts = [f"document number {i}" if i != 4 else "" for i in range(30)]
    src = write_jsonl(tmp_path / "thirty.jsonl", texts)
    summary, dst = run_pack(tmp_path, src, num_cpus=2)
    assert summary["documents"] == 30
    assert dst.read_bytes() == reference_pbin(expected_docs(gpt2_hf, texts))


def test_single_20mb_document(tmp_path, gpt2_hf):
    # A 20 MB document is a repeated unit that starts with a letter and ends with "\n" after a
    # non-space: pre-tokenization never joins across such a seam, so the document's ids are the unit's ids
    # repeated (checked on three copies below). tokenizers itself needs ~30 s for 20 MB in one call.
    docs = (REDPAJAMA / "redpajama_v2_samples_512_test.jsonl").read_text(encoding="utf-8").splitlines()
    unit = json.loads(docs[0])["raw_content"].strip() + "\n"
    assert unit[0].isalpha() and not unit[-2].isspace()
    unit_ids = gpt2_hf.encode(unit).ids
    assert gpt2_hf.encode(unit * 3).ids == unit_ids * 3
    copies = 20_000_000 // len(unit.encode()) + 1
    src = write_jsonl(tmp_path / "big.jsonl", [unit * copies])
    assert src.stat().st_size > 20_000_000
    summary, dst = run_pack(tmp_path, src, num_cpus=2)
    assert dst.read_bytes() == reference_pbin([unit_ids * copies + [EOD]])
    assert summary["documents"] == 1


@pytest.mark.parametrize(
    "line, words",
    [
        (b'{"text": "a"', "invalid JSON"),
        (b'{"other": "a"}', "missing key .text"),
        (b'{"text": 3}', "expected a string at .text, found a number"),
        (b'{"text": "\xc3\x28"}', "invalid UTF-8"),
        (b'{"text": "\\udc00"}', "lone low surrogate"),
        (b'{"text": "a\x00b"}', "raw NUL byte"),
    ],
)
def test_bad_documents_name_file_and_line_and_write_nothing(tmp_path, line, words):
    src = tmp_path / "bad.jsonl"
    src.write_bytes(b'{"text": "fine"}\n\n{"text": "also fine"}\n' + line + b'\n{"text": "after"}\n')
    with pytest.raises(ValueError) as err:
        run_pack(tmp_path, src)
    assert f"{src}:4:" in str(err.value) and words in str(err.value)
    assert list(tmp_path.iterdir()) == [src], "no output, no temporary file"


def test_output_folders_are_made_and_removed_again_on_failure(tmp_path, gpt2_hf):
    """Missing folders on the way to dst_path are created; a pack that fails removes those it made (and
    only those: an existing folder stays), so a failed command leaves nothing behind."""
    good = write_jsonl(tmp_path / "good.jsonl", ["a", "b"])
    bad = write_jsonl(tmp_path / "bad.jsonl", ["a"], key="txt")
    (tmp_path / "kept").mkdir()
    dst = tmp_path / "kept" / "new" / "deeper" / "out.pbin"
    with pytest.raises(ValueError, match='missing key .text \\(the line\'s object has keys "txt"\\)'):
        pack(PackJob(src_path=bad, dst_path=dst, tokenizer_path=GPT2), show_progress=False)
    assert list((tmp_path / "kept").iterdir()) == []
    pack(PackJob(src_path=good, dst_path=dst, tokenizer_path=GPT2), show_progress=False)
    assert len(PackedFile(dst)) == 2


def test_skip_invalid_skips_and_reports(tmp_path, gpt2_hf, capsys):
    src = tmp_path / "bad.jsonl"
    src.write_bytes(b'{"text": "one"}\n{"text": 1}\n{"text": "two"}\n{"nope": "x"}\n{"text": "three"}\n')
    cfg = tmp_path / "pack.yaml"
    cfg.write_text(
        f"settings:\n  src_path: {src}\n  dst_path: {tmp_path / 'out.pbin'}\n  jq_pattern: .text\n"
        f"  eod_token: <|endoftext|>\n  skip_invalid: true\n"
        f"tokenizer:\n  config:\n    pretrained_model_name_or_path: {GPT2}\n"
    )
    assert cli(["data", "pack_encoded_data", str(cfg), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "skipped 2 invalid line(s)" in out and "line 2" in out and "line 4" in out
    assert ((tmp_path / "out.pbin").read_bytes()
            == reference_pbin(expected_docs(gpt2_hf, ["one", "two", "three"])))


def test_skip_invalid_reports_the_lines_an_index_from_disk_left_out(tmp_path, gpt2_hf, capsys):
    """An index built with --skip-invalid leaves invalid lines out (line 2: not JSON); the packer never
    sees those, yet they are skipped lines of the source and the summary counts them with the invalid
    lines the index does hold (line 4: valid JSON without the key)."""
    src = tmp_path / "bad.jsonl"
    src.write_bytes(b'{"text": "one"}\n{"text": \n{"text": "two"}\n{"nope": "x"}\n{"text": "three"}\n')
    index = tmp_path / "bad.idx"
    assert cli(["data", "create_raw_index", "--quiet", "--skip-invalid", "--index_path", str(index),
                str(src)]) == 0
    capsys.readouterr()
    assert cli(["data", "pack_encoded_data", "--src", str(src), "--index", str(index), "--dst",
                str(tmp_path / "out.pbin"), "--tokenizer", str(GPT2), "--skip-invalid", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "skipped 2 invalid line(s)" in out and "line 2 (" in out and "line 4 (" in out, out
    assert ((tmp_path / "out.pbin").read_bytes()
            == reference_pbin(expected_docs(gpt2_hf, ["one", "two", "three"])))


def test_a_failed_pack_removes_the_index_it_built(tmp_path):
    """The index built on the fly (index_path missing) belongs to the pack: when the pack fails it goes,
    with the folders made for it; an index that was there before stays."""
    src = write_jsonl(tmp_path / "a.jsonl", ["a"], key="txt")
    index = tmp_path / "new" / "a.idx"
    job = PackJob(src_path=src, dst_path=tmp_path / "out" / "a.pbin", tokenizer_path=GPT2, index_path=index)
    with pytest.raises(ValueError, match="missing key .text"):
        pack(job, show_progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl"]
    index = tmp_path / "a.idx"
    assert cli(["data", "create_raw_index", "--quiet", "--index_path", str(index), str(src)]) == 0
    before = index.read_bytes()
    job = PackJob(src_path=src, dst_path=tmp_path / "a.pbin", tokenizer_path=GPT2, index_path=index)
    with pytest.raises(ValueError, match="missing key .text"):
        pack(job, show_progress=False)
    assert index.read_bytes() == before and not job.dst_path.exists()


def test_tutorial_config_with_relative_paths_and_missing_index(tmp_path, gpt2_hf, monkeypatch):
    (tmp_path / "data" / "raw").mkdir(parents=True)
    src = tmp_path / "data" / "raw" / "lorem.jsonl"
    src.write_bytes((MODALITIES / "lorem_ipsum.jsonl").read_bytes())
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "tokenizer" / "tokenizer.json").write_bytes((GPT2 / "tokenizer.json").read_bytes())
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        """settings:
  src_path: data/raw/lorem.jsonl
  dst_path: data/mem_map/lorem.pbin
  index_path: data/mem_map/lorem.idx
  jq_pattern: .text
  num_cpus: ${node_env:num_cpus}
  eod_token: <|endoftext|>
  processing_batch_size: 10
  raw_samples_queue_size: 300
  processed_samples_queue_size: 300
tokenizer:
  component_key: tokenizer
  variant_key: pretrained_hf_tokenizer
  config:
    pretrained_model_name_or_path: tokenizer
    padding: false
    truncation: false
"""
    )
    monkeypatch.chdir(tmp_path)
    assert subprocess.run([sys.executable, "-m", "fastlm.pack", "cfg.yaml", "--quiet"]).returncode == 0
    assert ((tmp_path / "data/mem_map/lorem.pbin").read_bytes()
            == (MODALITIES / "lorem_ipsum.pbin").read_bytes())
    assert (tmp_path / "data/mem_map/lorem.idx").read_bytes() == (MODALITIES / "lorem_ipsum.idx").read_bytes()
    job = load_pack_config("cfg.yaml")
    assert job.num_cpus == len(os.sched_getaffinity(0))


def _config(tmp_path, settings_extra="", tokenizer=None, settings=None, jq_pattern=".text",
            eod_token="<|endoftext|>"):
    body = settings or (
        f"  src_path: {MODALITIES / 'lorem_ipsum.jsonl'}\n  dst_path: {tmp_path / 'o.pbin'}\n"
        f"  jq_pattern: {jq_pattern}\n  eod_token: {eod_token}\n"
    )
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"settings:\n{body}{settings_extra}tokenizer:\n  config:\n"
                   f"    pretrained_model_name_or_path: {tokenizer or GPT2}\n")
    return cfg


def test_config_errors_are_clear(tmp_path):
    with pytest.raises(ConfigError,
                       match=r'unknown key "settings.src_pth" \(did you mean "settings.src_path"\?\)'):
        load_pack_config(_config(tmp_path, settings="  src_pth: x\n  dst_path: y\n  eod_token: z\n"))
    with pytest.raises(ConfigError, match=r"valid keys of settings: src_path, dst_path"):
        load_pack_config(_config(tmp_path, "  colour: red\n"))
    top = tmp_path / "top.yaml"
    top.write_text("setings:\n  src_path: x\n")
    with pytest.raises(ConfigError, match=r'top.yaml: unknown key "setings" \(did you mean "settings"\?\); '
                                          r"valid keys of the top level: settings, tokenizer$"):
        load_pack_config(top)
    with pytest.raises(ConfigError, match=r'missing key "settings.dst_path"'):
        load_pack_config(_config(tmp_path, settings="  src_path: x\n  eod_token: z\n"))
    # values YAML types otherwise than text: an empty one is None, which str() would make the token "None"
    for setting, found in (("src_path: 123", "123 \\(int\\)"), ("eod_token:", "None \\(NoneType\\)"),
                           ("eod_token: [a]", "\\['a'\\] \\(list\\)"), ("index_path: true", "True"),
                           ("processing_batch_size: abc", "'abc' \\(str\\)")):
        key = setting.partition(":")[0]
        others = "".join(f"  {k}: x\n" for k in ("src_path", "dst_path", "eod_token") if k != key)
        with pytest.raises(ConfigError, match=rf"settings.{key} must be (str|int), found {found}"):
            load_pack_config(_config(tmp_path, settings=others + f"  {setting}\n"))
    with pytest.raises(ConfigError, match=r"settings.eod_token is empty"):
        load_pack_config(_config(tmp_path, settings="  src_path: x\n  dst_path: y\n  eod_token: ' '\n"))


def test_flags_that_a_config_file_sets_are_refused_with_it(tmp_path, capsys):
    """With a config, --src/--dst/--tokenizer and the flags for what the config holds (--index,
    --jq-pattern, --eod-token) are errors naming the setting to change, not silently ignored; the run
    flags (--num-cpus, --skip-invalid, --file_existence_policy) apply on top of the config."""
    cfg = _config(tmp_path)
    for flag, key in (("--src", None), ("--index", "index_path"), ("--jq-pattern", "jq_pattern"),
                      ("--eod-token", "eod_token")):
        assert cli(["data", "pack_encoded_data", str(cfg), flag, "x"]) == 1
        err = capsys.readouterr().err
        assert (f"not both (got {flag})" if key is None
                else f"{flag} is given with the config file {cfg}; set settings.{key} in that file") in err
    assert not (tmp_path / "o.pbin").exists()
    assert cli(["data", "pack_encoded_data", str(cfg), "--num-cpus", "1", "--quiet"]) == 0
    assert "1 thread" in capsys.readouterr().out


def test_settings_from_the_environment_take_their_types(tmp_path, monkeypatch):
    monkeypatch.setenv("PACK_CPUS", "3")
    monkeypatch.setenv("PACK_SKIP", "true")
    job = load_pack_config(_config(tmp_path,
                                   "  num_cpus: ${env:PACK_CPUS}\n  skip_invalid: ${env:PACK_SKIP}\n"))
    assert (job.num_cpus, job.skip_invalid) == (3, True)
    monkeypatch.setenv("PACK_CPUS", "many")
    with pytest.raises(ConfigError, match=r"settings.num_cpus must be int, found 'many'"):
        load_pack_config(_config(tmp_path, "  num_cpus: ${env:PACK_CPUS}\n"))
    with pytest.raises(ConfigError, match=r"settings.num_cpus must be a positive integer, found 0"):
        load_pack_config(_config(tmp_path, "  num_cpus: 0\n"))


def test_special_tokens_must_already_be_special(tmp_path):
    tok = "    special_tokens:\n      pad_token: <|endoftext|>\n"
    ok = _config(tmp_path, eod_token="<|endoftext|>")
    ok.write_text(ok.read_text() + tok)
    job = load_pack_config(ok)
    assert job.special_tokens == ("<|endoftext|>",)
    pack(job, show_progress=False)  # already special: packs as without the key
    assert (tmp_path / "o.pbin").read_bytes() == (MODALITIES / "lorem_ipsum.pbin").read_bytes()
    (tmp_path / "o.pbin").unlink()
    bad = _config(tmp_path)
    bad.write_text(bad.read_text() + "    special_tokens:\n      additional_special_tokens: [hello]\n")
    with pytest.raises(ConfigError, match=r"special_tokens lists 'hello', which is not a special token of "
                                          r".*tokenizer.json; adding it would change how texts are split"):
        pack(load_pack_config(bad), show_progress=False)
    assert not (tmp_path / "o.pbin").exists()
    bad.write_text(_config(tmp_path).read_text() + "    special_tokens: [hello]\n")
    with pytest.raises(ConfigError, match=r"tokenizer.config.special_tokens must be a mapping"):
        load_pack_config(bad)


def test_a_bad_raw_index_hints_at_its_real_source(tmp_path):
    index = tmp_path / "elsewhere.idx"
    index.write_bytes(b"not a pickle")
    cfg = _config(tmp_path, f"  index_path: {index}\n")
    with pytest.raises(ValueError, match=rf"create_raw_index --index_path {index} "
                                         rf"{MODALITIES / 'lorem_ipsum.jsonl'}`"):
        pack(load_pack_config(cfg), show_progress=False)


def test_thread_counts_below_one_are_refused_on_the_command_line(tmp_path, capsys):
    for argv in (["data", "create_raw_index", str(tmp_path / "x.jsonl"), "--num-cpus", "0"],
                 ["data", "pack_encoded_data", "--src", "x", "--dst", "y", "--num_cpus", "-3"]):
        with pytest.raises(SystemExit) as exit_:
            cli(argv)
        assert exit_.value.code == 2
        assert "expected a positive integer, found" in capsys.readouterr().err


def test_a_pack_that_skips_every_line_writes_nothing(tmp_path):
    cfg = _config(tmp_path, "  skip_invalid: true\n", jq_pattern=".rawcontent")
    with pytest.raises(ValueError, match=r"lorem_ipsum.jsonl: every line was skipped as invalid; line 1: .*"
                                         r"missing key .rawcontent.*nothing was written. HINT: check "
                                         r"settings.jq_pattern \(.rawcontent\)"):
        pack(load_pack_config(cfg), show_progress=False)
    assert list(tmp_path.iterdir()) == [cfg]


def test_eod_token_not_in_vocabulary(tmp_path):
    job = load_pack_config(_config(tmp_path, eod_token="</s>"))
    with pytest.raises(ConfigError, match=r"eod_token '</s>' is not in the vocabulary"):
        pack(job, show_progress=False)
    assert not (tmp_path / "o.pbin").exists()


def test_unreadable_tokenizer(tmp_path):
    bad = tmp_path / "tok"
    bad.mkdir()
    (bad / "tokenizer.json").write_text("{not json")
    job = load_pack_config(_config(tmp_path, tokenizer=bad))
    with pytest.raises(ValueError, match=r"tok/tokenizer.json: cannot read tokenizer.json"):
        pack(job, show_progress=False)
    job = load_pack_config(_config(tmp_path, tokenizer=tmp_path / "missing"))
    with pytest.raises(ValueError, match=r"no tokenizer found"):
        pack(job, show_progress=False)


def test_unsupported_jq_pattern(tmp_path):
    job = load_pack_config(_config(tmp_path, jq_pattern=".text[0]"))
    with pytest.raises(ValueError, match=r"supported patterns are `.key` and nested `.key.subkey`"):
        pack(job, show_progress=False)


def test_nested_jq_pattern(tmp_path, gpt2_hf):
    src = tmp_path / "nested.jsonl"
    src.write_text('{"meta": {"body": "hello world"}, "x": 1}\n{"meta": {"body": "second"}}\n')
    _, dst = run_pack(tmp_path, src, jq_pattern=".meta.body")
    assert dst.read_bytes() == reference_pbin(expected_docs(gpt2_hf, ["hello world", "second"]))


def test_file_existence_policy(tmp_path, capsys):
    cfg = _config(tmp_path)
    dst = tmp_path / "o.pbin"
    dst.write_bytes(b"precious")
    assert cli(["data", "pack_encoded_data", str(cfg), "--quiet"]) == 1
    assert "already exists" in capsys.readouterr().err and dst.read_bytes() == b"precious"
    assert cli(["data", "pack_encoded_data", str(cfg), "--quiet", "--file_existence_policy", "skip"]) == 0
    assert dst.read_bytes() == b"precious"
    assert cli(["data", "pack_encoded_data", str(cfg), "--quiet", "--file_existence_policy", "override"]) == 0
    assert dst.read_bytes() == (MODALITIES / "lorem_ipsum.pbin").read_bytes()


def test_plain_flags_and_summary(tmp_path):
    dst = tmp_path / "flags.pbin"
    r = subprocess.run(
        [sys.executable, "-m", "fastlm.pack", "--src", str(MODALITIES / "lorem_ipsum_long.jsonl"),
         "--dst", str(dst), "--tokenizer", str(GPT2 / "tokenizer.json"), "--jq-pattern", ".text",
         "--eod-token", "<|endoftext|>", "--num-cpus", "2", "--quiet"],
        capture_output=True, text=True,
    )
    assert r.returncode == 0, r.stderr
    assert dst.read_bytes() == (MODALITIES / "lorem_ipsum_long.pbin").read_bytes()
    summary = r.stdout.strip().splitlines()[-1]
    for word in ("500 documents", "2-byte", "MB/s", "M tokens/s", "native byte-level BPE", "2 threads"):
        assert word in summary, summary


def _big_corpus(tmp_path, megabytes):
    line = (REDPAJAMA / "redpajama_v2_samples_512_train.jsonl").read_bytes()
    src = tmp_path / "big.jsonl"
    with open(src, "wb") as f:
        for _ in range(megabytes * 1_000_000 // len(line) + 1):
            f.write(line)
    return src


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT, signal.SIGTERM])
def test_interrupted_pack_leaves_no_destination(tmp_path, sig):
    src = _big_corpus(tmp_path, 60)
    dst = tmp_path / "out" / "big.pbin"
    proc = subprocess.Popen(
        [sys.executable, "-m", "fastlm.pack", "--src", str(src), "--dst", str(dst), "--tokenizer", str(GPT2),
         "--jq-pattern", ".raw_content", "--num-cpus", "1", "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    # wait until the temporary output exists, i.e. packing is under way (the temporary file, not the
    # destination: on a loaded machine this loop may first look after packing has finished, and the
    # process may still be alive then, writing its summary)
    deadline = time.time() + 60
    while time.time() < deadline and not (dst.parent.exists()
                                          and any(p.name != dst.name for p in dst.parent.iterdir())):
        time.sleep(0.02)
    assert proc.poll() is None and not dst.exists(), "packing finished before it could be interrupted"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert not dst.exists()
    if sig != signal.SIGKILL:  # Ctrl-C, or SIGTERM (a job scheduler, `kill`): 128 + the signal
        assert proc.returncode == 128 + sig and b"interrupted" in err
        assert not dst.parent.exists(), "the temporary file and the folder made for it are removed"


def test_library_fallback_gives_identical_ids(tmp_path):
    """A tokenizer the native path does not cover (here: GPT-2 with an NFC normalizer) packs through the
    tokenizers library, with the same ids that library gives."""
    from tokenizers import Tokenizer

    spec = json.loads((GPT2 / "tokenizer.json").read_text(encoding="utf-8"))
    spec["normalizer"] = {"type": "NFC"}
    tok = tmp_path / "nfc"
    tok.mkdir()
    (tok / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    hf = Tokenizer.from_file(str(tok / "tokenizer.json"))
    texts = [json.loads(line)["text"]
             for line in (MODALITIES / "danish_test_dataset.jsonl").read_text().splitlines()]
    texts += ["Cafe\u0301 vs Café", ""]
    src = write_jsonl(tmp_path / "d.jsonl", texts)
    job = PackJob(src_path=src, dst_path=tmp_path / "d.pbin", tokenizer_path=tok, num_cpus=2)
    summary = pack(job, show_progress=False)
    assert summary["tokenizer_path_used"] == "tokenizers" and "normalizer 'NFC'" in summary["tokenizer"]
    assert job.dst_path.read_bytes() == reference_pbin(expected_docs(hf, texts))


def test_token_size_counts_added_tokens(tmp_path):
    """Added tokens with ids past 65,535 make 4-byte tokens (Modalities counts the base vocabulary only
    and would overflow 2 bytes)."""
    from tokenizers import Tokenizer

    spec = json.loads((GPT2 / "tokenizer.json").read_text(encoding="utf-8"))
    for i in range(50257, 65601):
        spec["added_tokens"].append({"id": i, "content": f"<|extra_{i}|>", "single_word": False,
                                     "lstrip": False, "rstrip": False, "normalized": True, "special": True})
    tok = tmp_path / "big_tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    hf = Tokenizer.from_file(str(tok / "tokenizer.json"))
    texts = ["a <|extra_65600|> b<|extra_50257|>", "plain", "<|extra_65535|><|extra_65536|>"]
    assert 65600 in hf.encode(texts[0]).ids and 65536 in hf.encode(texts[2]).ids
    src = write_jsonl(tmp_path / "b.jsonl", texts)
    job = PackJob(src_path=src, dst_path=tmp_path / "b.pbin", tokenizer_path=tok)
    summary = pack(job, show_progress=False)
    assert summary["token_size"] == 4 and summary["tokenizer_path_used"] == "native"
    assert job.dst_path.read_bytes() == reference_pbin(expected_docs(hf, texts), token_size=4)


def test_added_token_ids_that_tokenizers_reassigns_use_the_library(tmp_path):
    """tokenizers gives an added token with a sparse id (70,000 after a 50,257 vocabulary) the next free id
    instead; fastlm then defers to the library, so ids stay exactly the library's."""
    from tokenizers import Tokenizer

    spec = json.loads((GPT2 / "tokenizer.json").read_text(encoding="utf-8"))
    spec["added_tokens"].append({"id": 70000, "content": "<|big|>", "single_word": False, "lstrip": False,
                                 "rstrip": False, "normalized": False, "special": True})
    tok = tmp_path / "sparse"
    tok.mkdir()
    (tok / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    hf = Tokenizer.from_file(str(tok / "tokenizer.json"))
    texts = ["a <|big|> b"]
    src = write_jsonl(tmp_path / "s.jsonl", texts)
    job = PackJob(src_path=src, dst_path=tmp_path / "s.pbin", tokenizer_path=tok)
    summary = pack(job, show_progress=False)
    assert summary["tokenizer_path_used"] == "tokenizers" and summary["token_size"] == 2
    assert job.dst_path.read_bytes() == reference_pbin(expected_docs(hf, texts))


def test_a_byte_level_vocab_without_every_byte_uses_the_library(tmp_path):
    """A byte-level BPE trained without the byte-level initial alphabet lacks the symbols of bytes its
    corpus never had; tokenizers drops such bytes, so fastlm defers to it instead of refusing the file."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(["lorem ipsum dolor sit amet"] * 20, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False))
    hf.save(str(tmp_path / "bl.json"))
    texts = ["lorem ipsum", "dolor \u00e9 sit \x00 amet", ""]
    src = write_jsonl(tmp_path / "b.jsonl", texts)
    job = PackJob(src_path=src, dst_path=tmp_path / "b.pbin", tokenizer_path=tmp_path / "bl.json")
    summary = pack(job, show_progress=False)
    assert summary["tokenizer_path_used"] == "tokenizers"
    assert "the vocab lacks the byte-level symbols of" in summary["tokenizer"]
    assert job.dst_path.read_bytes() == reference_pbin(expected_docs(hf, texts, eod=0), summary["token_size"])


def test_one_byte_tokens_through_the_library(tmp_path):
    """A WordPiece tokenizer with fewer than 256 ids: library path, 1-byte tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    hf = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.train_from_iterator(["lorem ipsum dolor sit amet"] * 20, trainers.WordPieceTrainer(
        vocab_size=120, special_tokens=["[UNK]", "[EOD]"]))
    assert hf.get_vocab_size() <= 256
    hf.save(str(tmp_path / "wp.json"))
    texts = ["lorem ipsum", "dolor sit amet zzz", ""]
    src = write_jsonl(tmp_path / "w.jsonl", texts)
    job = PackJob(src_path=src, dst_path=tmp_path / "w.pbin", tokenizer_path=tmp_path / "wp.json",
                  eod_token="[EOD]")
    summary = pack(job, show_progress=False)
    eod = hf.token_to_id("[EOD]")
    assert summary["token_size"] == 1 and summary["tokenizer_path_used"] == "tokenizers"
    assert job.dst_path.read_bytes() == reference_pbin(expected_docs(hf, texts, eod=eod), token_size=1)


def _text_mode_index(src):
    """The index Modalities' indexer writes: the file read in text mode, so offsets in bytes (tell()) but
    lengths in characters, with a CRLF line end translated to a newline and left out."""
    index = []
    with open(src, encoding="utf-8") as f:
        while True:
            offset, line = f.tell(), f.readline()
            if not line:
                return index
            index.append((offset, len(line.rstrip("\n"))))


def test_index_written_in_text_mode_gets_byte_lengths_from_the_file(tmp_path, capsys):
    src = tmp_path / "mixed.jsonl"
    lines = [json.dumps({"text": t}, ensure_ascii=False)
             for t in ("héllo wörld", "plain", "ünïcödé ☃ 漢字", "x")]
    src.write_bytes("\n".join(lines[:2]).encode() + b"\r\n" + "\n".join(lines[2:]).encode() + b"\n")
    index = tmp_path / "text_mode.idx"
    index.write_bytes(pickle.dumps(_text_mode_index(src), protocol=4))
    own, own_dst = run_pack(tmp_path, src, jq_pattern=".text", num_cpus=2)
    reference = own_dst.read_bytes()
    summary, dst = run_pack(tmp_path, src, jq_pattern=".text", num_cpus=2, index_path=index,
                            file_existence_policy="override")
    assert dst.read_bytes() == reference and summary["documents"] == 4
    note = capsys.readouterr().err
    assert "3 of 4 documents" in note and str(index) in note  # two non-ASCII lines and the CRLF one


def test_an_index_that_leaves_out_lines_is_an_error(tmp_path):
    """An index of an older, shorter version of the file, or one built with --skip-invalid for a pack
    without it, would make the packer drop lines without a word."""
    src = write_jsonl(tmp_path / "grow.jsonl", ["one", "two"])
    index = tmp_path / "grow.idx"
    assert cli(["data", "create_raw_index", "--quiet", "--index_path", str(index), str(src)]) == 0
    with open(src, "a") as f:
        f.write(json.dumps({"text": "three"}) + "\n")
    with pytest.raises(ValueError, match=r"grow\.idx: the index leaves out 1 of the 3 documents of "
                                         r".*grow\.jsonl, the first at line 3: .* HINT: regenerate it "
                                         r"with `fastlm data create_raw_index --file_existence_policy "
                                         r"override"):
        run_pack(tmp_path, src, jq_pattern=".text", index_path=index)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "one"}\n{"text": 5\n{"text": "two"}\n')
    skipping = tmp_path / "bad.idx"
    assert cli(["data", "create_raw_index", "--quiet", "--skip-invalid", "--index_path", str(skipping),
                str(bad)]) == 0
    with pytest.raises(ValueError, match=r"bad\.idx: the index leaves out 1 invalid line\(s\) of "
                                         r".*bad\.jsonl \(the first invalid one, line 2: .*Pack with "
                                         r"--skip-invalid"):
        run_pack(tmp_path, bad, jq_pattern=".text", index_path=skipping)
    summary, _ = run_pack(tmp_path, bad, jq_pattern=".text", index_path=skipping, skip_invalid=True)
    assert summary["documents"] == 2
    assert not (tmp_path / "out.pbin.tmp").exists()


def test_a_pack_never_overwrites_its_own_inputs(tmp_path, capsys):
    src = write_jsonl(tmp_path / "a.jsonl", ["one", "two"])
    index = tmp_path / "a.idx"
    assert cli(["data", "create_raw_index", "--quiet", "--index_path", str(index), str(src)]) == 0
    tok = tmp_path / "tok"  # a copy: were the check broken, the test would overwrite it
    shutil.copytree(GPT2, tok)
    for dst, what, tokenizer in ((src, "the source JSONL file", tok), (index, "the raw index", tok),
                                 (tok / "tokenizer.json", "the tokenizer", tok / "tokenizer.json"),
                                 (tok / "tokenizer.json", "the tokenizer", tok)):  # given as its folder
        before = dst.read_bytes()
        job = PackJob(src_path=src, dst_path=dst, tokenizer_path=tokenizer, index_path=index,
                      file_existence_policy="override")
        with pytest.raises(ValueError, match=rf"the output \.pbin would replace {what}"):
            pack(job, show_progress=False)
        assert dst.read_bytes() == before
    before = src.read_bytes()
    assert cli(["data", "create_raw_index", "--index_path", str(src), "--file_existence_policy", "override",
                str(src)]) == 1
    assert f"--index_path {src} is the source file itself" in capsys.readouterr().err
    assert src.read_bytes() == before


def test_folders_and_thread_counts_are_named(tmp_path, capsys):
    src = write_jsonl(tmp_path / "a.jsonl", ["one", "two"])
    assert cli(["data", "create_raw_index", "--index_path", str(tmp_path), "--file_existence_policy",
                "override", str(src)]) == 1
    assert f"error: {tmp_path} is a folder; expected the path of the file to write" in capsys.readouterr().err
    assert cli(["data", "create_raw_index", str(tmp_path)]) == 1
    assert f"error: {tmp_path}: is a folder; expected the source JSONL file" in capsys.readouterr().err
    assert cli(["data", "inspect", str(tmp_path)]) == 1
    assert f"error: {tmp_path}: is a folder; expected the packed file" in capsys.readouterr().err
    summary, _ = run_pack(tmp_path, src, jq_pattern=".text", num_cpus=10_000)
    assert summary["threads"] <= os.cpu_count() and summary["documents"] == 2
    assert "note: num_cpus 10,000 is more than the" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert cli(["data", "pack_encoded_data", "--src", str(empty), "--dst", str(tmp_path / "e.pbin"),
                "--tokenizer", str(GPT2), "--quiet"]) == 0
    assert "note: " + str(empty) + " holds no document" in capsys.readouterr().err


def test_index_of_another_file_is_a_clear_error(tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", ["one", "two", "three"])
    shifted = tmp_path / "shifted.idx"
    shifted.write_bytes(pickle.dumps([(0, 13), (5, 13)], protocol=4))  # 5 is inside the first line
    with pytest.raises(ValueError,
                       match=r"shifted\.idx: entry 1 \(offset 5\) is not the start of a valid JSON line"):
        run_pack(tmp_path, src, jq_pattern=".text", index_path=shifted)
    too_long = tmp_path / "too_long.idx"
    too_long.write_bytes(pickle.dumps([(0, 13), (15, 1000)], protocol=4))
    with pytest.raises(ValueError, match=r"a\.jsonl: the index places document 1 at bytes 15\.\.1015 "
                                         r"but the file holds 50 bytes"):
        run_pack(tmp_path, src, jq_pattern=".text", index_path=too_long)
    assert not (tmp_path / "out.pbin").exists()
