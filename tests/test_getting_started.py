"""The getting-started tutorial end to end, from a copy of the example folder, with the tutorial's
commands and a cut-down training run: every artefact exists, the loss falls, the validation loss is
logged and generation returns text."""

import json
import os
import shutil
import subprocess
import sys

from conftest import EXAMPLE


def fastlm_cmd():
    exe = shutil.which("fastlm")
    return [exe] if exe else [sys.executable, "-m", "fastlm"]


def run(cmd, cwd):
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=900,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, f"{' '.join(map(str, cmd))}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
    return r


def test_tutorial_end_to_end(tmp_path):
    work = tmp_path / "getting_started"
    shutil.copytree(EXAMPLE, work, ignore=shutil.ignore_patterns("mem_map", "checkpoints", "wandb"))
    fl = fastlm_cmd()
    for split in ("train", "test"):
        run(fl + ["data", "create_raw_index",
                  "--index_path", f"data/mem_map/redpajama_v2_samples_512_{split}.idx",
                  f"data/raw/redpajama_v2_samples_512_{split}.jsonl"], work)
    for split in ("train", "test"):
        r = run(fl + ["data", "pack_encoded_data", f"example_dataset_config_{split}.yaml"], work)
        assert "native byte-level BPE" in r.stdout
    assert "tokens:          786,370" in run(fl + ["data", "inspect",
                                                  "data/mem_map/redpajama_v2_samples_512_train.pbin"],
                                            work).stdout

    # training, cut down to a few dozen steps; `fastlm run` is the tutorial's verb
    run(fl + ["run", "--config_file_path", "example_config_cpu.yaml", "target.steps=40", "intervals.log=5",
              "intervals.eval=20", "intervals.eval_batches=4", "intervals.checkpoint=20",
              "schedule.warmup_steps=5"], work)
    run_dir = work / "checkpoints" / "tiny_redpajama"
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["event"] == "train"]
    vals = [r["val_loss"] for r in records if r["event"] == "eval"]
    assert losses[-1] < losses[0] - 2.0, losses
    assert len(vals) == 2 and all(v > 0 for v in vals)
    for artefact in ("model.safetensors", "model.json", "checkpoints/latest",
                     "checkpoints/step_00000040/.metadata"):
        assert (run_dir / artefact).exists(), artefact
    assert list((work / "wandb").glob("offline-run-*")), "the offline W&B run folder"

    run(fl + ["plot", "checkpoints/tiny_redpajama"], work)
    assert (run_dir / "loss.png").stat().st_size > 10_000

    r = run([sys.executable, "-m", "fastlm.generate",
             "--config_file_path", "example_text_generation_config.yaml",
             "--checkpoint", "checkpoints/tiny_redpajama", "--prompt", "The city", "--max-new-tokens", "12",
             "--device", "cpu"], work)
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["prompt"] == "The city" and len(out["completion"]) > 0

    # the interactive prompt, driven through a pipe
    cfg = (work / "example_text_generation_config.yaml").read_text()
    (work / "gen.yaml").write_text(cfg.replace("checkpoints/gpt60m_redpajama", "checkpoints/tiny_redpajama")
                                   .replace("device: auto", "device: cpu").replace("max_new_tokens: 128",
                                                                                   "max_new_tokens: 8"))
    r = subprocess.run(fl + ["generate_text", "--config_file_path", "gen.yaml"], cwd=work, input="Hello\n",
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.startswith("enter prompt> Hello\nHello"), r.stdout + r.stderr
