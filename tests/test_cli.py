"""The `fastlm` command: help, inspect and merge from the command line, and bounded memory when packing."""

import shutil
import subprocess
import sys

from fastlm.cli import main as cli

from conftest import GPT2, MODALITIES, REDPAJAMA


def fastlm(*args):
    exe = shutil.which("fastlm")
    cmd = [exe] if exe else [sys.executable, "-m", "fastlm"]
    return subprocess.run(cmd + list(args), capture_output=True, text=True)


def test_help_lists_the_modalities_verbs():
    r = fastlm("data", "--help")
    assert r.returncode == 0
    for verb in ("create_raw_index", "pack_encoded_data", "inspect", "merge_packed_data"):
        assert verb in r.stdout


def test_inspect_golden_file_with_tokenizer():
    r = fastlm("data", "inspect", str(MODALITIES / "lorem_ipsum.pbin"), "--tokenizer", str(GPT2))
    assert r.returncode == 0, r.stderr
    assert "documents:       12" in r.stdout and "tokens:          7,989" in r.stdout
    assert "token size:      2 bytes" in r.stdout and "token 50256" in r.stdout
    assert "0 Lorem ipsum dolor sit amet" in r.stdout  # the first document, decoded


def test_output_into_a_closed_pipe_ends_quietly_with_status_0():
    """`fastlm data inspect X | head -n 1` under `set -o pipefail` (the getting-started script): the
    reader closes the pipe early; the command stops without a traceback or a failing status. Here the
    reader closes it before anything is written, so every write fails."""
    exe = shutil.which("fastlm")
    cmd = [exe] if exe else [sys.executable, "-m", "fastlm"]
    proc = subprocess.Popen(cmd + ["data", "inspect", str(MODALITIES / "lorem_ipsum.pbin"), "--tokenizer",
                                   str(GPT2)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0, err
    assert err == ""


def test_inspect_corrupt_file_fails_with_the_file_name(tmp_path):
    bad = tmp_path / "cut.pbin"
    bad.write_bytes((MODALITIES / "lorem_ipsum.pbin").read_bytes()[:5000])
    r = fastlm("data", "inspect", str(bad))
    assert r.returncode == 1
    assert "cut.pbin" in r.stderr and "HINT" in r.stderr and "Traceback" not in r.stderr


def test_merge_from_the_command_line(tmp_path, capsys):
    a, b = MODALITIES / "lorem_ipsum.pbin", MODALITIES / "lorem_ipsum_long.pbin"
    out = tmp_path / "merged.pbin"
    assert cli(["data", "merge_packed_data", str(a), str(b), str(out)]) == 0  # Modalities' order: output last
    from fastlm.data.pbin import PackedFile

    def documents(*paths):
        return [d.tolist() for p in map(PackedFile, paths) for d in map(p.document, range(p.num_documents))]

    assert documents(out) == documents(a, b)
    assert cli(["data", "merge_packed_data", str(a), str(out)]) == 1  # exists: the default policy is error
    assert "already exists" in capsys.readouterr().err
    assert cli(["data", "merge_packed_data", str(a), str(out), "--file_existence_policy", "skip"]) == 0
    assert capsys.readouterr().out == f"{out} exists; skipped (file_existence_policy: skip)\n"
    assert documents(out) == documents(a, b)
    # a folder stands for the .pbin files below it, sorted by path (Modalities reads them in the file
    # system's order)
    folder = tmp_path / "parts"
    (folder / "sub").mkdir(parents=True)
    shutil.copy(b, folder / "1.pbin")
    shutil.copy(a, folder / "sub" / "0.pbin")
    (folder / "notes.txt").write_text("not a packed file")
    assert cli(["data", "merge_packed_data", str(a), str(folder), str(tmp_path / "all.pbin")]) == 0
    assert documents(tmp_path / "all.pbin") == documents(a, b, a)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli(["data", "merge_packed_data", str(empty), str(tmp_path / "none.pbin")]) == 1
    assert f"{empty}: a folder with no .pbin file in it" in capsys.readouterr().err
    # the output first (fastlm's order before it took Modalities'): named, nothing written
    before = out.read_bytes()
    assert cli(["data", "merge_packed_data", str(tmp_path / "new.pbin"), str(a), str(out)]) == 1
    err = capsys.readouterr().err
    assert "new.pbin: not found, and the output" in err and "takes the files to merge first" in err, err
    assert out.read_bytes() == before and not (tmp_path / "new.pbin").exists()


def _peak_rss_mb_of_pack(tmp_path, megabytes):
    line_block = (REDPAJAMA / "redpajama_v2_samples_512_train.jsonl").read_bytes()
    src = tmp_path / f"c{megabytes}.jsonl"
    with open(src, "wb") as f:
        for _ in range(megabytes * 1_000_000 // len(line_block) + 1):
            f.write(line_block)
    code = (
        "import resource, sys; from fastlm.pack import main; rc = main(sys.argv[1:]); "
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(rc)"
    )
    r = subprocess.run([sys.executable, "-c", code, "--src", str(src),
                        "--dst", str(tmp_path / f"c{megabytes}.pbin"), "--tokenizer", str(GPT2),
                        "--jq-pattern", ".raw_content", "--num-cpus", "2", "--quiet"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return int(r.stdout.split()[-1]) / 1024


def test_packing_memory_does_not_grow_with_the_corpus(tmp_path):
    small = _peak_rss_mb_of_pack(tmp_path, 5)
    large = _peak_rss_mb_of_pack(tmp_path, 60)
    # 12x the corpus: the index grows by ~16 bytes per document (a few hundred KB here), nothing else
    # may scale with it. Holding the texts or tokens would add 60+ MB.
    assert large - small < 25, (small, large)


def test_a_full_disk_or_unwritable_folder_names_the_output_not_its_temporary_file(tmp_path, capsys):
    """Every command writes through a temporary file: a write that fails (here the temporary name is a
    link to /dev/full, where every write fails with ENOSPC, as on a full disk) is one line naming the
    output and the cause, with no traceback and nothing left behind; an output folder that cannot be
    written to (/proc) likewise."""
    import os

    from fastlm.atomic import temp_name

    src = MODALITIES / "lorem_ipsum.jsonl"
    commands = {
        "x.idx": ["data", "create_raw_index", "--quiet", "--index_path", "{dst}", str(src)],
        "x.pbin": ["data", "pack_encoded_data", "--quiet", "--src", str(src), "--dst", "{dst}", "--tokenizer",
                   str(GPT2)],
        "m.pbin": ["data", "merge_packed_data", str(MODALITIES / "lorem_ipsum.pbin"), "{dst}"],
    }
    for name, argv in commands.items():
        dst = tmp_path / name
        os.symlink("/dev/full", temp_name(dst))  # (the commands run in this process: the same pid)
        assert cli([a.format(dst=dst) for a in argv]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"error: {dst}: cannot be written: ") and "No space left on device" in err, err
        assert ".tmp-" not in err and "Traceback" not in err
        assert list(tmp_path.iterdir()) == [], "the temporary file is removed"
    for name, argv in commands.items():
        assert cli([a.format(dst=f"/proc/{name}") for a in argv]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"error: /proc/{name}: cannot be written: ") and ".tmp-" not in err, err


def test_an_output_path_ending_in_a_separator_is_refused(tmp_path, capsys):
    """`--dst out/` names a folder: it is an error, not a file called `out`."""
    import pytest

    from fastlm.pack import load_pack_config
    from fastlm.yamlconf import ConfigError

    src = str(MODALITIES / "lorem_ipsum.jsonl")
    for argv in (["data", "pack_encoded_data", "--src", src, "--dst", f"{tmp_path}/new/", "--tokenizer",
                  str(GPT2)],
                 ["data", "create_raw_index", "--index_path", f"{tmp_path}/new/", src],
                 ["data", "merge_packed_data", str(MODALITIES / "lorem_ipsum.pbin"), f"{tmp_path}/new/"]):
        with pytest.raises(SystemExit) as stop:
            cli(argv)
        assert stop.value.code == 2
        assert f"expected the path of a file to write, found the folder path '{tmp_path}/new/'" in \
            capsys.readouterr().err
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"settings:\n  src_path: {src}\n  dst_path: {tmp_path}/new/\n  eod_token: x\n"
                   f"tokenizer:\n  config:\n    pretrained_model_name_or_path: {GPT2}\n")
    with pytest.raises(ConfigError, match=r"settings\.dst_path must be the path of a file to write"):
        load_pack_config(cfg)
    assert list(tmp_path.iterdir()) == [cfg]
