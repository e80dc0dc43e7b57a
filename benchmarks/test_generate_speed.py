"""Decoding speed: 256 new tokens after a 256-token prompt, with the KV cache against recomputing the
whole prefix for every token (what Modalities' generate_text does), side by side in the same run.
CPU: the tiny and gpt60m shapes (random weights: speed does not depend on them). On a CUDA GPU (through
benchmarks/device_check.sh): gpt60m, bf16, batch 1 with the compiled decode step, and also the whole
`Generator.generate` loop as users run it (top-k sampling, each token's id brought to the host)."""

from __future__ import annotations

import time

import pytest
import torch

from conftest import GPT2, ROOT, record

PROMPT, NEW = 256, 256


def model_for(name: str, device: torch.device, dtype: torch.dtype):
    from fastlm.config import load_config
    from fastlm.model import GPT

    cfg = load_config(ROOT / "configs" / f"{name}.yaml",
                      ["model.sequence_length=1024", "model.attention=sdpa"]).model
    torch.manual_seed(0)
    return GPT(cfg).to(device=device, dtype=dtype).eval()


@torch.no_grad()
def cached_tokens_per_s(model, batch: int, device, compile_step: bool = False) -> float:
    from fastlm.generate import decode_one_token, prefill

    step = (torch.compile(decode_one_token, mode="reduce-overhead", fullgraph=True) if compile_step
            else decode_one_token)
    prompt = torch.randint(0, 50000, (batch, PROMPT), device=device)
    pad = torch.zeros(batch, dtype=torch.long, device=device)

    def run():
        model.setup_caches(batch, PROMPT + NEW, dtype=next(model.parameters()).dtype)
        logits = prefill(model, prompt, pad)
        input_pos = torch.tensor([PROMPT], device=device)
        for _ in range(NEW):  # as fastlm.generate does it, without the host syncs of printing tokens
            nxt = logits.argmax(-1)
            logits = step(model, nxt, input_pos, pad).clone()
            input_pos += 1
        return logits

    run()  # warm-up (and compilation)
    _sync(device)
    t0 = time.perf_counter()
    run()
    _sync(device)
    model.clear_caches()
    return batch * NEW / (time.perf_counter() - t0)


def generator_tokens_per_s(model, device, run_dir) -> float:
    """Generator.generate on a PROMPT-token prompt for NEW tokens, batch 1, from the model saved as a run."""
    from dataclasses import asdict

    from fastlm.checkpoint import save_consolidated
    from fastlm.generate import GenerationSettings, Generator

    save_consolidated(run_dir, model, asdict(model.cfg))
    gen = Generator(GenerationSettings(model_path=str(run_dir), tokenizer_path=str(GPT2), device=device.type,
                                       max_new_tokens=NEW, stop_at_eod=False, top_k=50, temperature=0.8))
    prompt = torch.randint(0, 50000, (PROMPT,)).tolist()
    gen.generate([prompt])  # warm-up (and compilation)
    _sync(device)
    t0 = time.perf_counter()
    n = len(gen.generate([prompt])[0])
    _sync(device)
    return n / (time.perf_counter() - t0)


@torch.no_grad()
def recompute_tokens_per_s(model, batch: int, device, new: int = NEW) -> float:
    model.clear_caches()
    ids = torch.randint(0, 50000, (batch, PROMPT), device=device)
    model(ids[:, :8])  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(new):
        logits, _ = model(ids)
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    _sync(device)
    return batch * new / (time.perf_counter() - t0)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("name, batch, bar", [("tiny", 1, None), ("tiny", 8, None), ("gpt60m", 1, 5.0),
                                              ("gpt60m", 8, 5.0)])
def test_cpu_decoding(name, batch, bar):
    device = torch.device("cpu")
    model = model_for(name, device, torch.float32)
    cached = cached_tokens_per_s(model, batch, device)
    # the full recompute is slow on a CPU: time its first 32 tokens (each later one is slower still, so
    # this flatters the baseline)
    full = recompute_tokens_per_s(model, batch, device, new=32)
    record(f"decode {name} cpu, batch {batch}, {PROMPT}+{NEW} tokens", cached, "tokens/s",
           "full recompute per token (first 32 tokens)", full, bar=bar)


def test_gpu_decoding_gpt60m(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (run benchmarks/device_check.sh on one)")
    device = torch.device("cuda")
    model = model_for("gpt60m", device, torch.bfloat16)
    eager = cached_tokens_per_s(model, 1, device)
    compiled = cached_tokens_per_s(model, 1, device, compile_step=True)
    full = recompute_tokens_per_s(model, 1, device)
    record("decode gpt60m cuda bf16, batch 1, compiled step", compiled, "tokens/s",
           "full recompute per token", full, aim_tokens_per_s=2000, eager_tokens_per_s=eager)
    model.clear_caches()
    generate = generator_tokens_per_s(model, device, tmp_path)
    record("decode gpt60m cuda bf16, batch 1, Generator.generate (top-k sampling, ids to the host)", generate,
           "tokens/s", "full recompute per token", full)
