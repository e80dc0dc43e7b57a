"""Generation: KV-cached decoding against full recomputation, sampling, checkpoints, the interactive CLI."""

import json
import shutil
import subprocess
import sys

import pytest
import torch

from fastlm.checkpoint import save_consolidated
from fastlm.config import load_config
from fastlm.generate import GenerationSettings, Generator, filter_logits, load_model, sample
from fastlm.model import GPT

from conftest import GPT2, MODALITIES, ROOT


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny random model saved as a training run would save it (model.safetensors + model.json)."""
    run = tmp_path_factory.mktemp("run")
    cfg = load_config(ROOT / "configs" / "tiny.yaml").model
    torch.manual_seed(0)
    model = GPT(cfg)
    save_consolidated(run, model, {k: getattr(cfg, k) for k in cfg.__dataclass_fields__})
    return run


def make_generator(run, **kw) -> Generator:
    settings = GenerationSettings(model_path=str(run), tokenizer_path=str(GPT2), device="cpu", **kw)
    return Generator(settings)


def greedy_by_recompute(model: GPT, prompt: list[int], n: int) -> list[int]:
    """The contract: feed the whole sequence again for every new token (what Modalities does)."""
    model.clear_caches()
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits, _ = model(torch.tensor([ids]))
            ids.append(int(logits[0, -1, : model.cfg.vocab_size].argmax()))
    return ids[len(prompt):]


def test_kv_cached_greedy_equals_full_recompute_batched_with_different_lengths(tiny_run):
    gen = make_generator(tiny_run, temperature=0.0, max_new_tokens=12, stop_at_eod=False)
    prompts = [gen.encode(t)
               for t in ("Hello world, this is", "A", "The quick brown fox jumps over the lazy")]
    assert len({len(p) for p in prompts}) == 3
    batched = gen.generate(prompts)
    reference_model = load_model(tiny_run, torch.device("cpu"), torch.float32)
    for prompt, got in zip(prompts, batched):
        assert got == greedy_by_recompute(reference_model, prompt, 12)
    # and one at a time through the cache
    for prompt, got in zip(prompts, batched):
        assert gen.generate([prompt]) == [got]


def test_seeded_sampling_is_reproducible(tiny_run):
    prompt = make_generator(tiny_run).encode("Once upon a time")
    runs = [make_generator(tiny_run, seed=s, max_new_tokens=16, top_k=50).generate([prompt])[0]
            for s in (7, 7, 8)]
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_top_k_and_top_p_filters():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    kept = lambda out: torch.isfinite(out[0]).nonzero().flatten().tolist()  # noqa: E731
    assert kept(filter_logits(logits, top_k=2, top_p=1.0)) == [0, 1]
    assert kept(filter_logits(logits, top_k=0, top_p=0.5)) == [0]  # 0.5 alone reaches 0.5
    assert kept(filter_logits(logits, top_k=0, top_p=0.6)) == [0, 1]  # needs 0.5 + 0.2
    assert kept(filter_logits(logits, top_k=0, top_p=0.86)) == [0, 1, 2, 3]
    assert kept(filter_logits(logits, top_k=3, top_p=0.6)) == [0, 1]
    gen = torch.Generator().manual_seed(0)
    draws = {int(sample(logits.repeat(200, 1), 1.0, 2, 1.0, gen)[i]) for i in range(200)}
    assert draws == {0, 1}
    assert sample(logits, 0.0, 0, 1.0, None).item() == 0  # temperature 0: greedy


def test_stops_at_eod_and_at_max_tokens(tiny_run):
    gen = make_generator(tiny_run, temperature=0.0, max_new_tokens=5)
    out = gen.generate([gen.encode("Hi")])[0]
    assert len(out) <= 5 and (len(out) == 5 or out[-1] == gen.eod_id)


def test_prompt_longer_than_the_context(tiny_run):
    long_prompt = list(range(100, 200))  # 100 tokens, context 64
    with pytest.raises(ValueError, match=r"the prompt has 100 tokens but the context holds 64"):
        make_generator(tiny_run).generate([long_prompt])
    gen = make_generator(tiny_run, prompt_too_long="truncate_left", temperature=0.0, max_new_tokens=3,
                         stop_at_eod=False, context_full="slide")
    assert len(gen.generate([long_prompt])[0]) == 3


def test_sliding_window_continues_from_the_newest_half(tiny_run):
    # context 64: a 63-token prompt gets one token, then the window slides to the newest 32 tokens and
    # decoding goes on from there, as if those 32 were the prompt; the caller's prompt list is not touched
    gen = make_generator(tiny_run, temperature=0.0, max_new_tokens=6, stop_at_eod=False, context_full="slide")
    assert gen.context == 64
    prompt = list(range(300, 363))
    got = gen.generate([prompt])[0]
    assert prompt == list(range(300, 363))
    reference_model = load_model(tiny_run, torch.device("cpu"), torch.float32)
    first = greedy_by_recompute(reference_model, prompt, 1)
    assert got == first + greedy_by_recompute(reference_model, (prompt + first)[-32:], 5)


def test_mismatched_checkpoint_names_the_tensor(tiny_run, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_run, bad)
    cfg = json.loads((bad / "model.json").read_text())
    cfg["ffn_hidden"] = 256
    from safetensors.torch import load_file, save_file

    state = load_file(str(bad / "model.safetensors"))
    save_file(state, str(bad / "model.safetensors"), metadata={"config": json.dumps(cfg)})
    with pytest.raises(ValueError, match=r"tensor 'blocks.0.mlp.up.weight' has shape \(384, 64\) "
                                         r"but the model config expects \(512, 64\)"):
        load_model(bad, torch.device("cpu"), torch.float32)
    with pytest.raises(FileNotFoundError, match="no model.safetensors and no complete checkpoint"):
        load_model(tmp_path, torch.device("cpu"), torch.float32)


def test_checkpoint_written_by_training_generates(tmp_path):
    r = subprocess.run([sys.executable, "-m", "fastlm.train", str(ROOT / "configs" / "tiny.yaml"),
                        f"data.train_path={MODALITIES / 'lorem_ipsum_long.pbin'}", "data.val_path=",
                        "model.sequence_length=32", "batch.micro_batch_size=4", "target.steps=3",
                        f"run.output_dir={tmp_path}", "run.name=gen"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    run = tmp_path / "gen"
    from_safetensors = make_generator(run, temperature=0.0, max_new_tokens=6, stop_at_eod=False)
    dcp_dir = run / "checkpoints" / "step_00000003"
    from_dcp = make_generator(dcp_dir, temperature=0.0, max_new_tokens=6, stop_at_eod=False)
    prompt = from_dcp.encode("Lorem ipsum")
    assert from_safetensors.generate([prompt]) == from_dcp.generate([prompt])
    assert len(from_dcp.generate([prompt])[0]) == 6


def test_interactive_cli_through_a_pipe(tiny_run, tmp_path):
    cfg = tmp_path / "gen.yaml"
    cfg.write_text(
        "settings:\n"
        "  referencing_keys:\n    sample_key: input_ids\n    prediction_key: logits\n"
        f"  model_path: {tiny_run}\n  tokenizer_path: {GPT2}\n  device: cpu\n  sequence_length: 64\n"
        "  max_new_tokens: 8\n  temperature: 0.8\n  top_k: 40\n  seed: 3\n"
    )
    exe = shutil.which("fastlm")
    cmd = [exe] if exe else [sys.executable, "-m", "fastlm"]
    r = subprocess.run(cmd + ["generate_text", "--config_file_path", str(cfg)],
                       input="Hello there\nGoodbye\n", capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    assert lines[0] == "enter prompt> Hello there" and lines[1].startswith("Hello there")
    assert lines[2] == "enter prompt> Goodbye" and lines[3].startswith("Goodbye")
    assert len(lines[1]) > len("Hello there")  # something was generated


def test_generation_config_errors(tmp_path):
    from fastlm.generate import load_generation_config
    from fastlm.yamlconf import ConfigError

    cfg = tmp_path / "g.yaml"
    cfg.write_text("settings:\n  model_path: x\n  temprature: 0.5\n")
    with pytest.raises(ConfigError,
                       match=r'unknown key "settings.temprature" \(did you mean "settings.temperature"\?\)'):
        load_generation_config(cfg)
