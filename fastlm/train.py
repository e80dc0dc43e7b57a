"""Training: `torchrun --nproc_per_node N -m fastlm.train CONFIG [key=value ...]` (or plain `python -m
fastlm.train CONFIG` for one process; `fastlm run --config_file_path CONFIG` is the same).

One `main()` read top to bottom: set-up (config, processes, data, model, optimizer, resume), the loop
(accumulate, clip, step, log, evaluate, checkpoint), the end (final evaluation, checkpoint, consolidated
model). Runs on CPU with gloo as well as on GPUs with NCCL.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from fastlm import checkpoint as ckpt
from fastlm.atomic import atomic_output
from fastlm.cli import add_modalities_run_options
from fastlm.config import Config, derive, load_config, profile_window
from fastlm.data.datasets import PackedMemMapDatasetContinuous, PackedMemMapDatasetDocumentAligned
from fastlm.data.loader import BatchLoader, ResumableDistributedSampler, check_token_ids
from fastlm.model import GPT, resolve_attention, resolve_loss
from fastlm.parallel import Dist, check_communication, parallelize, setup_distributed, teardown_distributed
from fastlm.profiling import StepProfiler
from fastlm.yamlconf import ConfigError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def lr_at(step: int, cfg: Config, total_steps: int) -> float:
    """Linear warm-up to optim.lr, then cosine | linear | constant decay to schedule.min_lr."""
    peak, low, warm = cfg.optim.lr, cfg.schedule.min_lr, cfg.schedule.warmup_steps
    if step < warm:
        return peak * (step + 1) / warm
    if cfg.schedule.decay == "constant" or total_steps <= warm:
        return peak
    progress = min(1.0, (step - warm) / max(1, total_steps - warm))
    if cfg.schedule.decay == "linear":
        return peak - (peak - low) * progress
    return low + 0.5 * (peak - low) * (1 + math.cos(math.pi * progress))


def keep_freed_host_memory() -> bool:
    """Have glibc serve every allocation from its heap and keep what is freed, for training on CPU.

    Each step allocates and frees the same large tensors (the logits and their gradient: ~100 MB each for
    the getting-started CPU config). glibc maps allocations over 32 MB afresh and unmaps them when freed, so
    every step page-faults them in again: 4.8 M page faults and 14 s of system time in a 40-step run, at
    1,139 tokens/s. With mmap off (M_MMAP_MAX = 0) and freed memory kept (M_TRIM_THRESHOLD = 2 GB), the
    same run does 0.23 M faults at 2,534 tokens/s, with the same losses. Returns False where the C library
    is not glibc (nothing changed)."""
    import ctypes
    import platform

    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))


def make_deterministic() -> None:
    """run.deterministic: every choice that could differ between two runs is made without timing them.

    torch's deterministic algorithms (an op without one raises instead of running nondeterministically), a
    fixed cuBLAS workspace (needed for deterministic cuBLAS; set before its first use), cuDNN without
    benchmarking, inductor's deterministic mode (no on-device benchmarking that changes numerics), and
    fastlm's Triton kernels take a fixed configuration instead of the fastest one measured (the attention
    and cross-entropy kernels follow torch.are_deterministic_algorithms_enabled())."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    import torch._inductor.config as inductor_config

    if hasattr(inductor_config, "deterministic"):  # torch >= 2.8
        inductor_config.deterministic = True


def make_dataset(key: str, cfg: Config):
    """The dataset of data.train_path or data.val_path (`key`); errors name the key and the config."""
    path = getattr(cfg.data, key.rpartition(".")[2])
    if Path(path).is_dir():
        raise ConfigError(f"{cfg.source}: {key} names the folder {path}; expected a .pbin file (from fastlm "
                          f"data pack_encoded_data)")
    try:
        if cfg.data.dataset == "document_aligned":
            return PackedMemMapDatasetDocumentAligned(path, cfg.model.sequence_length)
        return PackedMemMapDatasetContinuous(path, cfg.model.sequence_length)
    except (OSError, ValueError) as err:
        raise ConfigError(f"{cfg.source}: {key}: {err}") from None


def check_tokenizer(cfg: Config) -> None:
    """data.tokenizer_path, when set, must be readable and fit the model: ids up to model.vocab_size."""
    if not cfg.data.tokenizer_path:
        return
    from fastlm.tokenizer import Tokenizer

    try:
        tokenizer = Tokenizer(cfg.data.tokenizer_path)
    except (OSError, ValueError) as err:
        raise ConfigError(f"{cfg.source}: data.tokenizer_path: {err}") from None
    if tokenizer.max_id >= cfg.model.vocab_size:
        raise ConfigError(f"{cfg.source}: the tokenizer of data.tokenizer_path ({cfg.data.tokenizer_path}) "
                          f"has ids up to {tokenizer.max_id:,} but model.vocab_size is "
                          f"{cfg.model.vocab_size:,}; expected at least {tokenizer.max_id + 1:,}")


class Logger:
    """Console (rank 0), metrics.jsonl and optional Weights & Biases. A resumed run first drops the records
    of metrics.jsonl after its checkpoint's step (written by the run it continues, after the checkpoint),
    so that each step is logged once."""

    def __init__(self, cfg: Config, run_dir: Path, d: Dist, steps: int, start_step: int, resumed: bool):
        self.cfg, self.d = cfg, d
        self.metrics = None
        self.wandb = None
        self.bar = None
        if not d.is_main:
            return
        if cfg.logging.metrics_file:
            path = run_dir / "metrics.jsonl"
            if resumed and path.is_file():
                drop_records_after(path, start_step)
            self.metrics = open(path, "a", encoding="utf-8")
        if cfg.logging.wandb_mode != "disabled":
            self.wandb = start_wandb(cfg, run_dir, resumed)
        if cfg.logging.console and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=steps, initial=start_step, desc="train", dynamic_ncols=True)

    def log(self, record: dict) -> None:
        if not self.d.is_main:
            return
        if self.metrics is not None:
            self.metrics.write(json.dumps(record) + "\n")
            self.metrics.flush()
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k not in ("event",)}, step=record["step"])
        if not self.cfg.logging.console:
            return
        if record["event"] == "train":
            text = (f"step {record['step']:>6} | loss {record['loss']:.4f} | lr {record['lr']:.2e} | "
                    f"grad {record['grad_norm']:.3f} | {record['tokens_per_s']:,.0f} tok/s"
                    + (f" | mfu {record['mfu'] * 100:.1f}%" if record.get("mfu") is not None else ""))
        elif record["event"] == "eval":
            text = (f"step {record['step']:>6} | val loss {record['val_loss']:.4f} "
                    f"| val ppl {record['val_ppl']:.2f}")
        elif record["event"] == "checkpoint":
            text = f"step {record['step']:>6} | checkpoint {record['path']}"
        else:
            text = json.dumps(record)
        if self.bar is not None:
            self.bar.set_postfix_str(text.split("| ", 1)[-1], refresh=False)
            self.bar.write(text)
        else:
            print(text, flush=True)

    def advance(self, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.metrics is not None:
            self.metrics.close()
        if self.wandb is not None:
            self.wandb.finish()


def drop_records_after(path: Path, step: int) -> None:
    """Rewrite metrics.jsonl (atomically) without the records of steps after `step`, and without lines that
    are not JSON (a record cut short by a crash: the resumed run's records would otherwise follow it, and
    the file would hold a broken line in its middle). Other JSON lines are kept as they are."""
    from fastlm.atomic import atomic_output

    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.splitlines()
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        rec_step = record.get("step") if isinstance(record, dict) else None
        if not (isinstance(rec_step, int) and rec_step > step):
            kept.append(line)
    if len(kept) == len(lines) and (not text or text.endswith("\n")):
        return
    with atomic_output(path) as tmp:
        Path(tmp).write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def start_wandb(cfg: Config, run_dir: Path, resumed: bool):
    """wandb is optional: a missing package or, online, a missing API key fails at start, not later."""
    try:
        import wandb
    except ImportError:
        raise ConfigError(
            f"{cfg.source}: logging.wandb_mode is {cfg.logging.wandb_mode} but wandb is not installed "
            f"(pip install wandb), or set logging.wandb_mode: disabled"
        ) from None
    if cfg.logging.wandb_mode == "online":
        if not os.environ.get("WANDB_API_KEY") and not wandb.api.api_key:
            raise ConfigError(
                f"{cfg.source}: logging.wandb_mode is online but no W&B API key is set (WANDB_API_KEY or "
                f"`wandb login`); use wandb_mode: offline to log without network"
            )
    # One W&B run per run folder: a resumed run continues the run whose id the folder keeps (offline: a new
    # offline-run folder with the same id, which `wandb sync` merges into that run)
    id_file = run_dir / "wandb_run_id"
    run_id = id_file.read_text(encoding="utf-8").strip() if resumed and id_file.is_file() else None
    run = wandb.init(project=cfg.logging.wandb_project, name=cfg.run.name, mode=cfg.logging.wandb_mode,
                     dir=cfg.logging.wandb_dir, config=config_dict(cfg), id=run_id or None, resume="allow")
    if run.id != run_id:
        from fastlm.atomic import atomic_output

        with atomic_output(id_file) as tmp:
            Path(tmp).write_text(run.id + "\n", encoding="utf-8")
    return run


def config_dict(cfg: Config) -> dict:
    out = asdict(cfg)
    out.pop("source", None)
    return out


def new_graph_step(cfg: Config) -> None:
    """With parallel.cuda_graphs, before each forward (a micro batch's, an evaluation batch's): tells
    torch.compile's CUDA graphs that the tensors they gave out before are no longer needed, so their
    replays may write over them (the loop keeps only the loss, which the graphs do not compute)."""
    if cfg.parallel.cuda_graphs:
        torch.compiler.cudagraph_mark_step_begin()


@torch.no_grad()
def evaluate(model, cfg: Config, d: Dist, val_dataset, autocast) -> tuple[float, int]:
    """Mean loss over the validation set (or its first eval_batches micro batches), split over ranks."""
    model.eval()
    micro = cfg.batch.micro_batch_size
    n = len(val_dataset)
    total_batches = -(-n // micro)
    if cfg.intervals.eval_batches:
        total_batches = min(total_batches, cfg.intervals.eval_batches)
    loss_sum = torch.zeros((), dtype=torch.float64, device=d.device)
    count = torch.zeros((), dtype=torch.float64, device=d.device)
    # Every rank runs the same number of forward passes (FSDP gathers parameters collectively); a rank
    # without a batch of its own in the last round re-runs batch 0 and counts nothing.
    for round_ in range(-(-total_batches // d.world_size)):
        b = round_ * d.world_size + d.rank
        weight = 1.0 if b < total_batches else 0.0
        b = b if b < total_batches else 0
        idx = range(b * micro, min(n, (b + 1) * micro))
        rows = np.stack([val_dataset[i][val_dataset.sample_key] for i in idx])
        check_token_ids(rows, idx, val_dataset, cfg.model.vocab_size)
        rows = torch.from_numpy(rows).to(d.device)
        new_graph_step(cfg)
        with autocast:
            _, loss = model(rows[:, :-1], rows[:, 1:])
        loss_sum += weight * loss.double() * rows[:, 1:].numel()
        count += weight * rows[:, 1:].numel()
    if d.enabled:
        dist.all_reduce(loss_sum)
        dist.all_reduce(count)
    model.train()
    return (loss_sum / count).item(), int(count.item())


def make_optimizer(model, cfg: Config) -> torch.optim.AdamW:
    """AdamW over the model's decay / no-decay groups. optim.fused: one kernel over all parameters, on
    CUDA and on CPU; otherwise foreach. (Left to itself, torch picks foreach on CUDA but a loop over the
    tensors on CPU: 3.6x slower than fused for the tiny config's parameters.)"""
    fused = cfg.optim.fused
    return torch.optim.AdamW(model.optimizer_groups(cfg.optim.weight_decay), lr=cfg.optim.lr,
                             betas=tuple(cfg.optim.betas), eps=cfg.optim.eps, fused=fused or None,
                             foreach=None if fused else True)


def optimizer_step(optimizer, scaler, params: list, grad_clip: float, skip_nonfinite: bool,
                   step_loss: torch.Tensor, keep_grads: bool = False) -> tuple[torch.Tensor, bool]:
    """Unscale (fp16), clip and apply the accumulated gradients, then zero them (in place with
    keep_grads, else they are freed). Returns the gradient norm and whether the step was applied.

    With skip_nonfinite, a step whose loss or gradient norm is not finite is dropped (a host sync per
    step). The fp16 scaler is updated on that path too: update() lowers the scale after the inf it saw, and
    without it the next step's unscale_() fails ("unscale_() has already been called"). Without
    skip_nonfinite nothing here syncs; the loop checks losses and norms once per log interval."""
    if scaler:
        scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip or float("inf"))
    if hasattr(grad_norm, "full_tensor"):
        grad_norm = grad_norm.full_tensor()
    applied = True
    if skip_nonfinite:
        # the norm is of the global gradient, the loss is this rank's: the ranks agree on the step
        finite = (torch.isfinite(step_loss) & torch.isfinite(grad_norm)).to(torch.int32)
        if dist.is_initialized():
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        applied = bool(finite.item())
    if not applied:
        if scaler:
            scaler.update()
    elif scaler:
        scaler.step(optimizer)  # skips the update itself when the unscaled gradients hold an inf
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=not keep_grads)
    return grad_norm, applied


def first_nonfinite(steps: list[int], losses: list[float], norms: list[float] | None,
                    total: int) -> str | None:
    """The message naming the first step of a log window whose loss or gradient norm (when `norms` is
    given) is not finite, or None when all are finite."""
    for i, step in enumerate(steps):
        if not math.isfinite(losses[i]):
            return f"loss is {losses[i]} at step {step} of {total}"
        if norms is not None and not math.isfinite(norms[i]):
            return (f"gradient norm is {norms[i]} at step {step} of {total} "
                    f"(the loss, {losses[i]:.4f}, is finite)")
    return None


def resume_path(cfg: Config, run_dir: Path) -> Path | None:
    """The checkpoint run.resume names: None, the newest of the run folder (auto) or a path, checked."""
    if cfg.run.resume == "auto":
        latest = ckpt.find_latest(run_dir)
        broken = ckpt.incomplete_checkpoints(run_dir)
        if latest is None and broken:
            # not a run that has yet to write its first checkpoint: starting over would overwrite these
            raise ConfigError(
                f"{cfg.source}: run.resume is auto but {ckpt.checkpoint_root(run_dir)} holds no complete "
                f"checkpoint, only {', '.join(p.name for p in broken)} (incomplete: no DCP .metadata or "
                f"train_state.json); remove them to start the run over, or resume another checkpoint with "
                f"run.resume=PATH")
        return latest
    if cfg.run.resume in ("none", ""):
        return None
    path = Path(cfg.run.resume)
    if not path.exists():
        raise FileNotFoundError(f"{cfg.source}: run.resume names {path}, which does not exist")
    if not ckpt.holds_checkpoint(path) and ckpt.checkpoint_root(path).is_dir():
        latest = ckpt.find_latest(path)
        raise ConfigError(
            f"{cfg.source}: run.resume names the run folder {path}, not a checkpoint; resume its newest "
            f"checkpoint with run.resume=auto (and run.output_dir/run.name naming that folder)"
            + (f" or run.resume={latest}" if latest else ""))
    return path


def remove_if_nothing_kept(run_dir: Path) -> None:
    """After a run that failed early: remove the run folder it made when the folder holds nothing but an
    empty metrics.jsonl (no record, checkpoint, model, profile or W&B id), so that the failed start leaves
    nothing behind."""
    if not run_dir.is_dir():
        return
    entries = list(run_dir.iterdir())
    if all(p.name == "metrics.jsonl" and p.is_file() and p.stat().st_size == 0 for p in entries):
        shutil.rmtree(run_dir, ignore_errors=True)


def make_run_dir(cfg: Config, run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"{cfg.source}: cannot make the run folder {run_dir} (run.output_dir "
                          f"{cfg.run.output_dir!r}, run.name {cfg.run.name!r}): "
                          f"{err.strerror or err}") from None


def check_fresh_run_dir(cfg: Config, run_dir: Path) -> None:
    """ConfigError when a run that does not resume would write into the folder of another run: its
    metrics.jsonl would mix the two runs and its checkpoints would sit beside the new ones."""
    held = []
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size > 0:
        held.append("metrics.jsonl")
    n = len(ckpt.complete_checkpoints(run_dir))
    if n:
        held.append(f"{n} checkpoint{'s' if n > 1 else ''}")
    if (run_dir / "model.safetensors").is_file():
        held.append("model.safetensors")
    if held:
        raise ConfigError(
            f"{cfg.source}: the run folder {run_dir} already holds a run ({', '.join(held)}) and run.resume "
            f"is {cfg.run.resume or 'none'!r}; continue it with run.resume=auto, start another with "
            f"run.name=NEW_NAME, or remove the folder")


# implementations of the same function: a GPU run may resume on CPU with another attention or loss
_SWAPPABLE_MODEL_KEYS = ("attention", "loss")


def check_resume(cfg: Config, state: dict, path: Path, steps: int) -> None:
    """ConfigError when the checkpoint cannot continue this run: a model section that differs from the
    one it was trained with (its shapes would not load, or would load into another model), or a step
    beyond the run's target."""
    saved = state.get("config")  # checkpoints of older fastlm versions have no config
    saved = saved.get("model") if isinstance(saved, dict) else None
    if isinstance(saved, dict):
        now = asdict(cfg.model)
        changed = [f"model.{key}: {saved[key]!r} in the checkpoint, {now[key]!r} now" for key in now
                   if key in saved and key not in _SWAPPABLE_MODEL_KEYS and saved[key] != now[key]]
        if changed:
            raise ConfigError(f"{cfg.source}: the model section differs from the one {path} was trained "
                              f"with: {'; '.join(changed)}")
    if state["step"] > steps:
        target = (f"target.steps {cfg.target.steps:,}" if cfg.target.steps
                  else f"{steps:,} steps from target.tokens {cfg.target.tokens:,}")
        raise ConfigError(f"{cfg.source}: {path} is at step {state['step']:,}, beyond the run's target "
                          f"({target}); raise the target to train on from it")


def schedule_change(cfg: Config, state: dict, step: int, steps: int) -> str | None:
    """A note when a resumed run trains to another number of steps than the checkpoint's run did: the
    warm-up and decay are laid over the new total, so the learning rate from here on is not the one the
    interrupted run would have used (None when it is the same total, or the checkpoint does not say)."""
    before = state.get("total_steps")
    if not isinstance(before, int) or before == steps or cfg.schedule.decay == "constant":
        return None
    old_lr, new_lr = lr_at(step, cfg, before), lr_at(step, cfg, steps)
    return (f"the checkpoint's run trained to {before:,} steps, this one to {steps:,}: the "
            f"{cfg.schedule.decay} schedule now runs over {steps:,} steps, so the learning rate at step "
            f"{step + 1:,} is {new_lr:.3g} where the interrupted run would have used {old_lr:.3g}")


def finish_at_target(cfg: Config, d: Dist, model, run_dir: Path, path: Path, step: int) -> int:
    """Resuming a checkpoint at the run's target: nothing to train, evaluate or log again. The consolidated
    model is written when the run folder lacks it, or holds one older than the checkpoint (a run stopped
    between its last checkpoint and the consolidated model, which may be an earlier run's)."""
    consolidated = run_dir / "model.safetensors"
    stale = (not consolidated.is_file()
             or consolidated.stat().st_mtime < (path / "train_state.json").stat().st_mtime)
    if d.enabled:  # rank 0's answer for all (writing it is collective)
        flag = torch.tensor([1 if stale else 0], device=d.device)
        dist.broadcast(flag, 0)
        stale = bool(flag.item())
    done = ""
    if cfg.checkpoint.consolidated and stale:
        ckpt.save_consolidated(run_dir, model, asdict(cfg.model))
        done = f"; wrote the consolidated model {consolidated}"
    if d.is_main:
        print(f"fastlm: {path} is at the run's target, step {step:,}: nothing to train{done}. Raise "
              f"target.steps (or target.tokens) to train on", flush=True)
    return 0


class StopRequest:
    """SIGTERM / SIGINT (preemption, Ctrl-C) ask for a checkpoint and a clean exit at the next check."""

    def __init__(self):
        self.requested = False
        self.signum = 0  # the last signal received
        self.previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.requested = True
        self.signum = signum

    def exit_status(self) -> int:
        """128 + the signal's number, as a shell reports a process the signal ended (130 for Ctrl-C, 143 for
        SIGTERM): the run did not reach its target, and `fastlm run ... && next` must not go on. A rank
        stopped because another one was signalled reports SIGTERM's."""
        return 128 + (self.signum or signal.SIGTERM)

    def agreed(self, d: Dist) -> bool:
        """True when any rank was signalled (a collective in distributed runs)."""
        if not d.enabled:
            return self.requested
        flag = torch.tensor([1.0 if self.requested else 0.0], device=d.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


USED_PROCESS_GROUP = False  # whether main() ran with a process group (see exit_process)


def write_error_log(where: str, err: BaseException) -> None:
    """Modalities' `run --error_log_folder PATH`: an exception that ends the run, as JSON, in PATH's folder
    named `<PATH's name>_<host>_<local rank>.log` (one file per process), with the process's place in the
    job: its rank, local rank, world size and host."""
    import socket
    import traceback

    host = socket.gethostname()
    env = {"rank": int(os.environ.get("RANK", -1)), "local_rank": int(os.environ.get("LOCAL_RANK", -1)),
           "world_size": int(os.environ.get("WORLD_SIZE", -1)), "hostname": host}
    record = {"environment": env, "error": {"error": str(err), "type": type(err).__name__,
                                            "stacktrace": traceback.format_exception(err)}}
    path = Path(where).parent / f"{Path(where).name}_{host}_{env['local_rank']}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp:
        Path(tmp).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        d = setup_distributed(cfg.run.device, cfg.source)
        global USED_PROCESS_GROUP
        USED_PROCESS_GROUP = USED_PROCESS_GROUP or d.enabled
        if args.test_comm:
            line = check_communication(d)
            if d.is_main:
                print(line, flush=True)
        run_dir = Path(cfg.run.output_dir) / cfg.run.name
        fresh = d.is_main and not run_dir.exists()
        try:
            return train(cfg, d)
        except BaseException:
            if fresh:
                remove_if_nothing_kept(run_dir)
            raise
        finally:
            teardown_distributed()
    except (ConfigError, FloatingPointError, FileNotFoundError, ValueError) as err:
        # bad input or a diverged run: one clear line, no traceback (FASTLM_TRACEBACK=1 shows it)
        import traceback

        if os.environ.get("FASTLM_TRACEBACK"):
            traceback.print_exc()
        print(f"error: {err}", file=sys.stderr, flush=True)
        if args.error_log_folder:
            write_error_log(args.error_log_folder, err)
        return 1
    except Exception as err:  # (a traceback follows: the log holds it too)
        if args.error_log_folder:
            write_error_log(args.error_log_folder, err)
        raise


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m fastlm.train",
                                description="Train a GPT from one YAML config.")
    p.add_argument("config", nargs="?", help="the run config (YAML)")
    p.add_argument("--config_file_path", "--config-file-path", dest="config_flag", help="same as CONFIG")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. optim.lr=3e-4")
    add_modalities_run_options(p)
    args = p.parse_intermixed_args(argv)
    if args.config_flag:
        if args.config:
            args.overrides.insert(0, args.config)
        args.config = args.config_flag
    if not args.config:
        p.error("a config file is required")
    if "=" in args.config:
        p.error(f"the first argument must be the config file, found the override {args.config!r}")
    if args.experiment_id is not None:
        if any(o.startswith("run.name=") for o in args.overrides):
            p.error(f"--experiment_id {args.experiment_id} and a run.name override both name the run; "
                    f"give one")
        args.overrides.append(f"run.name={json.dumps(args.experiment_id)}")  # (quoted: any text is a name)
    return args


def check_device(cfg: Config, d: Dist) -> None:
    """ConfigError, saying why, for a setting this run's device or processes cannot run: bf16/fp16 and the
    Triton kernels off CUDA, CUDA graphs off CUDA or with a process group."""
    if d.device.type != "cuda" and cfg.precision != "fp32":
        raise ConfigError(f"{cfg.source}: precision {cfg.precision} needs a CUDA device; "
                          f"set precision: fp32 on CPU")
    if d.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        for key, impl, choice in (("attention", resolve_attention(cfg.model, d.device), "sdpa"),
                                  ("loss", resolve_loss(cfg.model, d.device), "torch")):
            if impl in ("triton", "fused"):
                raise ConfigError(f"{cfg.source}: model.{key} is {impl}, whose Triton kernels need a CUDA "
                                  f"device, but this run is on {d.device.type}; set model.{key}: auto "
                                  f"({choice} off CUDA) or {choice}")
    if cfg.parallel.cuda_graphs and (d.device.type != "cuda" or d.enabled):
        where = (f"this run is on {d.device.type}" if d.device.type != "cuda" else
                 f"this run has a process group of {d.world_size} (FSDP's and DDP's hooks and collectives "
                 f"run between the blocks' kernels)")
        raise ConfigError(f"{cfg.source}: parallel.cuda_graphs needs one process on a CUDA device, but "
                          f"{where}; set parallel.cuda_graphs: false")


def train(cfg: Config, d: Dist) -> int:
    # ---- set-up ---------------------------------------------------------------------------------------
    check_device(cfg, d)
    dtype = DTYPES[cfg.precision]
    if cfg.run.deterministic:
        make_deterministic()
    if d.device.type == "cpu":
        keep_freed_host_memory()
    run_dir = Path(cfg.run.output_dir) / cfg.run.name
    torch.manual_seed(cfg.run.seed)

    check_tokenizer(cfg)
    train_set = make_dataset("data.train_path", cfg)
    val_set = make_dataset("data.val_path", cfg) if cfg.data.val_path else None
    derived = derive(cfg, d.world_size, len(train_set) * cfg.model.sequence_length)
    if d.is_main and cfg.schedule.warmup_steps >= derived.steps and cfg.schedule.decay != "constant":
        print(f"fastlm: note: schedule.warmup_steps ({cfg.schedule.warmup_steps:,}) is not below the run's "
              f"{derived.steps:,} steps: the learning rate rises to "
              f"{lr_at(derived.steps - 1, cfg, derived.steps):.3g} of optim.lr {cfg.optim.lr:g} and never "
              f"decays", flush=True)

    with torch.device("meta"):
        model = GPT(cfg.model)
    n_params = model.num_params()
    parallelize(model, cfg.parallel, d, dtype)
    model.to_empty(device=d.device)
    model.init_weights(seed=cfg.run.seed)
    model.train()
    use_fsdp = cfg.parallel.fsdp and d.mesh is not None
    data_parallel = "none" if d.mesh is None else "fsdp" if use_fsdp else "ddp"
    # without FSDP, mixed precision is autocast; with it, FSDP's policy casts parameters per block
    autocast = (torch.autocast(d.device.type, dtype=dtype) if dtype != torch.float32 and not use_fsdp
                else nullcontext())
    scaler = None
    if cfg.precision == "fp16":
        if use_fsdp:
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

            scaler = ShardedGradScaler()
        else:
            scaler = torch.amp.GradScaler("cuda")

    optimizer = make_optimizer(model, cfg)

    # the data position is samples of the global stream consumed; a step takes samples_per_step of this
    # run, which differs from the checkpoint's with another world size or batch shape
    samples_per_step = derived.grad_accum_steps * d.world_size * cfg.batch.micro_batch_size
    start_step, tokens_seen, start_position = 0, 0, 0
    resume_from = resume_path(cfg, run_dir)
    if resume_from is None and cfg.run.resume in ("none", ""):
        check_fresh_run_dir(cfg, run_dir)
    if resume_from is not None:
        state = ckpt.read_train_state(resume_from)
        check_resume(cfg, state, resume_from, derived.steps)
        try:
            ckpt.load(resume_from, model, optimizer)
        except ckpt.CheckpointFilesError as err:
            older = [p for p in ckpt.complete_checkpoints(run_dir) if p.name < resume_from.name]
            hint = f"; HINT: resume the checkpoint before it with run.resume={older[-1]}" if older else ""
            raise ckpt.CheckpointFilesError(f"{err}{hint}") from None
        start_step, tokens_seen = state["step"], state["tokens"]
        # checkpoints of older fastlm versions lack data_position: their step x this run's samples per step
        start_position = state.get("data_position", start_step * samples_per_step)
        if start_step == derived.steps:  # (check_resume refused a checkpoint beyond the target)
            return finish_at_target(cfg, d, model, run_dir, resume_from, start_step)
        note = schedule_change(cfg, state, start_step, derived.steps)
        if note and d.is_main:
            print(f"fastlm: note: {note}", flush=True)
    if d.is_main:  # (made once the config, the data and the checkpoint to resume have passed their checks)
        make_run_dir(cfg, run_dir)

    sampler = ResumableDistributedSampler(len(train_set), cfg.batch.micro_batch_size, d.world_size, d.rank,
                                          seed=cfg.run.seed, position=start_position)
    loader = BatchLoader(train_set, sampler, d.device, prefetch=2 if cfg.data.num_workers > 0 else 0,
                         vocab_size=cfg.model.vocab_size)

    if d.is_main:
        if cfg.logging.console:
            print(f"fastlm: config {cfg.source}: {json.dumps(config_dict(cfg))}", flush=True)
        attn, loss_impl = resolve_attention(cfg.model, d.device), resolve_loss(cfg.model, d.device)
        print(f"fastlm: {n_params:,} parameters | {d.world_size} x {d.device.type} | attention {attn}, loss "
              f"{loss_impl}, {cfg.precision}, data parallel {data_parallel}"
              f"{', deterministic' if cfg.run.deterministic else ''}\n"
              f"fastlm: {derived.tokens_per_step:,} tokens per step = micro batch "
              f"{cfg.batch.micro_batch_size} x sequence {cfg.model.sequence_length} x accumulation "
              f"{derived.grad_accum_steps} x world {d.world_size}; {derived.steps:,} steps, "
              f"{derived.total_tokens:,} tokens; train data {len(train_set):,} samples"
              + (f"; resuming from {resume_from} at step {start_step}, data position {start_position:,}"
                 if resume_from else ""), flush=True)

    # (resume=auto without a checkpoint starts at step 0: records of a run that died before its first
    # checkpoint are dropped too)
    logger = Logger(cfg, run_dir, d, derived.steps, start_step,
                    resumed=resume_from is not None or cfg.run.resume == "auto")
    stop = StopRequest()
    model_cfg = asdict(cfg.model)

    def save(step: int) -> None:
        position = start_position + (step - start_step) * samples_per_step  # skipped steps took data too
        state = {"step": step, "tokens": tokens_seen, "data_position": position,
                 "world_size": d.world_size, "config": config_dict(cfg), "total_steps": derived.steps}
        path = ckpt.save(run_dir, step, model, optimizer, state, cfg.checkpoint.keep_last)
        logger.log({"event": "checkpoint", "step": step, "path": str(path)})

    def run_eval(step: int) -> None:
        if val_set is None:
            return
        val_loss, n_tokens = evaluate(model, cfg, d, val_set, autocast)
        logger.log({"event": "eval", "step": step, "tokens": tokens_seen, "val_loss": val_loss,
                    "val_ppl": math.exp(min(val_loss, 50.0)), "val_tokens": n_tokens})

    profiler = StepProfiler(profile_window(cfg), run_dir, d.device, active=d.is_main)

    # the steps applied since the last log: their losses and gradient norms stay on the device until the
    # log (or a checkpoint) brings them to the host in one sync
    window_steps: list[int] = []
    window_losses: list[torch.Tensor] = []
    window_norms: list[torch.Tensor] = []

    def sync_window() -> tuple[list[float], list[float]]:
        """The window's losses (mean over ranks) and gradient norms on the host; FloatingPointError at the
        first step with a non-finite one. Under fp16 the grad scaler handles non-finite gradients itself
        (it skips the step and lowers the scale, routine in the first steps), so only losses count."""
        losses = torch.stack(window_losses).float()
        if d.enabled:
            dist.all_reduce(losses)
            losses /= d.world_size
        losses, norms = torch.stack([losses, torch.stack(window_norms).float()]).tolist()
        bad = first_nonfinite(window_steps, losses, norms if scaler is None else None, derived.steps)
        if bad:
            raise FloatingPointError(f"{bad}. HINT: lower optim.lr, check the data, or set "
                                     f"optim.skip_nonfinite: true to skip such steps")
        return losses, norms

    # ---- the loop -------------------------------------------------------------------------------------
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.parallel.cuda_graphs:
        # A parameter without a gradient takes the backward's output tensor as its .grad (autograd's
        # AccumulateGrad keeps it instead of copying). Out of a CUDA graph that tensor is the graph's
        # memory, which its next replay overwrites: with accumulation, the next micro batch would write
        # over the gradient summed so far (pytorch/pytorch#169545). Gradients that exist from the start,
        # zeroed in place after each step, take every backward's output by an in-place add instead.
        for p in params:
            p.grad = torch.zeros_like(p)
    # throughput: the steps since t_last (evaluations and checkpoints restart the clock)
    t_last, steps_timed, step = time.perf_counter(), 0, start_step
    if d.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(d.device)
    stopped_early = False
    try:
        while step < derived.steps:
            profiler.before_step(step + 1)
            lr = lr_at(step, cfg, derived.steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = torch.zeros((), device=d.device)
            for micro in range(derived.grad_accum_steps):
                last = micro == derived.grad_accum_steps - 1
                if d.mesh is not None and derived.grad_accum_steps > 1:
                    # reduce gradients (FSDP: reduce-scatter, DDP: all-reduce) once per step, not per micro
                    # batch (without accumulation both settings stay at their defaults: sync, reshard)
                    model.set_requires_gradient_sync(last)
                if use_fsdp and derived.grad_accum_steps > 1:
                    # without resharding after forward every block is gathered from the forward to the
                    # backward anyway: keep them gathered until the next micro batch's forward too (it then
                    # gathers nothing). The last backward reshards, so the optimizer updates the shards and
                    # the next step gathers what it wrote. With resharding, the memory it saves comes first.
                    model.set_reshard_after_backward(last or cfg.parallel.reshard_after_forward)
                x, y = loader.next()
                new_graph_step(cfg)
                with autocast:
                    _, loss = model(x, y)
                scaled = loss / derived.grad_accum_steps
                (scaler.scale(scaled) if scaler else scaled).backward()
                loss_sum += loss.detach()
            step_loss = loss_sum / derived.grad_accum_steps
            grad_norm, applied = optimizer_step(optimizer, scaler, params, cfg.optim.grad_clip,
                                                cfg.optim.skip_nonfinite, step_loss,
                                                keep_grads=cfg.parallel.cuda_graphs)
            step += 1
            steps_timed += 1
            if applied:
                window_steps.append(step)
                window_losses.append(step_loss)
                window_norms.append(grad_norm)
                tokens_seen += derived.tokens_per_step
            else:
                logger.log({"event": "skipped_step", "step": step, "loss": step_loss.item(),
                            "grad_norm": grad_norm.item()})
            logger.advance()
            profiler.after_step(step)

            at_log = step % cfg.intervals.log == 0 or step == derived.steps
            # A stop request is looked at after every step on one process (a flag) and at log steps across
            # ranks (a collective, and a host sync); one that comes at the target lets the run finish.
            stopping = step != derived.steps and (at_log or not d.enabled) and stop.agreed(d)
            if (at_log or stopping) and window_steps:  # (empty when every step of the window was skipped)
                losses, norms = sync_window()  # the one host sync of the log interval
                now = time.perf_counter()
                elapsed, t_last = now - t_last, now
                tok_s = steps_timed * derived.tokens_per_step / elapsed
                mfu, _ = model.estimate_mfu(tok_s / d.world_size, d.device)
                record = {"event": "train", "step": step, "tokens": tokens_seen,
                          "loss": sum(losses) / len(losses), "lr": lr, "grad_norm": norms[-1],
                          "tokens_per_s": tok_s, "tokens_per_s_per_device": tok_s / d.world_size,
                          "mfu": mfu, "step_time_s": elapsed / steps_timed}
                if d.device.type == "cuda":
                    record["peak_mem_gb"] = torch.cuda.max_memory_allocated(d.device) / 2**30
                logger.log(record)
                profiler.note_step_time(record["step_time_s"])
                window_steps, window_losses, window_norms, steps_timed = [], [], [], 0
            if stopping:
                stopped_early = True
                break
            if cfg.intervals.eval and step % cfg.intervals.eval == 0 and step != derived.steps:
                run_eval(step)
                t_last, steps_timed = time.perf_counter(), 0  # throughput counts training time only
            if cfg.intervals.checkpoint and step % cfg.intervals.checkpoint == 0 and step != derived.steps:
                if window_steps:  # between two logs: no checkpoint of a state a non-finite step made
                    sync_window()
                save(step)
                t_last, steps_timed = time.perf_counter(), 0
        # ---- the end ----------------------------------------------------------------------------------
        if stopped_early:
            save(step)
            if d.is_main:
                print(f"fastlm: stopped by a signal at step {step} of {derived.steps}; checkpoint saved, "
                      f"resume with run.resume=auto (exit status {stop.exit_status()})", flush=True)
            return stop.exit_status()
        run_eval(step)
        save(step)
        if cfg.checkpoint.consolidated:
            path = ckpt.save_consolidated(run_dir, model, model_cfg)
            if d.is_main:
                print(f"fastlm: done at step {step}; consolidated model in {path}", flush=True)
        if stop.requested and d.is_main:
            print(f"fastlm: a stop signal came in the run's last steps; the run finished (step {step})",
                  flush=True)
        return 0
    finally:
        profiler.close(step)
        stop.restore()
        loader.close()
        logger.close()


def exit_process(status: int) -> None:
    """End a training command's process with `status`. After a run with a process group, the Python exit
    handlers run and the interpreter's own teardown is skipped: on CPU/gloo a process of a finished
    multi-rank run aborted now and then in C++ destructors at interpreter exit (SIGABRT, "terminate called
    without an active exception", a few runs in a hundred), and torchrun then reported the run as failed
    and stopped the other ranks. Every file the run writes is closed by then."""
    if not USED_PROCESS_GROUP:
        sys.exit(status)
    import atexit

    sys.stdout.flush()
    sys.stderr.flush()
    atexit._run_exitfuncs()  # (inductor's compile workers, wandb, ...: what a normal exit would run)
    os._exit(status)


if __name__ == "__main__":
    exit_process(main())
