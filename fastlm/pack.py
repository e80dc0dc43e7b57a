"""Pack a JSONL corpus into a .pbin token file: `python -m fastlm.pack CONFIG` (= `fastlm data
pack_encoded_data CONFIG`), or with plain flags for one-off runs.

The config is the Modalities tutorial's format, unchanged (a `settings` block and a `tokenizer` block).
The work happens in fastlm._C.pack_jsonl: threads read, validate, extract and tokenize documents; the
output is byte-identical to what Modalities 0.5 writes for the same input and tokenizer, and is written
under a temporary name that is renamed only when complete.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from fastlm.atomic import (FILE_EXISTENCE_POLICIES, atomic_output, capped_threads, discard, missing_file,
                           missing_folders, same_file, should_write)
from fastlm.progress import progress_bar
from fastlm.yamlconf import ConfigError, check_keys, coerce_value, load_yaml, usable_cpus

SETTINGS_KEYS = {
    "src_path": "the JSONL file to pack",
    "dst_path": "the .pbin file to write",
    "index_path": "the raw index of src_path (built on the fly when the file is missing)",
    "jq_pattern": "where the text is in each JSON line: .key or .key.subkey",
    "num_cpus": "threads to use (${node_env:num_cpus}: all usable CPUs)",
    "eod_token": "the end-of-document token appended to every document",
    "skip_invalid": "skip invalid lines (reported) instead of stopping at the first",
    "file_existence_policy": "what to do when dst_path exists: error | skip | override",
    # Modalities' queue and batch sizes: accepted so that its configs load unchanged; fastlm sizes its
    # batches by bytes and its queues by thread count, so these have no effect.
    "processing_batch_size": "accepted for Modalities compatibility; no effect",
    "raw_samples_queue_size": "accepted for Modalities compatibility; no effect",
    "processed_samples_queue_size": "accepted for Modalities compatibility; no effect",
}
TOKENIZER_KEYS = ("component_key", "variant_key", "config")
TOKENIZER_CONFIG_KEYS = ("pretrained_model_name_or_path", "padding", "truncation", "max_length",
                         "special_tokens")


@dataclass
class PackJob:
    src_path: Path
    dst_path: Path
    tokenizer_path: Path
    jq_pattern: str = ".text"
    eod_token: str = "<|endoftext|>"
    index_path: Path | None = None
    num_cpus: int = 1
    skip_invalid: bool = False
    file_existence_policy: str = "error"
    special_tokens: tuple[str, ...] = ()  # tokenizer.config.special_tokens: must be special already


def load_pack_config(path: str | os.PathLike) -> PackJob:
    """Read a pack config (the tutorial's format); relative paths resolve against the working directory."""
    source = str(path)
    cfg = load_yaml(path)
    check_keys(cfg, ("settings", "tokenizer"), "", source, required=("settings", "tokenizer"))
    settings, tok = cfg["settings"], cfg["tokenizer"]
    check_keys(settings, SETTINGS_KEYS, "settings", source, required=("src_path", "dst_path", "eod_token"))
    check_keys(tok, TOKENIZER_KEYS, "tokenizer", source, required=("config",))
    if tok.get("component_key", "tokenizer") != "tokenizer":
        raise ConfigError(f'{source}: tokenizer.component_key must be "tokenizer", '
                          f'found {tok["component_key"]!r}')
    if tok.get("variant_key", "pretrained_hf_tokenizer") != "pretrained_hf_tokenizer":
        raise ConfigError(
            f'{source}: tokenizer.variant_key {tok["variant_key"]!r} is not supported '
            f'(supported: "pretrained_hf_tokenizer", a tokenizer.json)'
        )
    tcfg = tok["config"]
    check_keys(tcfg, TOKENIZER_CONFIG_KEYS, "tokenizer.config", source,
               required=("pretrained_model_name_or_path",))
    for key in ("padding", "truncation"):
        if tcfg.get(key) not in (None, False, "do_not_pad", "do_not_truncate"):
            raise ConfigError(
                f"{source}: tokenizer.config.{key} must be false for packing (documents are stored whole), "
                f"found {tcfg[key]!r}"
            )
    # (coerce_value types a value that is one ${env:VAR}: the environment gives text)
    special = tcfg.get("special_tokens") or {}
    if not isinstance(special, dict):
        raise ConfigError(f"{source}: tokenizer.config.special_tokens must be a mapping (e.g. "
                          f"additional_special_tokens: [...]), found {special!r}")
    special_tokens = []
    for name, value in special.items():
        for token in value if isinstance(value, list) else [value]:
            if not isinstance(token, str):
                raise ConfigError(f"{source}: tokenizer.config.special_tokens.{name} must be a token string "
                                  f"or a list of them, found {token!r}")
            special_tokens.append(token)
    num_cpus = coerce_value(settings.get("num_cpus", usable_cpus()), int, f"{source}: settings.num_cpus")
    if num_cpus < 1:
        raise ConfigError(f"{source}: settings.num_cpus must be a positive integer, found {num_cpus!r}")
    policy = settings.get("file_existence_policy", "error")
    if policy not in FILE_EXISTENCE_POLICIES:
        raise ConfigError(
            f"{source}: settings.file_existence_policy must be one of {', '.join(FILE_EXISTENCE_POLICIES)}, "
            f"found {policy!r}"
        )
    skip_invalid = coerce_value(settings.get("skip_invalid", False), bool, f"{source}: settings.skip_invalid")
    for key in ("processing_batch_size", "raw_samples_queue_size", "processed_samples_queue_size"):
        if key in settings:  # (no effect, but a value Modalities would refuse is refused here too)
            coerce_value(settings[key], int, f"{source}: settings.{key}")

    def text(section: dict, key: str, where: str, default: str | None = None) -> str:
        """A non-empty string setting (a path, a pattern, a token): YAML gives None for an empty value."""
        value = coerce_value(section.get(key, default), str, f"{source}: {where}")
        if not value.strip():
            raise ConfigError(f"{source}: {where} is empty")
        if key in ("dst_path", "index_path") and value.endswith(("/", os.sep)):
            raise ConfigError(f"{source}: {where} must be the path of a file to write, found the folder path "
                              f"{value!r}")
        return value

    return PackJob(
        src_path=Path(text(settings, "src_path", "settings.src_path")),
        dst_path=Path(text(settings, "dst_path", "settings.dst_path")),
        tokenizer_path=Path(text(tcfg, "pretrained_model_name_or_path",
                                 "tokenizer.config.pretrained_model_name_or_path")),
        jq_pattern=text(settings, "jq_pattern", "settings.jq_pattern", ".text"),
        eod_token=text(settings, "eod_token", "settings.eod_token"),
        index_path=(Path(text(settings, "index_path", "settings.index_path"))
                    if settings.get("index_path") is not None else None),
        num_cpus=num_cpus,
        skip_invalid=skip_invalid,
        file_existence_policy=policy,
        special_tokens=tuple(special_tokens),
    )


def _library_encoder(tokenizer):
    """encode_batch through the `tokenizers` library, returning flat ids and per-text counts."""
    import numpy as np

    lib = tokenizer.library()

    def encode(texts: list[str]):
        encodings = lib.encode_batch(texts, add_special_tokens=True)
        counts = np.fromiter((len(e.ids) for e in encodings), dtype=np.uint64, count=len(encodings))
        ids = np.fromiter(
            itertools.chain.from_iterable(e.ids for e in encodings), dtype=np.uint32, count=int(counts.sum())
        )
        return ids, counts

    return encode


def load_or_build_index(src: Path, index_path: Path | None, num_cpus: int, skip_invalid: bool, show_progress):
    """Offsets and lengths of src's documents, and the invalid lines skipped while indexing: read from
    index_path, or built (and saved there if given)."""
    from fastlm.data.pbin import read_raw_index
    from fastlm.index import build_index

    if index_path is not None and index_path.exists():
        return (*read_raw_index(index_path, src), 0, [])
    result = build_index(src, index_path, num_cpus, skip_invalid, show_progress, return_arrays=True)
    return result["offsets"], result["lengths"], result["skipped_lines"], result["first_skipped"]


def check_index_covers(src: Path, index_path: Path, offsets, scan: dict, skip_invalid: bool) -> None:
    """ValueError when an index read from disk leaves out a document of src: a line that holds a JSON
    object (an index of an older, shorter version of the file, or of another file) or, unless invalid
    lines are to be skipped, an invalid line (an index built with --skip-invalid). Packing would drop
    those lines without a word. scan: `scan_lines(src)`."""
    import numpy as np

    if not np.isin(offsets, scan["offsets"]).all():
        return  # an entry that is no valid line's start: the packer names it, more precisely than this
    left_out = ~np.isin(scan["offsets"], offsets)
    hint = (f"HINT: regenerate it with `fastlm data create_raw_index --file_existence_policy override "
            f"--index_path {index_path} {src}`, or point index_path at the index of this file")
    if left_out.any():
        at = int(scan["offsets"][np.flatnonzero(left_out)[0]])
        with open(src, "rb") as f:
            line = f.read(at).count(b"\n") + 1
        raise ValueError(f"{index_path}: the index leaves out {int(left_out.sum()):,} of the "
                         f"{len(scan['offsets']):,} documents of {src}, the first at line {line}: it is the "
                         f"index of another version of the file, or of another file. {hint}")
    # every valid line is indexed (above); entries beyond those are invalid lines (an entry that starts no
    # line is the packer's error), so fewer entries than lines means some invalid ones were left out
    invalid_indexed = len(offsets) - len(scan["offsets"])
    if scan["skipped_lines"] > invalid_indexed and not skip_invalid:
        first_line, why = scan["first_skipped"][0]
        raise ValueError(
            f"{index_path}: the index leaves out {scan['skipped_lines'] - invalid_indexed:,} invalid line(s) "
            f"of {src} (the first invalid one, line {first_line}: {why}); it was built with --skip-invalid, "
            f"and packing would drop them without a word. Pack with --skip-invalid (settings.skip_invalid: "
            f"true) as well, or fix the lines")


def scan_lines(src: Path, num_cpus: int) -> dict:
    """The valid lines of src (offsets, byte lengths) and its invalid ones: one native scan, as fast as
    `wc -l`, that the checks of an index read from disk share."""
    from fastlm.index import build_index

    return build_index(src, None, num_cpus, True, False, return_arrays=True)


def lengths_from_file(src: Path, index_path: Path, offsets, lengths, mismatch: str, lines: dict):
    """Byte lengths for an index whose documents do not all end at line ends (the packer found one: see
    `mismatch`), taken from the JSONL; each indexed offset must start a valid line of it.

    Modalities' indexer reads the file in text mode: its offsets are bytes, but its lengths count characters
    (fewer than bytes on a line with non-ASCII text) and leave out the \\r of a CRLF line end. Such an index
    is read this way, with a note on stderr; an index whose offsets do not fit the file is an error naming
    the first entry that does not.
    """
    import numpy as np

    mismatch = mismatch.removeprefix(f"{src}: ")  # the packer's message names the JSONL first
    line_offsets = lines["offsets"]
    at = np.searchsorted(line_offsets, offsets)  # where each indexed offset falls among the line starts
    starts_line = at < len(line_offsets)
    starts_line[starts_line] = line_offsets[at[starts_line]] == offsets[starts_line]
    if not starts_line.all():
        i = int(np.flatnonzero(~starts_line)[0])
        raise ValueError(
            f"{index_path}: entry {i} (offset {offsets[i]}) is not the start of a valid JSON line of {src}, "
            f"and {mismatch}: the index does not fit this file. HINT: point index_path at the index of "
            f"this file, or regenerate it with `fastlm data create_raw_index --file_existence_policy "
            f"override --index_path {index_path} {src}`")
    byte_lengths = lines["lengths"][at]
    print(f"note: {index_path}: {int((byte_lengths != lengths).sum()):,} of {len(offsets):,} documents "
          f"do not end at a line end of {src}; their byte lengths were taken from the file (an index "
          f"written in text mode, such as Modalities', counts characters and drops the \\r of CRLF "
          f"line ends)",
          file=sys.stderr)
    return byte_lengths


def pack(job: PackJob, show_progress: bool | None = None) -> dict:
    """Run a pack job; returns the summary (documents, tokens, token_size, seconds, ...)."""
    from fastlm.tokenizer import Tokenizer

    if not job.src_path.is_file():
        raise missing_file(job.src_path, "source JSONL file")
    tokenizer_file = Path(job.tokenizer_path)
    if tokenizer_file.is_dir():  # (a folder: the file in it is what is read)
        tokenizer_file = tokenizer_file / "tokenizer.json"
    inputs = {"the source JSONL file": job.src_path, "the tokenizer": tokenizer_file,
              "the raw index": job.index_path}
    for what, path in inputs.items():  # (an override would destroy the input before reading it)
        if path is not None and same_file(path, job.dst_path):
            raise ValueError(f"{job.dst_path}: the output .pbin would replace {what}; expected another "
                             f"path for dst_path")
    job.num_cpus = capped_threads(job.num_cpus, usable_cpus(), "num_cpus")
    if not should_write(job.dst_path, job.file_existence_policy):
        return {"skipped": True, "dst_path": str(job.dst_path)}
    t0 = time.perf_counter()
    tokenizer = Tokenizer(job.tokenizer_path)
    eod_id = tokenizer.token_to_id(job.eod_token)
    if eod_id is None:
        raise ConfigError(
            f"eod_token {job.eod_token!r} is not in the vocabulary of {tokenizer.path} "
            f"(it has {tokenizer.max_id + 1:,} ids)"
        )
    special = {t["content"] for t in tokenizer.added_tokens if t.get("special")}
    for token in job.special_tokens:
        if token not in special:
            # Modalities adds it to the tokenizer, which then matches it whole before splitting the text
            raise ConfigError(
                f"tokenizer.config.special_tokens lists {token!r}, which is not a special token of "
                f"{tokenizer.path}; adding it would change how texts are split. fastlm packs with the "
                f"tokenizer.json as it is: add {token!r} to its added_tokens (special: true), or drop it "
                f"from the config")
    index_from_disk = job.index_path is not None and job.index_path.exists()
    # an index built on the fly for a pack that then fails goes too, with the folders made for it: a failed
    # pack writes nothing
    index_folders = missing_folders(job.index_path) if job.index_path is not None else []
    try:
        return _pack_indexed(job, tokenizer, eod_id, index_from_disk, show_progress, t0)
    except BaseException:
        if job.index_path is not None and not index_from_disk:
            discard(job.index_path, index_folders)
        raise


def _pack_indexed(job: PackJob, tokenizer, eod_id: int, index_from_disk: bool, show_progress,
                  t0: float) -> dict:
    """pack() once its inputs are checked: index (read or built), then pack."""
    from fastlm import _C

    offsets, lengths, index_skipped, index_first_skipped = load_or_build_index(
        job.src_path, job.index_path, job.num_cpus, job.skip_invalid, show_progress
    )
    lines = scan_lines(job.src_path, job.num_cpus) if index_from_disk else None  # (a built index fits)
    if lines is not None:
        check_index_covers(job.src_path, job.index_path, offsets, lines, job.skip_invalid)
        # invalid lines that an index built with --skip-invalid left out never reach the packer: they are
        # reported as skipped here (the packer reports the invalid lines the index does hold)
        index_skipped = max(0, lines["skipped_lines"] - (len(offsets) - len(lines["offsets"])))
        if index_skipped:  # (the first of them are among the scan's first invalid lines)
            index_first_skipped = list(lines["first_skipped"])
    if tokenizer.native:
        bpe, encoder = tokenizer.native_encoder(), None
    else:
        os.environ.setdefault("RAYON_NUM_THREADS", str(job.num_cpus))
        bpe, encoder = None, _library_encoder(tokenizer)
    t_pack = time.perf_counter()

    def pack_with(lengths) -> dict:
        bar = progress_bar(int(lengths.sum()) + len(lengths), "pack", show_progress)
        try:
            with atomic_output(job.dst_path) as tmp:
                packed = _C.pack_jsonl(
                    str(job.src_path), tmp, offsets, lengths, job.jq_pattern, eod_id, tokenizer.token_size,
                    job.num_cpus, job.skip_invalid, bpe=bpe, encoder=encoder, progress=bar,
                )
                if packed["documents"] == 0 and packed["skipped"] + index_skipped > 0:
                    # (raised inside: the temporary file is removed, nothing is written)
                    first = sorted(packed["first_skipped"] + index_first_skipped)[:1]
                    why = f"; line {first[0][0]}: {first[0][1]}" if first else ""
                    raise ValueError(
                        f"{job.src_path}: every line was skipped as invalid{why}; nothing was written. "
                        f"HINT: check settings.jq_pattern ({job.jq_pattern}) against the file's keys")
                return packed
        finally:
            if bar is not None:
                bar.close()

    try:
        result = pack_with(lengths)
    except _C.IndexMismatch as mismatch:
        if not index_from_disk:  # an index fastlm just built fits by construction: a real error
            raise
        lengths = lengths_from_file(job.src_path, job.index_path, offsets, lengths, str(mismatch), lines)
        result = pack_with(lengths)
    t_end = time.perf_counter()
    seconds, pack_seconds = t_end - t0, t_end - t_pack
    # lines skipped while indexing on the fly count too (they never reach the packer)
    result["invalid_lines"] = result.pop("skipped") + index_skipped
    first = {n: why for n, why in index_first_skipped + result["first_skipped"]}  # (a line once)
    result["first_skipped"] = sorted(first.items())[:10]
    result.update(
        skipped=False,
        dst_path=str(job.dst_path),
        token_size=tokenizer.token_size,
        seconds=seconds,
        setup_seconds=seconds - pack_seconds,  # tokenizer load and indexing
        pack_seconds=pack_seconds,
        mb_per_s=result["bytes_read"] / pack_seconds / 1e6,
        tokens_per_s=result["tokens"] / pack_seconds,
        tokenizer_path_used="native" if tokenizer.native else "tokenizers",
        tokenizer=tokenizer.describe(),
        threads=job.num_cpus,
    )
    return result


def format_summary(r: dict) -> str:
    if r.get("skipped"):
        return f"{r['dst_path']} exists; skipped (file_existence_policy: skip)"
    line = (
        f"packed {r['documents']:,} documents, {r['tokens']:,} tokens ({r['token_size']}-byte) into "
        f"{r['dst_path']} in {r['seconds']:.2f} s ({r['setup_seconds']:.2f} s tokenizer and index, "
        f"{r['pack_seconds']:.2f} s packing: {r['mb_per_s']:.1f} MB/s, "
        f"{r['tokens_per_s'] / 1e6:.2f} M tokens/s), "
        f"tokenizer: {r['tokenizer']}, {r['threads']} threads"
    )
    if r["invalid_lines"]:
        first = ", ".join(f"line {n} ({why})" for n, why in r["first_skipped"][:3])
        line += f"\nskipped {r['invalid_lines']:,} invalid line(s); first: {first}"
    return line


def build_parser() -> argparse.ArgumentParser:
    from fastlm.cli import add_pack_arguments

    p = argparse.ArgumentParser(prog="python -m fastlm.pack", description=__doc__.split("\n\n")[0])
    add_pack_arguments(p)
    return p


def job_from_args(args: argparse.Namespace) -> PackJob:
    if args.config:
        flags = [f for f in ("src", "dst", "tokenizer") if getattr(args, f)]
        if flags:
            raise ConfigError(f"give either a config file or --src/--dst/--tokenizer, "
                              f"not both (got --{flags[0]})")
        # what the config holds is set there: a flag that would be ignored is refused
        for attr, flag, key in (("index_path", "--index", "index_path"), ("jq_pattern", "--jq-pattern",
                                "jq_pattern"), ("eod_token", "--eod-token", "eod_token")):
            if getattr(args, attr) is not None:
                raise ConfigError(f"{flag} is given with the config file {args.config}; set settings.{key} "
                                  f"in that file instead (with a config, only --num-cpus, --skip-invalid, "
                                  f"--file_existence_policy and --quiet apply)")
        job = load_pack_config(args.config)
    else:
        missing = [f"--{f}" for f in ("src", "dst", "tokenizer") if not getattr(args, f)]
        if missing:
            raise ConfigError(f"without a config file, {', '.join(missing)} must be given")
        job = PackJob(src_path=Path(args.src), dst_path=Path(args.dst), tokenizer_path=Path(args.tokenizer),
                      jq_pattern=".text" if args.jq_pattern is None else args.jq_pattern,
                      eod_token="<|endoftext|>" if args.eod_token is None else args.eod_token,
                      num_cpus=usable_cpus(),
                      index_path=Path(args.index_path) if args.index_path else None)
    if args.num_cpus is not None:
        job.num_cpus = args.num_cpus
    if args.skip_invalid:
        job.skip_invalid = True
    if args.file_existence_policy:
        job.file_existence_policy = args.file_existence_policy
    return job


def run(args: argparse.Namespace) -> int:
    job = job_from_args(args)
    summary = pack(job, show_progress=False if args.quiet else None)
    print(format_summary(summary))
    if not summary.get("skipped") and not summary["documents"]:
        print(f"note: {job.src_path} holds no document; {job.dst_path} is an empty .pbin", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    from fastlm.cli import run_guarded

    args = build_parser().parse_args(argv)
    return run_guarded(run, args)


if __name__ == "__main__":
    sys.exit(main())
