"""Progress bars for the data commands: tqdm over input bytes, with docs/s and tokens/s.

`progress_bar` returns None when no bar is shown (stderr not a terminal, or asked to be quiet). A bar only
appears once its job has run for `SHOW_AFTER_S`: a job that ends sooner (indexing 200 MB takes ~0.1 s)
prints no bar that would flash and vanish, and never imports tqdm, whose import alone costs ~0.1 s (it
loads importlib.metadata). The native side calls the bar every ~0.1 s and checks for Ctrl-C each time.
"""

from __future__ import annotations

import sys
import time

SHOW_AFTER_S = 0.5


class ProgressBar:
    def __init__(self, total_bytes: int, desc: str, show_after_s: float = SHOW_AFTER_S, file=None):
        self.total_bytes, self.desc, self.show_after_s, self.file = total_bytes, desc, show_after_s, file
        self.start = time.perf_counter()
        self.bar = None  # the tqdm bar, once shown
        self.shown_bytes = 0

    def __call__(self, bytes_done: int, docs: int, tokens: int) -> None:
        dt = max(time.perf_counter() - self.start, 1e-9)
        if self.bar is None:
            if dt < self.show_after_s:
                return
            from tqdm import tqdm

            self.bar = tqdm(total=self.total_bytes, initial=bytes_done, unit="B", unit_scale=True,
                            desc=self.desc, dynamic_ncols=True, leave=False, file=self.file)
            self.bar.start_t -= dt  # elapsed time and rate count from the job's start, not the bar's
            self.shown_bytes = bytes_done
        self.bar.update(bytes_done - self.shown_bytes)
        self.shown_bytes = bytes_done
        rate = f"{docs / dt:,.0f} docs/s"
        if tokens:
            rate += f", {tokens / dt / 1e6:.2f} M tokens/s"
        self.bar.set_postfix_str(rate, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def progress_bar(total_bytes: int, desc: str, show: bool | None = None) -> ProgressBar | None:
    """A bar, or None. show=None: only when stderr is a terminal."""
    if show is None:
        show = sys.stderr.isatty()
    return ProgressBar(total_bytes, desc) if show else None
