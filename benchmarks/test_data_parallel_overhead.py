"""What data parallelism costs a training step beyond the model's own work: fastlm's two modes, FSDP2
(`parallel.fsdp: true`, per block and root) and DDP (`parallel.fsdp: false`), each training gpt124m's
structure (12 blocks, its parameter list: learned positions, LayerNorm, GELU, biases) at width 64 and 32
tokens, so that the step is almost all framework work: hooks, parameter gathering, gradient reduction,
the optimizer over sharded or plain tensors. The real training loop under torchrun with one process on CPU
that joins a gloo process group anyway (FASTLM_ONE_RANK_GROUP=1): no network, but each collective is
still a gloo round trip on the host (FSDP2 issues about 38 a step, DDP a few), which NCCL would run as
asynchronous kernels; the rest is the Python work each rank does per step. The single-device path (no
process group) is printed next to them. Runs anywhere (no GPU needed).

On a GPU this host work runs ahead of the kernels and costs nothing while the host keeps ahead; a step
becomes host bound when it does not (a small model, a fast GPU). On one H200 gpt124m under FSDP2 over one
rank trained at 0.60x the speed of the same loop without it (benchmarks/results/h200-2026-11-26-first);
the training benchmark measures both modes on the GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, record

pytest.importorskip("torch")

# windows of 10 steps; the first (start-up, first-call work) is not counted, and each mode is timed by its
# fastest window: on a shared machine the others carry whatever else ran (the median moved by 1.7x
# between two runs on a 2-core machine; the minimum is what the step itself costs)
STEPS, LOG = 110, 10
TINY_GPT124M = ["model.n_embd=64", "model.n_head=2", "model.ffn_hidden=256", "model.vocab_size=512",
                "data.tokenizer_path=",  # (random ids below 512: no tokenizer to match)
                "model.sequence_length=32", "batch.micro_batch_size=1", "batch.global_batch_tokens=0",
                "batch.grad_accum_steps=1", "precision=fp32", "parallel.compile=false",
                "model.attention=sdpa", "model.loss=torch"]
MODES = {
    "single device (no process group)": [],
    "DDP (parallel.fsdp=false)": ["parallel.fsdp=false"],
    "FSDP2 (parallel.fsdp=true, reshard_after_forward=true)": ["parallel.fsdp=true",
                                                               "parallel.reshard_after_forward=true"],
    "FSDP2 (reshard_after_forward=false)": ["parallel.fsdp=true", "parallel.reshard_after_forward=false"],
}


@pytest.fixture(scope="module")
def small_vocab_pbin(tmp_path_factory):
    """Random documents over a 512-token vocabulary (what the tokens say does not matter here)."""
    from fastlm.data.pbin import write_packed

    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("data") / "random512.pbin"
    write_packed(path, (np.append(rng.integers(0, 511, 255), 511) for _ in range(256)), token_size=2)
    return path


def steps_per_s(mode: str, data, out) -> float:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
           "-m", "fastlm.train", str(ROOT / "configs" / "gpt124m.yaml"), *TINY_GPT124M, *MODES[mode],
           f"data.train_path={data}", "data.val_path=", f"run.output_dir={out}", "run.name=run",
           f"target.steps={STEPS}", f"intervals.log={LOG}", "intervals.eval=0", "intervals.checkpoint=0",
           "checkpoint.keep_last=1", "checkpoint.consolidated=false", "logging.console=false"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               FASTLM_ONE_RANK_GROUP="0" if not MODES[mode] else "1")
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, timeout=600)
    recs = [json.loads(x) for x in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    times = [r["step_time_s"] for r in recs if r["event"] == "train" and r["step"] > LOG]
    return 1.0 / min(times)


def test_data_parallel_step_overhead(small_vocab_pbin, tmp_path):
    rates = {mode: steps_per_s(mode, small_vocab_pbin, tmp_path / str(i)) for i, mode in enumerate(MODES)}
    _, ddp, fsdp, fsdp_keep = rates.values()  # (the single-device step is printed only)
    print("\nstep time: " + ", ".join(f"{mode} {1e3 / rate:.1f} ms" for mode, rate in rates.items()))
    what = "data-parallel training step, one CPU rank in a gloo group, gpt124m's 12 blocks at width 64"
    record(f"{what}: DDP vs FSDP2", ddp, "steps/s", "FSDP2 per block (reshard after forward)", fsdp)
    record(f"{what}: FSDP2 without resharding after forward vs with", fsdp_keep, "steps/s",
           "FSDP2 resharding after forward", fsdp)
