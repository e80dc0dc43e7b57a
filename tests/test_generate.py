"""Generation: KV-cached decoding against full recomputation, sampling, checkpoints, the interactive CLI."""

import contextlib
import io
import json
import shutil
import subprocess
import sys

import pytest
import torch

from fastlm.checkpoint import save_consolidated
from fastlm.config import load_config
from fastlm.generate import (GenerationSettings, Generator, continuation_text, filter_logits, interactive,
                             load_model, sample)
from fastlm.model import GPT
from fastlm.tokenizer import Tokenizer
from fastlm.yamlconf import ConfigError

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


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A run written by training: model.safetensors and the DCP checkpoint of step 3."""
    out = tmp_path_factory.mktemp("trained")
    r = subprocess.run([sys.executable, "-m", "fastlm.train", str(ROOT / "configs" / "tiny.yaml"),
                        f"data.train_path={MODALITIES / 'lorem_ipsum_long.pbin'}", "data.val_path=",
                        "model.sequence_length=32", "batch.micro_batch_size=4", "target.steps=3",
                        f"run.output_dir={out}", "run.name=gen"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    return out / "gen"


@pytest.fixture(scope="module")
def metaspace_tokenizer(tmp_path_factory):
    """A small SentencePiece-style tokenizer (Metaspace: a word's space is part of its first piece), under
    100 ids, with the eod token."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    hf = HFTokenizer(models.BPE(unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.Metaspace()
    hf.decoder = decoders.Metaspace()
    text = ["hello world this is a small corpus of words", "the quick brown fox jumps over the lazy dog"] * 50
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<|endoftext|>", "<unk>"],
                                  show_progress=False)
    hf.train_from_iterator(text, trainer)
    path = tmp_path_factory.mktemp("metaspace") / "tokenizer.json"
    hf.save(str(path))
    return path


def make_generator(run, tokenizer=GPT2, **kw) -> Generator:
    kw.setdefault("device", "cpu")
    settings = GenerationSettings(model_path=str(run), tokenizer_path=str(tokenizer), **kw)
    return Generator(settings)


class FixedGenerator:
    """Stands in for Generator in `interactive`: 'generates' fixed ids, streamed through on_token."""

    def __init__(self, tokenizer: Tokenizer, ids: list[int]):
        self.tokenizer, self.ids, self.prompts, self.notes = tokenizer, ids, [], []
        self.eod_id = tokenizer.token_to_id("<|endoftext|>")

    def encode(self, text: str) -> list[int]:
        self.prompts.append(text)
        return self.tokenizer.encode(text)

    def generate(self, prompts, on_token=None):
        for t in self.ids:
            on_token(0, t)
        return [list(self.ids)]


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


def test_checkpoint_written_by_training_generates(trained_run):
    run = trained_run
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
    # a blank line of piped input is no prompt (on a terminal it ends the loop)
    r = subprocess.run(cmd + ["generate_text", "--config_file_path", str(cfg)],
                       input="Hello there\n\nGoodbye\n", capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    assert lines[0] == "enter prompt> Hello there" and lines[1].startswith("Hello there")
    assert lines[2] == "enter prompt> Goodbye" and lines[3].startswith("Goodbye") and len(lines) == 4
    assert len(lines[1]) > len("Hello there")  # something was generated
    assert "note:" not in r.stderr  # the context is the model's own

    # --checkpoint in place of the config's model_path; a context beyond the trained length is noted
    cfg.write_text(cfg.read_text().replace(f"model_path: {tiny_run}", "model_path: checkpoints/elsewhere")
                   .replace("sequence_length: 64", "sequence_length: 256"))
    r = subprocess.run(cmd + ["generate_text", "--config_file_path", str(cfg), "--checkpoint", str(tiny_run)],
                       input="Hello there\n", capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.splitlines()[0] == "enter prompt> Hello there"
    assert (f"fastlm: note: settings.sequence_length 256 is longer than the 64 tokens the model of "
            f"{tiny_run} was trained on") in r.stderr, r.stderr


def test_generation_config_errors(tmp_path):
    from fastlm.generate import load_generation_config
    from fastlm.yamlconf import ConfigError

    cfg = tmp_path / "g.yaml"
    cfg.write_text("settings:\n  model_path: x\n  temprature: 0.5\n")
    with pytest.raises(ConfigError,
                       match=r'unknown key "settings.temprature" \(did you mean "settings.temperature"\?\)'):
        load_generation_config(cfg)


def test_run_checkpoints_folder_loads_its_latest_checkpoint(trained_run):
    from_folder = load_model(trained_run / "checkpoints", torch.device("cpu"), torch.float32)
    from_step = load_model(trained_run / "checkpoints" / "step_00000003", torch.device("cpu"), torch.float32)
    for (name, a), b in zip(from_folder.state_dict().items(), from_step.state_dict().values()):
        assert torch.equal(a, b), name


def test_dcp_checkpoint_with_tensors_the_config_lacks_is_refused(trained_run, tmp_path):
    step = tmp_path / "step_00000003"
    shutil.copytree(trained_run / "checkpoints" / "step_00000003", step)
    state = json.loads((step / "train_state.json").read_text())
    assert state["config"]["model"]["n_layer"] == 2
    state["config"]["model"]["n_layer"] = 1
    (step / "train_state.json").write_text(json.dumps(state))
    with pytest.raises(ValueError,
                       match=r"step_00000003: tensors the model config does not have: blocks\.1\."):
        load_model(step, torch.device("cpu"), torch.float32)


def test_a_checkpoint_missing_a_shard_is_called_damaged_not_a_misfit(trained_run, tmp_path):
    step = tmp_path / "step_00000003"
    shutil.copytree(trained_run / "checkpoints" / "step_00000003", step)
    for shard in step.glob("*.distcp"):
        shard.unlink()
    with pytest.raises(ValueError, match=r"^the checkpoint is damaged or incomplete: .*step_00000003: the "
                                         r"checkpoint's data file __0_0.distcp is missing"):
        load_model(step, torch.device("cpu"), torch.float32)


def test_a_truncated_checkpoint_file_is_named(trained_run, tmp_path):
    """A data file cut short (a save or a copy that did not finish) is named with its size and the size
    the metadata needs, before DCP reads it (DCP's own failure is an EOFError that names no file)."""
    step = tmp_path / "step_00000003"
    shutil.copytree(trained_run / "checkpoints" / "step_00000003", step)
    shard = step / "__0_0.distcp"
    with open(shard, "r+b") as f:
        f.truncate(100)
    expected = (rf"^the checkpoint is damaged or incomplete: {shard}: holds 100 bytes but the checkpoint's "
                r".metadata places data up to byte [\d,]+: the file is truncated")
    with pytest.raises(ValueError, match=expected):
        load_model(step, torch.device("cpu"), torch.float32)


def test_not_a_safetensors_file_is_named(tmp_path):
    junk = tmp_path / "model.pt"
    junk.write_bytes(b"PK\x03\x04 a zip, as torch.save writes" * 10)
    with pytest.raises(ValueError, match=r"model\.pt: not a safetensors file"):
        load_model(junk, torch.device("cpu"), torch.float32)


def test_tokenizer_with_more_ids_than_the_model_is_a_config_error(tmp_path):
    cfg = load_config(ROOT / "configs" / "tiny.yaml").model
    cfg.vocab_size = 1000
    save_consolidated(tmp_path, GPT(cfg), {k: getattr(cfg, k) for k in cfg.__dataclass_fields__})
    with pytest.raises(ConfigError, match=r"the tokenizer has 50257 ids .* has vocab_size 1000"):
        make_generator(tmp_path)


def test_ids_the_tokenizer_does_not_have_are_never_sampled(tiny_run, metaspace_tokenizer):
    # the model's 50257 ids against a tokenizer of under 100: only the tokenizer's ids may come out (a
    # random tied model greedily repeats its input token; sampling at temperature 2 reaches all ids)
    greedy = make_generator(tiny_run, metaspace_tokenizer, temperature=0.0, max_new_tokens=20,
                            stop_at_eod=False)
    vocab = greedy.tokenizer.max_id + 1
    assert greedy.vocab == vocab < 100
    prompt = greedy.encode("hello world")
    sampled = make_generator(tiny_run, metaspace_tokenizer, temperature=2.0, max_new_tokens=100,
                             stop_at_eod=False, seed=1)
    for out in (greedy.generate([prompt])[0], sampled.generate([prompt])[0]):
        assert len(out) > 0 and max(out) < vocab


def test_top_p_at_or_below_zero_keeps_the_most_likely_id():
    logits = torch.log(torch.tensor([[0.1, 0.5, 0.2, 0.15, 0.05]]))
    for top_p in (0.0, -0.5, 1e-9):
        assert torch.isfinite(filter_logits(logits, 0, top_p)[0]).nonzero().flatten().tolist() == [1]
        assert sample(logits, 1.0, 0, top_p, torch.Generator().manual_seed(0)).item() == 1
    # a temperature so small that logits / T overflows is greedy, not NaN
    assert sample(logits, 1e-45, 0, 1.0, torch.Generator().manual_seed(0)).item() == 1


def test_sampling_settings_are_checked(tmp_path):
    from fastlm.generate import build_parser, load_generation_config, settings_from_args

    cfg = tmp_path / "g.yaml"
    top_p, temperature = r"must be a number in \(0, 1\] .*found", r"must be a finite number >= 0 .*found"
    count = r"must be an integer >= 0, found"
    for line, message in (("top_p: 0", rf"settings\.top_p {top_p} 0\.0"),
                          ("top_p: 1.5", rf"settings\.top_p {top_p} 1\.5"),
                          ("temperature: -1", rf"settings\.temperature {temperature} -1"),
                          ("temperature: .nan", rf"settings\.temperature {temperature} nan"),
                          ("top_k: -5", r"settings\.top_k must be an integer >= 0 .*found -5"),
                          ("max_new_tokens: -1", rf"settings\.max_new_tokens {count} -1"),
                          ("sequence_length: -5", r"settings\.sequence_length must be 0 \(the model's own\) "
                                                  r"or an integer >= 2 .*found -5"),
                          ("sequence_length: 1", r"settings\.sequence_length must be 0 .*found 1")):
        cfg.write_text(f"settings:\n  model_path: x\n  {line}\n")
        with pytest.raises(ConfigError, match=rf"{cfg}: {message}"):
            load_generation_config(cfg)
    for flags, message in ((["--top-p", "0"], rf"--top-p {top_p} 0\.0"),
                           (["--temperature", "inf"], rf"--temperature {temperature} inf"),
                           (["--top-k", "-1"], r"--top-k must be an integer >= 0 .*found -1"),
                           (["--max-new-tokens", "-3"], rf"--max-new-tokens {count} -3")):
        with pytest.raises(ConfigError, match=message):
            settings_from_args(build_parser().parse_args(["--checkpoint", "x"] + flags))


def test_cuda_device_without_cuda_is_a_config_error(tiny_run, monkeypatch):
    from fastlm.generate import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    for spec in ("cuda", "cuda:1", "0"):
        with pytest.raises(ConfigError, match=rf"settings\.device \(--device\) is '{spec}', but this machine "
                                              r"has no CUDA device"):
            make_generator(tiny_run, device=spec)
    with pytest.raises(ConfigError, match=r"settings\.device \(--device\) must be auto, cpu, cuda, cuda:N or "
                                          r"a GPU index N, found 'gpu'"):
        resolve_device("gpu")
    assert resolve_device("auto") == torch.device("cpu")


def test_a_row_of_a_batch_stops_only_when_its_own_context_is_full(tiny_run):
    # context 64: a 60-token prompt has room for 5 tokens, a 5-token one for 60; batched, the short row
    # must go on (prefilled again from its own history) and get what it gets alone
    long_prompt, short_prompt = list(range(1000, 1060)), list(range(2000, 2005))
    gen = make_generator(tiny_run, temperature=0.0, max_new_tokens=30, stop_at_eod=False)
    alone = gen.generate([short_prompt])[0]
    assert len(alone) == 30
    long_out, short_out = gen.generate([long_prompt, short_prompt])
    assert gen.notes == ["fastlm: row 0 reached the context of 64 tokens; stopping (settings.context_full: "
                         "slide keeps going)"]
    assert short_out == alone and long_out == gen.generate([long_prompt])[0] and len(long_out) == 5
    # the long row ends early at its eod (here: its first token) and the short row still goes on
    eod = gen.tokenizer.library().id_to_token(long_out[0])
    gen = make_generator(tiny_run, temperature=0.0, max_new_tokens=30, eod_token=eod)
    alone = gen.generate([short_prompt])[0]
    assert len(alone) > 5
    assert gen.generate([long_prompt, short_prompt]) == [long_out[:1], alone]


def test_a_row_of_a_batch_slides_only_when_its_own_context_is_full(tiny_run):
    # context 64, slide: the 60-token row fills first and keeps its newest half; the 40-token row keeps
    # its whole history until it fills itself, as it would alone
    long_prompt, middle_prompt = list(range(1000, 1060)), list(range(3000, 3040))
    gen = make_generator(tiny_run, temperature=0.0, max_new_tokens=30, stop_at_eod=False,
                         context_full="slide")
    alone = [gen.generate([p])[0] for p in (long_prompt, middle_prompt)]
    widths = []  # the rows' lengths at each prefill
    prefill = gen._prefill
    gen._prefill = lambda rows: widths.append([len(r) for r in rows]) or prefill(rows)
    assert gen.generate([long_prompt, middle_prompt]) == alone
    # the prompts; the long row full at 65 tokens slides to 32 while the middle row keeps its 45; 19 steps
    # later the middle row fills and slides, while the long row keeps its window (32 + 19 + 1)
    assert widths == [[60, 40], [32, 45], [52, 32]], widths


def test_interactive_prints_the_held_back_tail():
    tok = Tokenizer(GPT2)
    for text in (" ok \U0001F389", " caf\u00e9 \ufffd"):
        ids = tok.encode(text)
        for n in (len(ids), len(ids) - 1):  # the last cut ends in an incomplete character
            out = io.StringIO()
            interactive(FixedGenerator(tok, ids[:n]), stdin=io.StringIO("Hi\n"), stdout=out)
            assert out.getvalue().splitlines()[1] == "Hi" + tok.decode(ids[:n])


def test_metaspace_continuation_keeps_the_space_after_the_prompt(tiny_run, metaspace_tokenizer, monkeypatch,
                                                                 capsys):
    from fastlm.generate import main

    tok = Tokenizer(metaspace_tokenizer)
    prompt, whole = tok.encode("hello world"), tok.encode("hello world the quick fox")
    cont = whole[len(prompt):]
    assert whole[:len(prompt)] == prompt and tok.decode(cont) == "the quick fox"  # alone: no space
    assert continuation_text(tok, prompt, cont) == " the quick fox"
    out = io.StringIO()
    interactive(FixedGenerator(tok, cont), stdin=io.StringIO("hello world\n"), stdout=out)
    assert out.getvalue().splitlines()[1] == "hello world the quick fox"
    # the JSON completion of a batch
    monkeypatch.setattr(Generator, "generate", lambda self, prompts, on_token=None: [list(cont)])
    assert main(["--checkpoint", str(tiny_run), "--tokenizer", str(metaspace_tokenizer), "--device", "cpu",
                 "--prompt", "hello world"]) == 0
    assert json.loads(capsys.readouterr().out) == {"prompt": "hello world", "completion": " the quick fox"}


def test_interactive_goes_on_after_a_prompt_too_long(tiny_run):
    gen = make_generator(tiny_run, temperature=0.0, max_new_tokens=3)
    out, err = io.StringIO(), io.StringIO()
    status = interactive(gen, stdin=io.StringIO(" word" * 100 + "\nHi\n"), stdout=out, stderr=err)
    lines = out.getvalue().splitlines()
    assert lines[2] == "enter prompt> Hi" and lines[3].startswith("Hi") and len(lines) == 4
    assert err.getvalue().startswith("error: the prompt has 100 tokens but the context holds 64")
    assert status == 1


def test_interactive_strips_crlf_line_ends():
    tok = Tokenizer(GPT2)
    gen = FixedGenerator(tok, tok.encode(" there"))
    out = io.StringIO()
    interactive(gen, stdin=io.StringIO("Hi\r\nBye\r\n"), stdout=out)
    assert gen.prompts == ["Hi", "Bye"]
    assert out.getvalue().splitlines() == ["enter prompt> Hi", "Hi there", "enter prompt> Bye", "Bye there"]


def test_a_missing_tokenizer_names_the_flag_and_the_setting():
    with pytest.raises(ConfigError, match=r"a tokenizer is required: give --tokenizer \(or "
                                          r"settings.tokenizer_path in the config file\)"):
        Generator(GenerationSettings(model_path="unused", tokenizer_path="", device="cpu"))


def test_errors_name_the_setting_or_flag_they_come_from(tiny_run, tmp_path):
    from fastlm.generate import main as generate_main

    cfg = tmp_path / "g.yaml"
    cfg.write_text(f"settings:\n  model_path: {tmp_path / 'nowhere'}\n  tokenizer_path: {GPT2}\n"
                   f"  device: cpu\n  eod_token: <eos>\n")

    def error(*argv):
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            assert generate_main([*argv, "--prompt", "hi"]) == 1
        return err.getvalue()

    assert error("--config_file_path", str(cfg)).startswith(
        f"error: {cfg}: settings.model_path: {tmp_path / 'nowhere'}: no such checkpoint")
    assert error("--config_file_path", str(cfg), "--checkpoint", str(tmp_path / "x")).startswith(
        f"error: --checkpoint: {tmp_path / 'x'}: no such checkpoint")
    assert error("--config_file_path", str(cfg), "--checkpoint", str(tiny_run), "--tokenizer",
                 str(tmp_path)).startswith(f"error: --tokenizer: {tmp_path}: no tokenizer found")
    assert error("--config_file_path", str(cfg), "--checkpoint", str(tiny_run)).startswith(
        f"error: {cfg}: settings.eod_token: eod_token '<eos>' is not in the vocabulary of")


def test_a_context_too_big_for_memory_is_refused_before_allocating(tiny_run, monkeypatch):
    """KV caches are checked against the memory available before they are allocated: a context that cannot
    fit even one prompt is a config error at start; a batch that cannot fit is an error that shows the
    arithmetic and leaves the caches of the last batch as they were."""
    import fastlm.model

    with pytest.raises(ConfigError, match=r"settings\.sequence_length 1,000,000,000,000: KV caches for 1 "
                                          r"sequence\(s\) of 1,000,000,000,000 tokens need [\d,.]+ GiB"):
        make_generator(tiny_run, sequence_length=10**12)
    gen = make_generator(tiny_run, sequence_length=64, max_new_tokens=2)
    cfg = gen.model.cfg
    one = 2 * cfg.n_layer * cfg.n_kv_head * 64 * cfg.head_dim * 4  # one sequence's k and v, fp32
    monkeypatch.setattr(fastlm.model, "available_memory", lambda device: 2 * one)
    gen.generate([[1, 2, 3]])
    kept = gen.model.blocks[0].attn.kv_cache
    arithmetic = (rf"KV caches for 4 sequence\(s\) of 64 tokens need .* \(k and v: 2 x {cfg.n_layer} layers "
                  rf"x 4 x {cfg.n_kv_head} kv heads x 64 tokens x {cfg.head_dim} x 4 bytes\) but cpu has")
    with pytest.raises(ValueError, match=arithmetic):
        gen.generate([[1, 2, 3]] * 4)
    assert gen.model.blocks[0].attn.kv_cache is kept
    gen.generate([[1, 2, 3]] * 3)  # the caches held count as available: 1 held + 2 free
    assert gen.model.blocks[0].attn.kv_cache.k.shape[0] == 3


def test_batch_files_are_utf8_lines_named_in_errors(tmp_path):
    """--batch-file: one prompt per non-blank line, LF or CRLF, a byte-order mark skipped; a file that is
    not UTF-8 or holds no prompt is an error naming it (an empty file must not fall back to reading
    stdin)."""
    from fastlm.generate import batch_file_prompts

    f = tmp_path / "p.txt"
    f.write_bytes(b"\xef\xbb\xbfThe\r\n\r\nHello world\r\n")
    assert batch_file_prompts(str(f)) == [(1, "The"), (3, "Hello world")]
    f.write_bytes(b"ok\nfine\n\xff\xfe\n")
    with pytest.raises(ValueError, match=rf"--batch-file {f}: line 3 is not valid UTF-8 \(byte 0xff\)"):
        batch_file_prompts(str(f))
    for data in (b"", b"\n \n\t\n"):
        f.write_bytes(data)
        with pytest.raises(ValueError, match=rf"--batch-file {f} holds no prompt"):
            batch_file_prompts(str(f))


def test_a_batch_prompt_that_does_not_fit_is_named(tiny_run, tmp_path, capsys):
    from fastlm.generate import main

    lines = tmp_path / "p.txt"
    lines.write_text("short\n\n" + "word " * 100 + "\n")
    base = ["--checkpoint", str(tiny_run), "--tokenizer", str(GPT2), "--device", "cpu",
            "--max-new-tokens", "2"]
    assert main(base + ["--prompt", "hi", "--prompt", "word " * 100]) == 1
    assert capsys.readouterr().err.startswith("error: --prompt #2: the prompt has 101 tokens but the context")
    assert main(base + ["--prompt", "hi", "--batch-file", str(lines)]) == 1
    assert f"error: --batch-file {lines} line 3: the prompt has 101 tokens" in capsys.readouterr().err


def test_interactive_notes_and_bad_lines_do_not_cut_into_the_text(tiny_run):
    """The note that the context is full comes after the streamed line, not inside it; a piped line that
    is not UTF-8 (kept by stdin as surrogates) is an error naming it, and the loop goes on."""
    gen = make_generator(tiny_run, sequence_length=8, max_new_tokens=20, stop_at_eod=False)
    both = io.StringIO()  # stdout and stderr in one stream, in the order written
    status = interactive(gen, stdin=io.StringIO("Hello\n\udcff\udcfe bad\nYo\n"), stdout=both, stderr=both)
    lines = both.getvalue().splitlines()
    assert status == 1
    assert lines[0] == "enter prompt> Hello" and lines[1].startswith("Hello")
    assert lines[2] == ("fastlm: reached the context of 8 tokens; stopping (settings.context_full: slide "
                        "keeps going)")
    assert lines[3] == "error: input line 2 is not valid UTF-8 (at character 1); expected UTF-8 text"
    assert lines[4] == "enter prompt> Yo" and lines[5].startswith("Yo")


def test_ctrl_c_while_generating_mentions_no_files(capsys):
    from fastlm.cli import run_guarded

    def stop(_args):
        raise KeyboardInterrupt

    assert run_guarded(stop, None, writes_files=False) == 130
    assert capsys.readouterr().err == "\ninterrupted\n"
    assert run_guarded(stop, None) == 130
    assert "no partial file was left" in capsys.readouterr().err


def test_a_checkpoint_folder_loads_under_any_name(trained_run, tmp_path):
    """A checkpoint folder given by path is one by its files (DCP .metadata, train_state.json), whatever its
    name: a copy under another name loads (only a run's scan for its latest checkpoint goes by name)."""
    elsewhere = tmp_path / "my_checkpoint"
    shutil.copytree(trained_run / "checkpoints" / "step_00000003", elsewhere)
    copied = load_model(elsewhere, torch.device("cpu"), torch.float32)
    original = load_model(trained_run / "checkpoints" / "step_00000003", torch.device("cpu"), torch.float32)
    for (name, a), b in zip(copied.state_dict().items(), original.state_dict().values()):
        assert torch.equal(a, b), name
