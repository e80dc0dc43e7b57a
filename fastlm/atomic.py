"""Atomic outputs and the file-existence policy shared by every command that writes a file.

Every output is written under a temporary name in the destination's folder and renamed onto the
destination only once complete, so a crash, Ctrl-C or error never leaves a partial file behind.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from collections.abc import Iterator

FILE_EXISTENCE_POLICIES = ("error", "skip", "override")


def should_write(dst: Path, policy: str) -> bool:
    """Apply `--file_existence_policy` to `dst`: True to go on and write it, False to skip.

    Raises FileExistsError for policy "error" when `dst` exists, ValueError for an unknown policy.
    """
    if policy not in FILE_EXISTENCE_POLICIES:
        raise ValueError(
            f"file_existence_policy must be one of {', '.join(FILE_EXISTENCE_POLICIES)}, got {policy!r}"
        )
    if not dst.exists():
        return True
    if policy == "error":
        raise FileExistsError(
            f"{dst} already exists. HINT: pass --file_existence_policy override to replace it "
            f"or skip to keep it."
        )
    return policy == "override"


def temp_name(dst: Path) -> Path:
    """The temporary name used while `dst` is being written (same folder, so the rename is atomic)."""
    return dst.with_name(f".{dst.name}.tmp-{os.getpid()}")


@contextlib.contextmanager
def atomic_output(dst: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write; rename it onto `dst` on success, remove it on any failure."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(dst)
    try:
        yield tmp
        os.replace(tmp, dst)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
