"""Benchmark plumbing: every result is a measurement of fastlm next to its baseline from the same run (or,
marked measured_baseline=False, a quoted figure), printed as a ratio (again at the end of pytest's report)
and, when FASTLM_BENCH_OUT names a folder, saved there as JSON."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fastlm import usable_cpus

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "getting_started"
REDPAJAMA = EXAMPLE / "data" / "raw"
GPT2 = EXAMPLE / "tokenizer"

_RESULTS: list[dict] = []
_LINES: list[str] = []  # the printed comparisons, repeated in pytest's report (shown without -s too)


def pytest_terminal_summary(terminalreporter):
    if _LINES:
        terminalreporter.section("fastlm against its baselines")
        for line in _LINES:
            terminalreporter.write_line(line)
        if not os.environ.get("FASTLM_BENCH_OUT"):
            terminalreporter.write_line("(not saved: FASTLM_BENCH_OUT=benchmarks/results keeps them as JSON)")


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": usable_cpus(), "python": platform.python_version()}
    torch = sys.modules.get("torch")  # only when a benchmark used it: importing torch here costs seconds
    if torch is not None and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["torch"] = torch.__version__
    return info


def record(name: str, value: float, unit: str, baseline: str, baseline_value: float,
           higher_is_better: bool = True, bar: float | None = None, **extra) -> float:
    """Print and keep one comparison; returns fastlm's advantage (>1 means fastlm is better)."""
    ratio = value / baseline_value if higher_is_better else baseline_value / value
    verdict = ""
    if bar is not None:
        verdict = f"  [bar {bar:g}x: {'met' if ratio >= bar else 'NOT met'}]"
    line = (f"{name}: fastlm {value:,.4g} {unit} vs {baseline} {baseline_value:,.4g} {unit} "
            f"-> {ratio:.2f}x{verdict}")
    print("\n" + line)
    _LINES.append(line)
    _RESULTS.append({"name": name, "unit": unit, "fastlm": value, "baseline": baseline,
                     "baseline_value": baseline_value, "advantage": ratio, "bar": bar, **extra})
    _write_results()
    return ratio


def wall(cmd: list[str], repeat: int = 1, env: dict | None = None, cwd=None) -> float:
    """Best wall-clock seconds of `repeat` runs of a whole command (start-up included)."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env, cwd=cwd)
        best = min(best, time.perf_counter() - t0)
    return best


def gpu_kernel_times(step, reps: int = 10) -> dict[str, float]:
    """Microseconds of GPU time per call of `step`, by kernel name (torch.profiler, CUDA activity only):
    what the GPU spends, whatever the host's launch cost. Call after a warm-up."""
    import torch

    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            step()
        torch.cuda.synchronize()
    times = {}
    for event in prof.key_averages():
        # kernels and copies only: an annotation spans kernels that are listed on their own
        if event.device_type == torch.autograd.DeviceType.CPU or event.is_user_annotation:
            continue
        total = getattr(event, "device_time_total", 0) or getattr(event, "cuda_time_total", 0)
        if total > 0:
            times[event.key] = total / reps
    return times


_SESSION_FILE: list[Path] = []  # this session's JSON file, named at its first result


def _write_results() -> None:
    """(Re)write this session's results to FASTLM_BENCH_OUT after each one, so that a session cut short by
    a deadline (device_check.sh's timeouts) still leaves what it measured."""
    out = os.environ.get("FASTLM_BENCH_OUT")
    if not out or not _RESULTS:
        return
    Path(out).mkdir(parents=True, exist_ok=True)
    commit = os.environ.get("FASTLM_COMMIT", "")  # set by whoever copied the tree without its history
    if not commit:
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                    cwd=ROOT).stdout.strip()
        except OSError:
            pass
    stamp = datetime.datetime.now(datetime.timezone.utc)
    if not _SESSION_FILE:
        _SESSION_FILE.append(Path(out) / f"bench-{stamp:%Y%m%d-%H%M%S}.json")
    payload = {"date": stamp.isoformat(timespec="seconds"), "commit": commit, "machine": machine(),
               "results": _RESULTS}
    tmp = _SESSION_FILE[0].with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, _SESSION_FILE[0])


@pytest.fixture(scope="session")
def corpus_200mb(tmp_path_factory) -> Path:
    """The tutorial's train split repeated to about 200 MB (FASTLM_BENCH_MB to change)."""
    megabytes = int(os.environ.get("FASTLM_BENCH_MB", "200"))
    line_block = (REDPAJAMA / "redpajama_v2_samples_512_train.jsonl").read_bytes()
    path = tmp_path_factory.mktemp("corpus") / f"redpajama_x{megabytes}mb.jsonl"
    with open(path, "wb") as f:
        for _ in range(megabytes * 1_000_000 // len(line_block) + 1):
            f.write(line_block)
    return path
