"""Building a raw JSONL index (.idx), shared by `fastlm data create_raw_index` and the packer when its
index file is missing. Light imports only: the indexing command starts fast."""

from __future__ import annotations

import os

from fastlm.atomic import atomic_output
from fastlm.progress import progress_bar


def build_index(src: str | os.PathLike, dst: str | os.PathLike | None, num_cpus: int, skip_invalid: bool,
                show_progress: bool | None, return_arrays: bool) -> dict:
    """Index `src` natively (progress bar, Ctrl-C honoured); with `dst`, write the .idx there atomically.
    Returns fastlm._C.build_raw_index's dict (offsets/lengths only when return_arrays)."""
    from fastlm import _C

    bar = progress_bar(os.path.getsize(src), "index", show_progress)
    try:
        if dst is None:
            return _C.build_raw_index(str(src), num_cpus, skip_invalid, bar, return_arrays=return_arrays)
        with atomic_output(dst) as tmp:
            return _C.build_raw_index(str(src), num_cpus, skip_invalid, bar, out_path=tmp,
                                      return_arrays=return_arrays)
    finally:
        if bar is not None:
            bar.close()
