"""Progress bars for the data commands: tqdm over input bytes, with docs/s and tokens/s.

`progress_bar` returns None when no bar is shown (stderr not a terminal, or asked to be quiet), so that
tqdm is not even imported then; the native side still checks for Ctrl-C between batches.
"""

from __future__ import annotations

import sys
import time


class ProgressBar:
    def __init__(self, total_bytes: int, desc: str):
        from tqdm import tqdm

        self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc=desc, dynamic_ncols=True, leave=False)
        self.start = time.perf_counter()
        self.last = 0

    def __call__(self, bytes_done: int, docs: int, tokens: int) -> None:
        self.bar.update(bytes_done - self.last)
        self.last = bytes_done
        dt = max(time.perf_counter() - self.start, 1e-9)
        rate = f"{docs / dt:,.0f} docs/s"
        if tokens:
            rate += f", {tokens / dt / 1e6:.2f} M tokens/s"
        self.bar.set_postfix_str(rate, refresh=False)

    def close(self) -> None:
        self.bar.close()


def progress_bar(total_bytes: int, desc: str, show: bool | None = None) -> ProgressBar | None:
    """A bar, or None. show=None: only when stderr is a terminal."""
    if show is None:
        show = sys.stderr.isatty()
    return ProgressBar(total_bytes, desc) if show else None
