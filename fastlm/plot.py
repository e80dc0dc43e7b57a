"""`fastlm plot RUN_DIR`: a plot of train/val loss and throughput over steps, from metrics.jsonl (PNG by
default; `--out` picks the format by its suffix: .png, .svg, .pdf)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from fastlm.atomic import atomic_output


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """The train and eval records of a run, by step. A step logged twice (a run resumed from an earlier
    checkpoint repeats the steps after it) keeps its last record."""
    path = Path(run_dir) / "metrics.jsonl"
    if not Path(run_dir).is_dir():
        what = "is a file, not" if Path(run_dir).exists() else "no such"
        raise FileNotFoundError(f"{run_dir}: {what} run folder (a run's folder is run.output_dir/run.name, "
                                f"e.g. checkpoints/RUN)")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics.jsonl (is {run_dir} a fastlm run folder?)")
    last: dict[tuple[str, int], dict] = {}
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    for n, line in enumerate(lines, 1):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            if n == len(lines) and not text.endswith("\n"):  # a record cut short: the run was killed
                print(f"fastlm: note: {path}:{n}: skipped the last line, cut short (a killed run leaves "
                      f"that)", file=sys.stderr)
                break
            raise ValueError(f"{path}:{n}: not JSON ({err})") from None
        if rec.get("event") in ("train", "eval"):
            last[(rec["event"], rec["step"])] = rec

    def of(event):
        return sorted((r for (e, _), r in last.items() if e == event), key=lambda r: r["step"])

    return of("train"), of("eval")


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    train, evals = read_metrics(run_dir)
    if not train and not evals:
        raise ValueError(f"{run_dir / 'metrics.jsonl'}: no training or evaluation records to plot")
    out = Path(out) if out else run_dir / "loss.png"
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; expected the image file to write (.png, .svg or .pdf)")
    # a line through one point draws nothing: one record gets a marker
    marker = "o" if len(train) == 1 else None
    fig, (ax_loss, ax_speed) = plt.subplots(1, 2, figsize=(11, 4))
    if train:
        ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], marker=marker,
                     label="train loss")
    if evals:
        ax_loss.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label="val loss")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("loss")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    if train:
        ax_speed.plot([r["step"] for r in train], [r["tokens_per_s"] for r in train], marker=marker,
                      color="tab:green")
    else:
        ax_speed.text(0.5, 0.5, "no training records", ha="center", va="center", transform=ax_speed.transAxes)
    ax_speed.set_xlabel("step")
    ax_speed.set_ylabel("tokens/s")
    ax_speed.grid(alpha=0.3)
    fig.suptitle(f"fastlm run {run_dir.name}")
    fig.tight_layout()
    try:
        with atomic_output(out) as tmp:
            # the format from out's suffix: the temporary name does not end in it
            fig.savefig(tmp, dpi=110, format=out.suffix[1:] or "png")
    finally:
        plt.close(fig)
    return out
