"""The `fastlm` command, with the verbs of Modalities' CLI.

    fastlm data create_raw_index --index_path OUT.idx SRC.jsonl
    fastlm data pack_encoded_data CONFIG.yaml
    fastlm data inspect FILE.pbin [--tokenizer PATH]
    fastlm data merge_packed_data IN1.pbin IN2.pbin|FOLDER ... OUT.pbin
    fastlm run --config_file_path CONFIG.yaml [key=value ...]     (= python -m fastlm.train CONFIG.yaml)
        [--experiment_id ID] [--test_comm] [--error_log_folder PATH]    (Modalities' other run options)
    fastlm generate_text --config_file_path CONFIG.yaml [--checkpoint RUN_DIR]   (= python -m fastlm.generate)
    fastlm plot RUN_DIR

Start-up is cheap: argparse only; each verb imports what it needs when it runs (the data verbs never
import torch).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable

from fastlm.atomic import FILE_EXISTENCE_POLICIES


def positive_int(text: str) -> int:
    """argparse type of a thread count: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, found {text!r}")
    return value


def file_path(text: str) -> str:
    """argparse type of a file to write: a path that ends in a separator names a folder."""
    if text.endswith(("/", os.sep)):
        raise argparse.ArgumentTypeError(f"expected the path of a file to write, found the folder path "
                                         f"{text!r}")
    return text


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C's KeyboardInterrupt would be, so that it unwinds the same way: a
    temporary output is removed, nothing partial is left."""


def _terminate(signum, frame):
    raise Terminated()


def run_guarded(fn: Callable[[argparse.Namespace], int], args: argparse.Namespace,
                writes_files: bool = True) -> int:
    """Run a verb; bad input and I/O problems print one clear line (no traceback) and exit 1. SIGTERM and
    Ctrl-C stop it leaving no partial output (exit 143, 130). Set FASTLM_TRACEBACK=1 to see the traceback
    too."""
    import signal

    try:
        previous = signal.signal(signal.SIGTERM, _terminate)
    except ValueError:  # not the main thread: leave the handler alone
        previous = None
    try:
        return _run_verb(fn, args, writes_files)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _run_verb(fn: Callable[[argparse.Namespace], int], args: argparse.Namespace, writes_files: bool) -> int:
    try:
        status = fn(args)
        sys.stdout.flush()  # here, not at exit: a closed pipe must end in the handler below
        return status
    except BrokenPipeError:
        # the reader of the output went away (`fastlm data inspect X | head`): it has what it wanted. Exit
        # 0, as under `set -o pipefail` a status here would fail the pipeline, and point stdout at
        # /dev/null so that the interpreter's last flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt as stop:
        print("\ninterrupted" + (": no partial file was left (outputs are renamed into place only when "
                                  "complete)" if writes_files else ""), file=sys.stderr)
        return 143 if isinstance(stop, Terminated) else 130
    except (ValueError, OSError) as err:
        if os.environ.get("FASTLM_TRACEBACK"):
            import traceback

            traceback.print_exc()
        print(f"error: {err}", file=sys.stderr)
        return 1


def _create_raw_index(args: argparse.Namespace) -> int:
    from fastlm import usable_cpus
    from fastlm.atomic import capped_threads, missing_file, same_file, should_write
    from fastlm.index import build_index

    src = args.src_path
    dst = args.index_path or os.path.splitext(src)[0] + ".idx"
    if not os.path.isfile(src):
        raise missing_file(src, "source JSONL file")
    if same_file(src, dst):
        raise ValueError(f"--index_path {dst} is the source file itself; expected another path for the index")
    threads = capped_threads(args.num_cpus, usable_cpus(), "--num-cpus") if args.num_cpus else usable_cpus()
    if not should_write(dst, args.file_existence_policy):
        print(f"{dst} exists; skipped (file_existence_policy: skip)")
        return 0
    t0 = time.perf_counter()
    size = os.path.getsize(src)
    result = build_index(src, dst, threads, args.skip_invalid, False if args.quiet else None,
                         return_arrays=False)
    seconds = time.perf_counter() - t0
    print(
        f"indexed {result['documents']:,} documents of {src} ({result['lines']:,} lines, "
        f"{result['blank_lines']:,} blank, {result['skipped_lines']:,} invalid skipped) into {dst} "
        f"in {seconds:.2f} s ({size / max(seconds, 1e-9) / 1e6:.0f} MB/s)"
    )
    for line, why in result["first_skipped"][:5]:
        print(f"  skipped {src}:{line}: {why}")
    if not result["documents"]:
        print(f"note: {src} holds no document (no line that is a JSON object); the index is empty",
              file=sys.stderr)
    return 0


def _pack(args: argparse.Namespace) -> int:
    from fastlm import pack

    return pack.run(args)


def _inspect(args: argparse.Namespace) -> int:
    from fastlm.data.tools import inspect_packed

    print(inspect_packed(args.path, args.tokenizer))
    return 0


def merge_sources(sources: list[str], dst: str) -> list[str]:
    """The files a merge reads, in order: each source as given, a folder replaced by the .pbin files below it
    (as Modalities reads a folder; here in sorted order, so that the output is the same on every machine)."""
    from pathlib import Path

    if not Path(sources[0]).exists() and Path(dst).exists():
        # (the order of fastlm before 2026-11-27: the output first)
        raise FileNotFoundError(
            f"{sources[0]}: not found, and the output {dst} exists. HINT: merge_packed_data takes the files "
            f"to merge first and the output last, as Modalities does: fastlm data merge_packed_data "
            f"IN1.pbin IN2.pbin OUT.pbin")
    files = []
    for source in sources:
        if Path(source).is_dir():
            found = sorted(str(f) for f in Path(source).rglob("*.pbin") if f.is_file())
            if not found:
                raise FileNotFoundError(f"{source}: a folder with no .pbin file in it (searched with its "
                                        f"subfolders); expected .pbin files to merge")
            files += found
        else:
            files.append(source)
    return files


def _merge(args: argparse.Namespace) -> int:
    from fastlm.data.tools import merge_packed

    t0 = time.perf_counter()
    sources = merge_sources(args.sources, args.dst)
    if merge_packed(args.dst, sources, file_existence_policy=args.file_existence_policy) is None:
        print(f"{args.dst} exists; skipped (file_existence_policy: skip)")
    else:
        print(f"merged {len(sources)} files into {args.dst} in {time.perf_counter() - t0:.2f} s")
    return 0


def add_pack_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of `python -m fastlm.pack` and `fastlm data pack_encoded_data` (defined here, so that
    building the CLI does not import the packer)."""
    p.add_argument("config", nargs="?", help="pack config YAML (the tutorial's format)")
    p.add_argument("--src", help="JSONL file (one-off run without a config)")
    p.add_argument("--dst", type=file_path, help=".pbin file to write")
    p.add_argument("--tokenizer", help="tokenizer.json or a folder holding it")
    p.add_argument("--index", dest="index_path", type=file_path,
                   help="raw index of --src (built when missing)")
    p.add_argument("--jq-pattern", "--jq_pattern", help="field holding the text (default .text)")
    p.add_argument("--eod-token", "--eod_token", help="end-of-document token (default <|endoftext|>)")
    p.add_argument("--num-cpus", "--num_cpus", type=positive_int, default=None,
                   help="threads (default: all usable CPUs)")
    p.add_argument("--skip-invalid", "--skip_invalid", action="store_true", default=None,
                   help="skip invalid lines instead of stopping at the first")
    p.add_argument("--file_existence_policy", "--file-existence-policy", choices=FILE_EXISTENCE_POLICIES,
                   default=None, help="when dst exists: error (default), skip or override")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _run(args: argparse.Namespace) -> int:
    from fastlm.train import main as train_main

    if not (args.config or args.config_file_path):
        raise ValueError("fastlm run: a config file is required: fastlm run CONFIG.yaml [key=value ...] or "
                         "fastlm run --config_file_path CONFIG.yaml [key=value ...]")
    # (with the flag, a first positional is an override: python -m fastlm.train sorts that out)
    flag = ["--config_file_path", args.config_file_path] if args.config_file_path else []
    for option in ("experiment_id", "error_log_folder"):
        if getattr(args, option) is not None:
            flag += [f"--{option}", getattr(args, option)]
    flag += ["--test_comm"] if args.test_comm else []
    status = train_main([*flag, *([args.config] if args.config else []), *args.overrides])
    from fastlm import train

    if train.USED_PROCESS_GROUP:  # a rank of a multi-process run ends as python -m fastlm.train's do
        train.exit_process(status)
    return status


def _generate_text(args: argparse.Namespace) -> int:
    from fastlm.generate import main as generate_main

    return generate_main(["--config_file_path", args.config_file_path, "--interactive"]
                         + (["--checkpoint", args.checkpoint] if args.checkpoint else []))


def _plot(args: argparse.Namespace) -> int:
    from fastlm.plot import plot_run

    print(f"wrote {plot_run(args.run_dir, args.out)}")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse builds a help formatter for every argument it adds, and each asks the terminal for its
    width: ~40 system calls, ~8 ms of every command's start-up. Ask once (subparsers share the class)."""

    _width: int | None = None

    def _get_formatter(self):
        if _Parser._width is None:  # as shutil.get_terminal_size (which costs an import) finds it
            try:
                columns = int(os.environ["COLUMNS"])
            except (KeyError, ValueError):
                try:
                    columns = os.get_terminal_size(sys.__stdout__.fileno()).columns
                except (AttributeError, ValueError, OSError):
                    columns = 80
            _Parser._width = columns - 2
        return self.formatter_class(prog=self.prog, width=_Parser._width)


def _args_create_raw_index(p: argparse.ArgumentParser) -> None:
    p.add_argument("src_path", help="the JSONL file")
    p.add_argument("--index_path", "--index-path", type=file_path,
                   help="the .idx to write (default: SRC with .idx)")
    p.add_argument("--file_existence_policy", "--file-existence-policy", choices=FILE_EXISTENCE_POLICIES,
                   default="error", help="when the index exists: error (default), skip or override")
    p.add_argument("--skip-invalid", "--skip_invalid", action="store_true", help="skip invalid lines")
    p.add_argument("--num-cpus", "--num_cpus", type=positive_int, default=None,
                   help="threads (default: all usable)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _args_inspect(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="the .pbin file")
    p.add_argument("--tokenizer", help="tokenizer.json (or its folder) to decode the first document")


def _args_merge(p: argparse.ArgumentParser) -> None:
    # (Modalities' order: the inputs, then the output)
    p.add_argument("sources", nargs="+", metavar="SRC",
                   help="a .pbin file to merge, or a folder of them (read with its subfolders, sorted by "
                        "path); merged in the order given")
    p.add_argument("dst", type=file_path, metavar="DST", help="the .pbin to write")
    p.add_argument("--file_existence_policy", "--file-existence-policy", choices=FILE_EXISTENCE_POLICIES,
                   default="error", help="when DST exists: error (default), skip or override")


def add_modalities_run_options(p: argparse.ArgumentParser) -> None:
    """The options of Modalities' `run` besides the config (fastlm run takes them too)."""
    p.add_argument("--experiment_id", "--experiment-id", help="the run's name: its folder under "
                   "run.output_dir (= run.name=ID)")
    p.add_argument("--test_comm", "--test-comm", action="store_true",
                   help="test communication between the ranks (an all-reduce) before training")
    p.add_argument("--error_log_folder", "--error-log-folder", metavar="PATH",
                   help="on an error, write it as JSON to PATH's folder, one file per process: "
                        "<PATH's name>_<host>_<local rank>.log")


def _args_run(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="the run config (YAML), as python -m fastlm.train takes it")
    p.add_argument("--config_file_path", "--config-file-path", help="the run config (YAML), as Modalities "
                   "takes it")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. optim.lr=3e-4")
    add_modalities_run_options(p)


def _args_generate_text(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config_file_path", "--config-file-path", required=True, help="generation config (YAML)")
    p.add_argument("--checkpoint", help="the model, in place of the config's settings.model_path: a run "
                                        "folder, model.safetensors or a checkpoint folder")


def _args_plot(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="the run folder (holds metrics.jsonl)")
    p.add_argument("--out", help="the image to write: PNG, SVG or PDF by its suffix "
                                 "(default RUN_DIR/loss.png)")


_GROUPS = {"data": "index, pack, inspect and merge datasets"}
# (the words that name a verb, its help, what adds its arguments, what runs it), in the order of --help
_VERBS = [
    (("data", "create_raw_index"), "index the lines of a JSONL file (.idx)", _args_create_raw_index,
     _create_raw_index),
    (("data", "pack_encoded_data"), "tokenize a JSONL file into a .pbin", add_pack_arguments, _pack),
    (("data", "inspect"), "summarise a .pbin file", _args_inspect, _inspect),
    (("data", "merge_packed_data"), "concatenate .pbin files of the same tokenizer", _args_merge, _merge),
    (("run",), "train from a config (under torchrun for several processes)", _args_run, _run),
    (("generate_text",), "the interactive prompt: continue prompts with a checkpoint", _args_generate_text,
     _generate_text),
    (("plot",), "plot loss and throughput of a run folder to PNG", _args_plot, _plot),
]


def build_parser() -> argparse.ArgumentParser:
    """The whole command tree, for `fastlm --help`, `--version` and words that name no verb (the error then
    lists the choices)."""
    from fastlm import __version__

    parser = _Parser(prog="fastlm", description="fastlm: fast, sturdy LLM pretraining")
    parser.add_argument("--version", action="version", version=f"fastlm {__version__}")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    groups: dict[str, argparse._SubParsersAction] = {}
    for words, help_text, add_arguments, fn in _VERBS:
        container = verbs
        if len(words) == 2:
            group = words[0]
            if group not in groups:
                g = verbs.add_parser(group, help=_GROUPS[group])
                groups[group] = g.add_subparsers(dest=f"{group}_verb", required=True,
                                                 metavar=f"{group.upper()}_VERB")
            container = groups[group]
        p = container.add_parser(words[-1], help=help_text)
        add_arguments(p)
        p.set_defaults(fn=fn)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # A command that starts with a verb's words gets that verb's parser alone (same usage line, help and
    # errors as in the tree), not the three levels of parsers a tree needs to reach it.
    for words, help_text, add_arguments, fn in _VERBS:
        if tuple(argv[:len(words)]) == words:
            parser = _Parser(prog="fastlm " + " ".join(words), description=help_text)
            add_arguments(parser)
            # (intermixed: options may follow positionals, as in `run C k=v --experiment_id X`)
            args = parser.parse_intermixed_args(argv[len(words):])
            break
    else:
        args = build_parser().parse_args(argv)
        fn = args.fn
    return run_guarded(fn, args)


if __name__ == "__main__":
    sys.exit(main())
