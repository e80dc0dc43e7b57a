"""Training end to end on CPU: one process and torchrun with 2 gloo ranks, exact resume, checkpoints,
config errors, NaN detection, preemption, wandb offline."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest

from fastlm.config import ConfigError, derive, load_config

from conftest import MODALITIES, ROOT

TRAIN = MODALITIES / "lorem_ipsum_long.pbin"  # 335k GPT-2 tokens of repetitive text: learns fast
VAL = MODALITIES / "lorem_ipsum.pbin"
# a small, quick run of the tiny model: 4 x 32 tokens per micro batch
BASE = [
    f"data.train_path={TRAIN}", f"data.val_path={VAL}", "model.sequence_length=32",
    "batch.micro_batch_size=4", "intervals.log=1", "intervals.eval=0", "intervals.eval_batches=2",
    "schedule.warmup_steps=2", "logging.console=true", "checkpoint.keep_last=0",
]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def train(tmp_path, *overrides, ranks=1, check=True, name="run", torchrun=False):
    args = ["-m", "fastlm.train", str(ROOT / "configs" / "tiny.yaml"), *BASE, f"run.output_dir={tmp_path}",
            f"run.name={name}", *overrides]
    if ranks == 1 and not torchrun:
        cmd = [sys.executable, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port",
               str(29500 + os.getpid() % 1000), *args]
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)
    if check:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def losses(run_dir):
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["event"] == "train":
            out[rec["step"]] = rec["loss"]
    return out


@pytest.mark.parametrize("ranks", [1, 2])
def test_trains_checkpoints_and_resumes_exactly(tmp_path, ranks):
    # 3 eval batches: with 2 ranks one rank has no batch in the last round and must still take part
    train(tmp_path, "target.steps=12", "intervals.checkpoint=6", "intervals.eval=6",
          "intervals.eval_batches=3", ranks=ranks, name="full")
    full = tmp_path / "full"
    first = losses(full)
    assert sorted(first) == list(range(1, 13))
    assert first[12] < first[1] - 1.0, first  # the loss clearly falls
    records = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    assert any(r["event"] == "eval" and r["step"] == 6 for r in records)
    assert any(r["event"] == "eval" and r["step"] == 12 for r in records)
    ckpts = full / "checkpoints"
    assert (ckpts / "step_00000006" / ".metadata").is_file() and (ckpts / "step_00000012").is_dir()
    assert json.loads((ckpts / "latest").read_text()) == {"checkpoint": "step_00000012"}
    assert ((full / "model.safetensors").is_file()
            and json.loads((full / "model.json").read_text())["n_layer"] == 2)

    # resume from the middle checkpoint in a fresh run folder: the later losses are the same, bit for bit
    train(tmp_path, "target.steps=12", "intervals.checkpoint=6", f"run.resume={ckpts / 'step_00000006'}",
          ranks=ranks, name="resumed")
    again = losses(tmp_path / "resumed")
    assert sorted(again) == list(range(7, 13))
    assert all(again[s] == first[s] for s in range(7, 13)), (again, first)


def test_two_rank_checkpoint_loads_into_one_rank(tmp_path):
    train(tmp_path, "target.steps=4", "intervals.checkpoint=2", ranks=2, name="two")
    r = train(tmp_path, "target.steps=6", f"run.resume={tmp_path / 'two' / 'checkpoints' / 'step_00000004'}",
              name="one")
    assert "resuming from" in r.stdout
    assert sorted(losses(tmp_path / "one")) == [5, 6]


def test_torchrun_with_one_process_runs_the_single_device_path(tmp_path):
    # FSDP over one rank would shard nothing: torchrun --nproc_per_node 1 must train exactly like `python -m`
    train(tmp_path, "target.steps=4", name="plain")
    r = train(tmp_path, "target.steps=4", name="torchrun", torchrun=True)
    assert "| 1 x cpu |" in r.stdout and "fsdp False" in r.stdout, r.stdout[-2000:]
    assert losses(tmp_path / "torchrun") == losses(tmp_path / "plain")


def test_resume_auto_ignores_an_interrupted_checkpoint(tmp_path):
    train(tmp_path, "target.steps=4", "intervals.checkpoint=2", name="run")
    ckpts = tmp_path / "run" / "checkpoints"
    # a save killed mid-write leaves its temporary folder; the latest pointer still names step 4
    shutil.copytree(ckpts / "step_00000004", ckpts / ".step_00000006.tmp")
    (ckpts / ".step_00000006.tmp" / "train_state.json").unlink()
    # an incomplete folder with a final name (no .metadata) is not complete either
    (ckpts / "step_00000008").mkdir()
    (ckpts / "latest").write_text("{broken")
    r = train(tmp_path, "target.steps=6", "run.resume=auto", name="run")
    assert f"resuming from {ckpts / 'step_00000004'}" in r.stdout
    assert [s for s in losses(tmp_path / "run") if s > 4] == [5, 6]


def test_config_errors_are_clear(tmp_path):
    cfg = ROOT / "configs" / "tiny.yaml"
    with pytest.raises(ConfigError, match=r'unknown key "optim.lrr" \(did you mean "optim.lr"\?\)'):
        load_config(cfg, ["optim.lrr=1e-3"])
    with pytest.raises(ConfigError, match=r'unknown section "optm" \(did you mean "optim"\?\)'):
        load_config(cfg, ["optm.lr=1e-3"])
    with pytest.raises(ConfigError, match=r"optim.lr must be float, found 'fast'"):
        load_config(cfg, ["optim.lr=fast"])
    c = load_config(cfg, ["batch.global_batch_tokens=1000"])
    with pytest.raises(ConfigError, match=r"1,000\) is not divisible by micro_batch_size x sequence_length x "
                                          r"world_size = 8 x 64 x 2 = 1,024"):
        derive(c, world_size=2)
    c = load_config(cfg, ["batch.global_batch_tokens=4096", "batch.grad_accum_steps=3"])
    with pytest.raises(ConfigError, match=r"grad_accum_steps \(3\) disagrees with global_batch_tokens: "
                                          r"4,096 / \(8 x 64 x 2\) = 4"):
        derive(c, world_size=2)
    c = load_config(cfg, ["target.steps=1000"])
    with pytest.raises(ConfigError,
                       match=r"needs 1,000 steps x 512 tokens = 512,000 tokens but .* holds 100,000"):
        derive(c, world_size=1, train_tokens=100_000)
    r = train(tmp_path, "optim.lrr=1", check=False)
    assert r.returncode != 0 and 'did you mean "optim.lr"' in r.stderr
    for bad in ("[5, 2]", "[0, 3]", "[1, 2, 3]", "[a, 3]"):
        with pytest.raises(ConfigError, match=r"logging.profile_steps must be \[FIRST, LAST\] .* found \["):
            load_config(cfg, [f"logging.profile_steps={bad}"])


def test_profile_steps_write_a_summary_and_a_trace(tmp_path):
    train(tmp_path, "target.steps=5", "logging.profile_steps=[2, 3]", name="prof")
    run = tmp_path / "prof"
    text = (run / "profile.txt").read_text()
    assert text.startswith("fastlm profile: steps 2-3 (2 steps) on cpu"), text[:300]
    assert re.search(r"wall time per step: [0-9.]+ ms", text)
    assert "aten::" in text  # the operators the steps ran, per step
    assert json.loads((run / "trace.json").read_text())["traceEvents"]
    assert sorted(losses(run)) == [1, 2, 3, 4, 5]  # profiling changes nothing else
    assert not list(run.glob(".*tmp*")), "a temporary file was left behind"


def test_a_failing_profile_does_not_stop_training(tmp_path, monkeypatch, capsys):
    import torch

    from fastlm.profiling import StepProfiler

    prof = StepProfiler((1, 1), tmp_path, torch.device("cpu"), active=True)

    def broken(*args):
        raise RuntimeError("no trace for you")

    monkeypatch.setattr(prof, "_write", broken)
    prof.before_step(1)
    torch.ones(3).sum()
    prof.after_step(1)  # must not raise
    assert ("profiling steps 1-1 failed, training goes on: RuntimeError('no trace for you')"
            in capsys.readouterr().err)
    assert not list(tmp_path.iterdir())


GOLDEN = ROOT / "tests" / "data" / "golden_losses_tiny.json"


def test_losses_follow_the_golden_curve(tmp_path):
    """The tiny config's first 12 training losses and its validation loss on the lorem-ipsum data equal
    the recorded curve (torchtitan's habit): an unintended change to initialisation, data order, schedule,
    optimizer or the model's math shows here. fp32 on CPU, one thread. The tolerance, 1e-4 on losses of
    ~9-11, leaves room for BLAS kernels that round differently on another CPU; measured effects of real
    changes at step 12: the learning rate 1% higher moves the loss by 1.6e-2, another seed by 0.24 (weight
    decay 0.1 -> 0.11 moves it by only 2e-5, below the tolerance). After an intended change, rewrite the
    curve: FASTLM_UPDATE_GOLDEN=1 pytest tests/test_train.py -k golden, and say why in the commit."""
    train(tmp_path, "target.steps=12", "intervals.eval=12", name="golden")
    records = [json.loads(x) for x in (tmp_path / "golden" / "metrics.jsonl").read_text().splitlines()]
    got = {"train": [r["loss"] for r in records if r["event"] == "train"],
           "val": [r["val_loss"] for r in records if r["event"] == "eval"]}
    if os.environ.get("FASTLM_UPDATE_GOLDEN") == "1":
        GOLDEN.write_text(json.dumps(got, indent=1) + "\n")
    want = json.loads(GOLDEN.read_text())
    assert len(got["train"]) == len(want["train"]) == 12 and len(got["val"]) == len(want["val"]) == 1
    for kind in ("train", "val"):
        for step, (g, w) in enumerate(zip(got[kind], want[kind]), 1):
            assert abs(g - w) <= 1e-4, f"{kind} loss at step {step}: {g} vs the golden {w}"


def test_nonfinite_loss_stops_naming_the_step(tmp_path):
    r = train(tmp_path, "target.steps=3", "model.init_std=1e30", check=False)
    assert r.returncode != 0
    assert re.search(r"error: loss is (nan|inf) at step [123] of 3\. HINT", r.stderr), r.stderr[-2000:]
    assert "Traceback" not in r.stderr


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    cmd = [sys.executable, "-m", "fastlm.train", str(ROOT / "configs" / "tiny.yaml"), *BASE,
           f"run.output_dir={tmp_path}", "run.name=pre", "target.steps=500"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("step      2 |"):
            proc.send_signal(signal.SIGTERM)
            break
    out = "".join(seen) + proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out[-2000:]
    assert "stopped by a signal" in out
    saved = sorted(p.name for p in (tmp_path / "pre" / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert len(saved) == 1 and 2 <= int(saved[0][5:]) < 500


def test_wandb_offline_writes_its_run_folder(tmp_path):
    train(tmp_path, "target.steps=2", "logging.wandb_mode=offline", f"logging.wandb_dir={tmp_path}",
          name="wb")
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert runs and any(runs[0].rglob("*.wandb"))


def test_fastlm_run_and_plot_commands(tmp_path):
    exe = shutil.which("fastlm") or ""
    cmd = [exe] if exe else [sys.executable, "-m", "fastlm"]
    r = subprocess.run(cmd + ["run", "--config_file_path", str(ROOT / "configs" / "tiny.yaml"), *BASE,
                              f"run.output_dir={tmp_path}", "run.name=cli", "target.steps=3"],
                       capture_output=True, text=True, env=ENV)
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(losses(tmp_path / "cli")) == [1, 2, 3]
    r = subprocess.run(cmd + ["plot", str(tmp_path / "cli")], capture_output=True, text=True, env=ENV)
    assert r.returncode == 0, r.stderr[-2000:]
    png = (tmp_path / "cli" / "loss.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_cpu_training_keeps_freed_memory_for_the_next_step():
    """On CPU the train loop has glibc keep large freed blocks, so that a step reuses the previous step's
    pages for its logits and their gradient instead of page-faulting ~50,000 fresh ones in (see
    keep_freed_host_memory): counted on steps of the getting-started CPU config's LM head and loss."""
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("the allocator setting is glibc's")
    code = """if True:
        import resource, torch
        from fastlm.train import keep_freed_host_memory

        hidden, weight = torch.randn(512, 64), torch.randn(50304, 64, requires_grad=True)
        targets = torch.randint(0, 50304, (512,))

        def page_faults_of_steps(n):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            for _ in range(n):  # logits (512 x 50304 fp32: 103 MB), the loss and its gradient
                torch.nn.functional.cross_entropy(hidden @ weight.t(), targets).backward()
            return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

        page_faults_of_steps(4)
        default = page_faults_of_steps(12)
        assert keep_freed_host_memory()
        page_faults_of_steps(8)
        print(default, page_faults_of_steps(12))
    """
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    default, kept = map(int, out.split())
    assert default > 150_000, f"the default allocator was expected to fault pages in every step: {default}"
    # PyTorch's 64-byte-aligned allocations fragment glibc's heap a little, so now and then a block is fresh
    # for a while after the switch: counted over 4 steps, 0 to 27% of the default's faults in runs of this
    # test, settling to 0 a few rounds later. Over 12 steps after 8 of warm-up: 0 to 8% in 8 runs.
    assert kept <= default / 4, f"page faults of 12 steps: {kept} with freed memory kept, {default} without"


def test_deterministic_run_on_cpu_says_so_and_resumes_exactly(tmp_path):
    r = train(tmp_path, "run.deterministic=true", "target.steps=6", "intervals.checkpoint=3", name="full")
    assert ", deterministic" in r.stdout
    first = losses(tmp_path / "full")
    train(tmp_path, "run.deterministic=true", "target.steps=6",
          f"run.resume={tmp_path / 'full' / 'checkpoints' / 'step_00000003'}", name="resumed")
    again = losses(tmp_path / "resumed")
    assert sorted(again) == [4, 5, 6] and all(again[s] == first[s] for s in again), (again, first)


@pytest.mark.gpu
def test_gpu_deterministic_run_resumes_bit_for_bit(tmp_path):
    """On a GPU, run.deterministic makes a resumed run repeat the uninterrupted one exactly: Triton
    attention and fused loss, bf16, deterministic torch and cuBLAS, fixed kernel configs in each process."""
    gpu = ["run.device=cuda", "precision=bf16", "run.deterministic=true", "model.attention=triton",
           "model.loss=fused", "target.steps=8", "intervals.checkpoint=4"]
    r = train(tmp_path, *gpu, name="full")
    assert ("attention triton, loss fused, bf16" in r.stdout
            and ", deterministic" in r.stdout), r.stdout[-2000:]
    first = losses(tmp_path / "full")
    train(tmp_path, *gpu, f"run.resume={tmp_path / 'full' / 'checkpoints' / 'step_00000004'}", name="resumed")
    again = losses(tmp_path / "resumed")
    assert sorted(again) == [5, 6, 7, 8] and all(again[s] == first[s] for s in again), (again, first)
