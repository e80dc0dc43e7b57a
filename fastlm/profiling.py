"""Profile a window of training steps with torch.profiler (`logging.profile_steps: [FIRST, LAST]`).

Steps are numbered as in metrics.jsonl (the first step is 1). Rank 0 writes two files to the run folder:
profile.txt (wall time and GPU kernel time per step, then the operators and kernels that spend the most
time, per step) and trace.json (a Chrome / Perfetto trace of the window).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from fastlm.atomic import atomic_output


def _self_device_us(event) -> float:
    # torch renamed the CUDA fields to device fields; read whichever this version has
    return getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0) or 0.0


def _on_device(event) -> bool:
    """A kernel or copy that ran on the GPU. An operator (a host event) also carries the device time of
    the kernels it launched, and a GPU-side user annotation (e.g. "Optimizer.step#AdamW.step") spans
    kernels listed on their own: counting either with the kernels would count that time twice."""
    return event.device_type != torch.autograd.DeviceType.CPU and not event.is_user_annotation


def gpu_busy_us(events) -> float:
    """Microseconds in which at least one kernel or copy ran: the union of their intervals, so that
    kernels overlapping on several streams count once."""
    spans = sorted((e.time_range.start, e.time_range.end) for e in events if _on_device(e))
    busy, end = 0.0, float("-inf")
    for start, stop in spans:
        if stop <= end:
            continue
        busy += stop - max(start, end)
        end = stop
    return busy


class StepProfiler:
    def __init__(self, window: tuple[int, int] | None, run_dir: Path, device: torch.device, active: bool):
        self.window = window if active else None
        self.run_dir, self.device = run_dir, device
        self._prof = None
        self._t0 = 0.0
        # seconds per step measured without the profiler (note_step_time, e.g. from the last log window):
        # the profiler's own host overhead makes profiled steps slower, and a GPU that looks idle in the
        # window may be busy in a normal step
        self.unprofiled_step_s: float | None = None

    def note_step_time(self, seconds: float) -> None:
        """A step time measured without the profiler (ignored while the window is being profiled)."""
        if self._prof is None:
            self.unprofiled_step_s = seconds

    def before_step(self, step: int) -> None:
        """step: the number of the step about to run."""
        if self.window is None or self._prof is not None or step != self.window[0]:
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
            torch.cuda.synchronize(self.device)
        self._prof = torch.profiler.profile(activities=activities)
        self._prof.__enter__()
        self._first = step
        self._t0 = time.perf_counter()

    def after_step(self, step: int) -> None:
        """step: the number of the step just completed."""
        if self._prof is not None and step >= self.window[1]:
            self._finish(step)

    def close(self, step: int) -> None:
        """End of training (or an early stop) inside the window: write what was profiled."""
        if self._prof is not None:
            self._finish(step)

    def _finish(self, last: int) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        wall = time.perf_counter() - self._t0
        prof, self._prof = self._prof, None
        try:
            prof.__exit__(None, None, None)
            self._write(prof, last, wall)
        except Exception as err:  # a diagnostic must not end the training run that it watches
            print(f"fastlm: profiling steps {self._first}-{last} failed, training goes on: {err!r}",
                  file=sys.stderr, flush=True)

    def _write(self, prof, last: int, wall: float) -> None:
        n = max(1, last - self._first + 1)
        gpu = self.device.type == "cuda"
        averages = list(prof.key_averages())
        lines = [f"fastlm profile: steps {self._first}-{last} ({n} steps) on {self.device}",
                 f"wall time per step: {wall / n * 1e3:.2f} ms"]
        if gpu:
            busy_us = gpu_busy_us(prof.events())
            lines.append(f"GPU busy per step (a kernel or copy running): {busy_us / n / 1e3:.2f} ms "
                         f"({busy_us / 1e6 / wall:.0%} of wall time; the rest is the GPU idle, waiting for "
                         f"the host)")
        if self.unprofiled_step_s:
            # (the latest log window before this one: the first also holds compilation and autotuning)
            lines.append(f"unprofiled step time (before the window): {self.unprofiled_step_s * 1e3:.2f} ms"
                         + (f"; GPU busy time is {busy_us / n / 1e6 / self.unprofiled_step_s:.0%} of it"
                            if gpu else ""))
        if gpu:  # where the GPU's time goes, then where the host's goes (operators, with their kernels' time)
            kernels = sorted((e for e in averages if _on_device(e)), key=_self_device_us, reverse=True)
            lines += ["", "GPU kernels and copies", f"{'GPU ms/step':>16} {'calls/step':>10}  name"]
            lines += [f"{_self_device_us(e) / n / 1e3:16.3f} {e.count / n:10.1f}  {e.key[:120]}"
                      for e in kernels[:30]]
        operators = sorted((e for e in averages if e.device_type == torch.autograd.DeviceType.CPU),
                           key=lambda e: e.self_cpu_time_total, reverse=True)
        header = f"{'self CPU ms/step':>16} {'calls/step':>10}  name"
        lines += ["", "host operators" + (" (GPU: the kernels each launched itself)" if gpu else ""),
                  (f"{'GPU ms/step':>16} " if gpu else "") + header]
        lines += [(f"{_self_device_us(e) / n / 1e3:16.3f} " if gpu else "")
                  + f"{e.self_cpu_time_total / n / 1e3:16.3f} {e.count / n:10.1f}  {e.key[:120]}"
                  for e in operators[:30]]
        text = "\n".join(lines) + "\n"
        out, trace = self.run_dir / "profile.txt", self.run_dir / "trace.json"
        with atomic_output(out) as tmp, open(tmp, "w") as f:
            f.write(text)
        with atomic_output(trace) as tmp:
            prof.export_chrome_trace(tmp)
        print(f"fastlm: profiled steps {self._first}-{last}: {out} and {trace}", flush=True)
