"""Training throughput on one GPU: fastlm's loop (Triton attention, fused loss, per-block compile,
bf16) against a plain PyTorch loop of the same model (SDPA attention, torch cross-entropy, bf16 autocast,
fused AdamW), same batch, measured in the same run. fastlm runs as users start it: gpt60m as a plain
`python -m fastlm.train`, gpt124m under `torchrun --nproc_per_node 1` (one process: the single-device path,
bf16 autocast). With FASTLM_BENCH_OUT set, 5 steps of each loop after the measured ones are profiled into
its profile.txt, side by side. Then gpt60m with its compiled blocks replayed as CUDA graphs
(parallel.cuda_graphs), and gpt124m again with one of fastlm's parts switched back to the
baseline's (SDPA attention, torch cross-entropy, eager blocks), each against fastlm as configured: which
part gains or loses in this model. gpt124m also runs as its config ships (0.5 M tokens per step through
32 accumulated micro batches), the setting its MFU aim compares with. Last, gpt124m through the
multi-GPU path on one GPU (a one-rank process group, FSDP2 and DDP) against the single-device path: what
each data-parallel mode costs a rank's step.
Needs CUDA; without it, says so and skips.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT, record

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("training throughput needs a CUDA GPU (run benchmarks/device_check.sh on one)",
                allow_module_level=True)

STEPS, WARMUP = 60, 10  # fastlm: 5 measured windows of 10 steps after the first (compilation)
PROFILE = [STEPS + 1, STEPS + 5]  # then 5 profiled steps, outside the measured windows
MICRO = {"gpt60m": 16, "gpt124m": 16}
_DEFAULT_RATE: dict[str, float] = {}  # fastlm's own tokens/s per model, for the ablation below


@pytest.fixture(scope="module")
def synthetic_pbin(tmp_path_factory):
    """4 M random GPT-2 token ids in a .pbin (throughput does not depend on what the tokens say)."""
    from fastlm.data.pbin import write_packed

    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("data") / "random.pbin"
    docs = (np.append(rng.integers(0, 50256, 4095), 50256) for _ in range(1024))
    write_packed(path, docs, token_size=2)
    return path


def fastlm_run(name, data, out, launcher: str, steps: int, log: int, overrides=(),
               env: dict | None = None) -> list[dict]:
    """Train config `name` on `data` for `steps` steps under `launcher`, a record every `log` steps, no
    evaluation or checkpoints; returns the train records of its metrics.jsonl."""
    start = {"python": [sys.executable],
             "torchrun": [sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node", "1"]}
    cmd = [*start[launcher], "-m", "fastlm.train", str(ROOT / "configs" / f"{name}.yaml"),
           f"data.train_path={data}", "data.val_path=", f"run.output_dir={out}", f"target.steps={steps}",
           f"intervals.log={log}", f"batch.micro_batch_size={MICRO[name]}", "checkpoint.consolidated=false",
           "intervals.checkpoint=0", "checkpoint.keep_last=1", "logging.console=false", *overrides]
    subprocess.run(cmd, check=True, env=dict(os.environ, PYTHONUNBUFFERED="1", **(env or {})))
    records = [json.loads(x) for x in (out / name / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["event"] == "train"]


def fastlm_tokens_per_s(name, data, tmp_path, compile_blocks: bool, launcher: str, overrides=(),
                        profile: bool = True, env: dict | None = None) -> float:
    """fastlm's tokens/s at one micro batch per optimizer step (the baseline's batch): the median of the
    windows after the first, which compiles."""
    out = tmp_path / f"{name}-{compile_blocks}-{len(overrides)}-{len(env or ())}"
    train = fastlm_run(
        name, data, out, launcher, PROFILE[1] if profile else STEPS, WARMUP,
        ["batch.global_batch_tokens=0", "batch.grad_accum_steps=1",
         f"logging.profile_steps=[{PROFILE[0]}, {PROFILE[1]}]" if profile else "logging.profile_steps=[]",
         f"parallel.compile={str(compile_blocks).lower()}", *overrides], env)
    rates = [r["tokens_per_s"] for r in train if WARMUP < r["step"] <= STEPS]
    if profile:
        add_to_results_profile(out / name / "profile.txt",
                               f"training {name} ({', '.join((launcher, *overrides))})")
    return float(np.median(rates))


def add_to_results_profile(profile, title: str) -> None:
    """Append a run's profile.txt (where its step time goes) to the results' profile.txt, if both exist."""
    results = os.environ.get("FASTLM_BENCH_OUT")
    if results and profile.is_file():
        with open(os.path.join(results, "profile.txt"), "a") as f:
            f.write(f"\n=== {title} ===\n" + profile.read_text())


def baseline_tokens_per_s(name, data, tmp_path) -> tuple[float, object]:
    """The plain PyTorch loop a user would write for the same model."""
    from fastlm.config import load_config
    from fastlm.data.pbin import PackedFile
    from fastlm.model import GPT

    cfg = load_config(ROOT / "configs" / f"{name}.yaml", ["model.attention=sdpa", "model.loss=torch"]).model
    torch.manual_seed(0)
    model = GPT(cfg).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    tokens = torch.from_numpy(PackedFile(data).tokens[: 4_000_000].astype(np.int64))
    B, T = MICRO[name], cfg.sequence_length

    def step(i):
        start = (i * B * (T + 1)) % (len(tokens) - B * (T + 1))
        batch = tokens[start:start + B * (T + 1)].view(B, T + 1).cuda(non_blocking=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = model(batch[:, :-1], batch[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for i in range(WARMUP):
        step(i)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(STEPS - WARMUP):
        step(WARMUP + i)
    torch.cuda.synchronize()
    rate = (STEPS - WARMUP) * B * T / (time.perf_counter() - t0)
    if os.environ.get("FASTLM_BENCH_OUT"):  # the baseline's step profile, to set next to fastlm's
        from fastlm.profiling import StepProfiler

        out = tmp_path / f"baseline-{name}"
        out.mkdir(parents=True, exist_ok=True)
        profiler = StepProfiler((1, 5), out, torch.device("cuda"), active=True)
        profiler.note_step_time(B * T / rate)
        for i in range(5):
            profiler.before_step(i + 1)
            step(STEPS + i)
            profiler.after_step(i + 1)
        add_to_results_profile(out / "profile.txt", f"training {name}: the plain PyTorch baseline")
    return rate, model


@pytest.mark.parametrize("name, launcher", [("gpt60m", "python"), ("gpt124m", "torchrun")])
def test_training_throughput(name, launcher, synthetic_pbin, tmp_path):
    base, model = baseline_tokens_per_s(name, synthetic_pbin, tmp_path)
    base_mfu, _ = model.estimate_mfu(base)
    del model
    torch.cuda.empty_cache()
    fast = fastlm_tokens_per_s(name, synthetic_pbin, tmp_path, compile_blocks=True, launcher=launcher)
    _DEFAULT_RATE[name] = fast
    from fastlm.config import load_config
    from fastlm.model import GPT

    with torch.device("meta"):
        meta = GPT(load_config(ROOT / "configs" / f"{name}.yaml").model)
    mfu, why = meta.estimate_mfu(fast, "cuda")
    record(f"train {name}, 1 GPU ({launcher}), bf16, micro batch {MICRO[name]}", fast, "tokens/s",
           "plain PyTorch (SDPA, torch CE, eager)", base, bar=1.2, mfu=mfu, baseline_mfu=base_mfu,
           mfu_note=why)
    print(f"  MFU fastlm {mfu if mfu is None else f'{mfu:.1%}'} vs baseline "
          f"{base_mfu if base_mfu is None else f'{base_mfu:.1%}'} ({why})")


# The tutorial's model is bound by the host (on an H100 its GPU was busy 71% of a step, gpt124m's 93%):
# with parallel.cuda_graphs each compiled block's forward and backward replay as CUDA graphs. Against
# fastlm as configured (per-block compile, kernels launched one by one), from the row above.
@pytest.mark.parametrize("name", ["gpt60m"])
def test_cuda_graphs(name, synthetic_pbin, tmp_path):
    if name not in _DEFAULT_RATE:
        _DEFAULT_RATE[name] = fastlm_tokens_per_s(name, synthetic_pbin, tmp_path, True, "python",
                                                  profile=False)
    rate = fastlm_tokens_per_s(name, synthetic_pbin, tmp_path, True, "python",
                               ["parallel.cuda_graphs=true"])
    record(f"train {name}, 1 GPU (python), bf16, micro batch {MICRO[name]}, blocks replayed as CUDA graphs",
           rate, "tokens/s", "fastlm as configured (kernels launched one by one)", _DEFAULT_RATE[name])


# gpt124m as its config ships: 0.5 M tokens per optimizer step, 32 accumulated micro batches of 16 x 1024,
# as GPT-2 and llm.c train it (the run llm.c's ~40% MFU on an H100 comes from). The rows above step the
# optimizer after every micro batch, to compare like with like against the baseline loop; here AdamW, the
# gradient clip and the zeroing run once per 32 micro batches. Against fastlm at accumulation 1 from this
# run: what a real run gains over those rows.
ACCUM_STEPS, ACCUM_LOG = 8, 2  # steps of 32 micro batches (~1.2 s each on an H100); median of 3 windows


def test_gpt124m_as_shipped_with_accumulation(synthetic_pbin, tmp_path):
    name = "gpt124m"
    if name not in _DEFAULT_RATE:
        _DEFAULT_RATE[name] = fastlm_tokens_per_s(name, synthetic_pbin, tmp_path, True, "torchrun",
                                                  profile=False)
    train = fastlm_run(name, synthetic_pbin, tmp_path / "accumulation", "torchrun", ACCUM_STEPS, ACCUM_LOG,
                       ["logging.profile_steps=[]"])
    # the first window holds the compilation of every block; the step's batch must be the shipped one
    rates = [r["tokens_per_s"] for r in train if r["step"] > ACCUM_LOG]
    tokens_per_step = train[-1]["tokens"] // train[-1]["step"]
    assert tokens_per_step == 524288, f"expected the shipped 0.5 M tokens per step, got {tokens_per_step}"
    rate = float(np.median(rates))
    from fastlm.config import load_config
    from fastlm.model import GPT

    with torch.device("meta"):
        meta = GPT(load_config(ROOT / "configs" / f"{name}.yaml").model)
    mfu, why = meta.estimate_mfu(rate, "cuda")
    record(f"train {name}, 1 GPU (torchrun), as shipped: 0.5 M tokens/step = 32 x micro batch 16", rate,
           "tokens/s", "fastlm at accumulation 1 (optimizer step per micro batch)", _DEFAULT_RATE[name],
           mfu=mfu, mfu_note=why)
    print(f"  MFU fastlm {mfu if mfu is None else f'{mfu:.1%}'} ({why})")


# Where gpt124m's time goes, by switching one of fastlm's parts back to what the baseline uses, each run
# against fastlm as configured (a ratio > 1 means that part of fastlm is worth its place in this model).
ABLATIONS = {
    "attention SDPA (in compiled blocks)": (True, ["model.attention=sdpa"]),
    "torch cross-entropy (LM head not fused)": (True, ["model.loss=torch"]),
    "blocks not compiled": (False, []),
}


@pytest.mark.parametrize("what", list(ABLATIONS))
def test_gpt124m_ablation(what, synthetic_pbin, tmp_path):
    name = "gpt124m"
    if name not in _DEFAULT_RATE:  # run alone: measure fastlm as configured first
        _DEFAULT_RATE[name] = fastlm_tokens_per_s(name, synthetic_pbin, tmp_path, True, "python",
                                                  profile=False)
    compile_blocks, overrides = ABLATIONS[what]
    other = fastlm_tokens_per_s(name, synthetic_pbin, tmp_path, compile_blocks, "python", overrides,
                                profile=False)
    record(f"train {name}, 1 GPU, fastlm as configured vs with {what}", _DEFAULT_RATE[name], "tokens/s",
           f"fastlm with {what}", other)


# The multi-GPU path's cost per rank, on one GPU: torchrun with one process that joins a process group anyway
# (FASTLM_ONE_RANK_GROUP=1), FSDP2 (as the shipped configs) or DDP (parallel.fsdp=false), each against the
# single-device path (no process group). On one rank the collectives are local copies; what is left is what
# each mode adds to every rank's step (hooks, gathers, the optimizer over sharded tensors). The first H200
# run measured FSDP2 at 0.60x of a plain loop.
DATA_PARALLEL = {
    "FSDP2 per block, as configured (parallel.fsdp=true, reshard_after_forward=false)": [
        "parallel.fsdp=true"],
    "DDP (parallel.fsdp=false)": ["parallel.fsdp=false"],
}


@pytest.mark.parametrize("mode", list(DATA_PARALLEL))
def test_gpt124m_data_parallel_cost_per_rank(mode, synthetic_pbin, tmp_path):
    name = "gpt124m"
    if name not in _DEFAULT_RATE:
        _DEFAULT_RATE[name] = fastlm_tokens_per_s(name, synthetic_pbin, tmp_path, True, "torchrun",
                                                  profile=False)
    rate = fastlm_tokens_per_s(name, synthetic_pbin, tmp_path, True, "torchrun", DATA_PARALLEL[mode],
                               profile=False, env={"FASTLM_ONE_RANK_GROUP": "1"})
    record(f"train {name}, 1 GPU in a one-rank process group, {mode} vs the single-device path", rate,
           "tokens/s", "single device (no process group)", _DEFAULT_RATE[name])
