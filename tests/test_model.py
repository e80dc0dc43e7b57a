"""The GPT model: shipped configs, initialisation, attention and loss implementations, KV-cached decoding."""

import importlib
import math

import pytest
import torch
import yaml

from fastlm.model import GPT, ModelConfig, estimate_mfu, peak_flops
from fastlm.yamlconf import ConfigError

from conftest import ROOT

CONFIGS = ROOT / "configs"
# The tests of the Triton attention and fused loss run on CUDA when there is a GPU (compiled kernels), on CPU
# under Triton's interpreter otherwise (conftest sets TRITON_INTERPRET=1). The model is built on CPU either
# way (same seed, same weights) and moved.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# fp32 (on CPU, and on GPU where torch's fp32 matmuls do not use TF32 by default and the kernels use IEEE
# fp32 matmuls): implementations that differ only in the order of fp32 operations agree to ~1e-5 relative;
# 1e-4 absolute on O(1) logits leaves room for the Triton kernels' block-wise accumulation.
LOGIT_ATOL = 1e-4
GRAD_ATOL = 1e-5


def load(name: str, **overrides) -> ModelConfig:
    section = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())["model"]
    section.update(overrides)
    return ModelConfig.from_dict(section, f"configs/{name}.yaml")


def expected_params(cfg: ModelConfig) -> int:
    """Parameter count from the architecture, written out independently of the model code."""
    C, L, V = cfg.n_embd, cfg.n_layer, cfg.padded_vocab_size
    kv = 2 * cfg.n_kv_head * cfg.head_dim
    b = cfg.bias
    attn = C * (C + kv) + (C + kv) * b + C * C + C * b
    up = C * cfg.ffn_hidden * (2 if cfg.activation == "swiglu" else 1)
    mlp = up + up // C * b + cfg.ffn_hidden * C + C * b
    norm = C * (2 if cfg.norm == "layernorm" and b else 1)
    block = attn + mlp + 2 * norm
    head = 0 if cfg.tie_weights else V * C
    return V * C + L * block + norm + head


@pytest.mark.parametrize("name, low, high",
                         [("gpt60m", 55e6, 65e6), ("gpt124m", 123e6, 125e6), ("tiny", 1, 5e6)])
def test_parameter_counts_of_shipped_configs(name, low, high):
    cfg = load(name)
    with torch.device("meta"):
        model = GPT(cfg)
    assert model.num_params() == expected_params(cfg)
    assert low <= model.num_params() <= high
    assert cfg.padded_vocab_size % 64 == 0 and cfg.padded_vocab_size >= cfg.vocab_size == 50257


def test_gpt124m_is_gpt2_small():
    cfg = load("gpt124m")
    with torch.device("meta"):
        model = GPT(cfg)
    # GPT-2 small with the vocabulary padded to 50304, as nanoGPT: 124,475,904 with position embeddings
    assert model.num_params(exclude_position_embeddings=False) == 124_475_904


def test_config_errors():
    with pytest.raises(ConfigError, match=r'unknown key "model.n_layers" \(did you mean "model.n_layer"\?\)'):
        ModelConfig.from_dict({"n_layers": 2}, "x.yaml")
    with pytest.raises(ConfigError, match=r"x.yaml: model.n_kv_head \(3\) must divide n_head \(8\)"):
        ModelConfig.from_dict({"n_head": 8, "n_kv_head": 3, "n_embd": 64}, "x.yaml")
    with pytest.raises(ConfigError, match=r"model.attention must be one of auto \| triton \| sdpa \| manual"):
        ModelConfig.from_dict({"attention": "flash"}, "x.yaml")
    for key, value, expected in (("rope_theta", 0.0, "> 0"), ("norm_eps", -1.0, ">= 0"),
                                 ("init_std", -0.02, ">= 0"), ("rope_theta", float("nan"), "> 0")):
        with pytest.raises(ConfigError, match=rf"x.yaml: model.{key} must be a finite number {expected}, "
                                              rf"found {value!r}"):
            ModelConfig.from_dict({key: value}, "x.yaml")


def test_config_types_and_the_triton_head_dims():
    """A config built in Python gets the checks a YAML file gets: numbers must be numbers and switches
    bools (a string "no" would be truthy); attention triton needs a head dim its kernels take (auto falls
    back to sdpa for others), which is the kernels' own list."""
    from fastlm.kernels.flash_attention import SUPPORTED_HEAD_DIMS
    from fastlm.model import TRITON_HEAD_DIMS, resolve_attention

    small = dict(vocab_size=100, sequence_length=16, n_layer=1, n_head=2, n_embd=64)
    number, switch = "must be a number", "must be true or false"
    for key, value, words in (("dropout", "0.1", number), ("rope_theta", "1e4", number),
                              ("norm_eps", None, number), ("bias", "no", switch), ("tie_weights", 1, switch)):
        with pytest.raises(ConfigError, match=rf"model.{key} {words}, found {value!r}"):
            ModelConfig(**small, **{key: value})
    assert TRITON_HEAD_DIMS == SUPPORTED_HEAD_DIMS
    with pytest.raises(ConfigError, match=r"model.attention is triton, whose kernels take head dims .* but "
                                          r"n_embd / n_head = 96 / 2 = 48"):
        ModelConfig(**{**small, "n_embd": 96}, attention="triton")
    cfg = ModelConfig(**{**small, "n_embd": 96})  # auto
    assert resolve_attention(cfg, torch.device("cuda")) == "sdpa"
    assert resolve_attention(ModelConfig(**small), torch.device("cuda")) == "triton"


def test_both_losses_of_a_fully_ignored_batch_are_zero():
    """A micro batch whose targets are all ignored (all padding) has loss 0 on both paths, not NaN on the
    torch path (F.cross_entropy's mean over nothing), which would poison the step's gradient."""
    idx = torch.randint(0, 100, (1, 8), device=DEVICE)
    targets = torch.full((1, 8), -100, device=DEVICE)
    for loss_impl in ("torch", "fused"):
        torch.manual_seed(0)
        model = GPT(ModelConfig(vocab_size=100, sequence_length=8, n_layer=1, n_head=2, n_embd=64,
                                loss=loss_impl)).to(DEVICE)
        loss = model(idx, targets)[1]
        loss.backward()
        assert loss.item() == 0.0, loss_impl
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_sdpa_attention_aligns_the_causal_mask_bottom_right():
    """Queries that are the last Tq of Tk positions (a chunk after a cached prefix): the manual path's
    bottom-right triangle; SDPA's own is_causal would align it top-left."""
    from fastlm.model import attention

    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 3, 16, generator=gen)
    k, v = torch.randn(2, 1, 2, 7, 16, generator=gen)
    torch.testing.assert_close(attention(q, k, v, None, "sdpa"), attention(q, k, v, None, "manual"),
                               atol=1e-6, rtol=1e-5)


def test_init_weights_after_short_decoding_caches():
    model = tiny(pos_encoding="rope")
    model.setup_caches(1, model.cfg.sequence_length // 2)
    model.clear_caches()
    model.init_weights(seed=1)  # rebuilds the rotary tables at their own length
    fresh = tiny(pos_encoding="rope")
    torch.testing.assert_close(model.rope_cos, fresh.rope_cos, rtol=0, atol=0)


def tiny(**overrides) -> GPT:
    torch.manual_seed(0)
    return GPT(load("tiny", **overrides))


def test_loss_at_init_is_close_to_uniform():
    model = tiny()
    idx, targets = torch.randint(0, 50257, (2, 4, 64))  # targets unrelated to inputs, as at the next position
    _, loss = model(idx, targets)
    assert abs(loss.item() - math.log(model.cfg.padded_vocab_size)) < 0.05


def test_scaled_init_of_residual_projections():
    model = GPT(load("gpt60m", n_layer=4, vocab_size=512))
    expected = 0.02 / math.sqrt(2 * 4)
    for block in model.blocks:
        assert block.attn.proj.weight.std().item() == pytest.approx(expected, rel=0.05)
        assert block.mlp.down.weight.std().item() == pytest.approx(expected, rel=0.05)
        assert block.attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.05)


def test_meta_device_build_then_init_weights():
    cfg = load("tiny")
    with torch.device("meta"):
        model = GPT(cfg)
    model.to_empty(device="cpu")
    assert model.lm_head.weight is model.tok_emb.weight  # still tied
    model.init_weights()
    reference = GPT(cfg)
    torch.testing.assert_close(model.rope_cos, reference.rope_cos)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert model.tok_emb.weight.std().item() == pytest.approx(0.02, rel=0.05)


def test_optimizer_groups():
    model = GPT(load("gpt124m", n_layer=2, vocab_size=512))
    decay, no_decay = model.optimizer_groups(0.1)
    decay_ids = {id(p) for p in decay["params"]}
    assert id(model.tok_emb.weight) not in decay_ids and id(model.pos_emb.weight) not in decay_ids
    assert all(p.ndim == 2 for p in decay["params"])
    assert all(p.ndim == 1 for p in no_decay["params"]
               if p is not model.tok_emb.weight and p is not model.pos_emb.weight)
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_flops_and_mfu():
    model = GPT(load("gpt124m", n_layer=2, vocab_size=512))
    cfg = model.cfg
    assert model.flops_per_token() == (6 * model.num_params()
                                       + 12 * cfg.n_layer * cfg.n_embd * cfg.sequence_length)
    assert estimate_mfu(model, 1e5, "cpu")[0] is None
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12 and peak_flops("NVIDIA A100-SXM4-40GB") == 312e12
    assert peak_flops("Some Future GPU") is None


@pytest.mark.parametrize("preset", ["tiny", "gpt124m"])
def test_attention_implementations_agree(preset):
    """triton (the kernel: compiled on a GPU, run by Triton's interpreter on CPU), sdpa and manual give the
    same logits and gradients. Small shapes keep the interpreter fast."""
    overrides = dict(n_layer=2, sequence_length=48, vocab_size=300)
    if preset == "gpt124m":
        overrides.update(n_head=2, n_embd=64, ffn_hidden=128)
    results = {}
    for impl in ("manual", "sdpa", "triton"):
        torch.manual_seed(0)
        model = GPT(load(preset, attention=impl, loss="torch", **overrides)).to(DEVICE)
        idx = torch.randint(0, 300, (2, 45)).to(DEVICE)  # 45: not a multiple of any block size
        logits, loss = model(idx, idx)
        loss.backward()
        results[impl] = (logits.detach(), model.blocks[0].attn.qkv.weight.grad.clone())
    for impl in ("sdpa", "triton"):
        torch.testing.assert_close(results[impl][0], results["manual"][0], atol=LOGIT_ATOL, rtol=0)
        torch.testing.assert_close(results[impl][1], results["manual"][1], atol=GRAD_ATOL, rtol=1e-4)


@pytest.mark.parametrize("pos_encoding, packed", [("learned", True), ("none", True), ("rope", False)])
def test_triton_attention_takes_the_projection_packed_unless_rope_splits_it(pos_encoding, packed,
                                                                            monkeypatch):
    """Without rotary embedding the block hands the qkv projection to flash_attention_qkv whole (one
    gradient, no concatenation in the backward), eager and compiled; rope rotates q and k apart, so those
    go to flash_attention as views. test_attention_implementations_agree checks both paths' numbers."""
    fa = importlib.import_module("fastlm.kernels.flash_attention")
    backward_with = fa._backward_with
    seen = []

    def spy(*args):
        seen.append(args[-1] is not None)  # the packed qkv, or None
        return backward_with(*args)

    monkeypatch.setattr(fa, "_backward_with", spy)
    # one dq mode: on a GPU "auto" would time both modes on the first backward, calling the spy many times
    monkeypatch.setattr(fa, "BWD_DQ", "separate")
    cfg = load("gpt124m", attention="triton", pos_encoding=pos_encoding, n_layer=1, sequence_length=32,
               n_head=2, n_embd=64, ffn_hidden=128)
    model = GPT(cfg).to(DEVICE)
    idx = torch.randint(0, cfg.vocab_size, (2, 20)).to(DEVICE)
    model(idx, idx)[1].backward()
    torch._dynamo.reset()
    block = torch.compile(model.blocks[0], fullgraph=True)
    rope = (model.rope_cos[:20], model.rope_sin[:20]) if pos_encoding == "rope" else None
    block(torch.randn(2, 20, 64, device=DEVICE, requires_grad=True), rope, None, None).sum().backward()
    assert seen == [packed, packed]


def test_compiled_block_with_triton_attention_is_one_graph():
    """Training compiles each block: with the Triton attention (a custom op under torch.compile) the block
    compiles whole (fullgraph=True: a graph break is an error) and gives the eager block's output and
    gradients. Inductor compiles the rest of the block (C++ on CPU, Triton on a GPU)."""
    torch.manual_seed(0)
    cfg = load("gpt124m", attention="triton", n_layer=1, sequence_length=40, n_head=2, n_embd=64,
               ffn_hidden=128)
    block = GPT(cfg).blocks[0].to(DEVICE)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 37, 64, generator=gen).to(DEVICE).requires_grad_()
    gy = torch.randn(2, 37, 64, generator=gen).to(DEVICE)

    def run(fn):
        x.grad = None
        block.zero_grad(set_to_none=True)
        y = fn(x, None, None, None)
        y.backward(gy)
        return [y.detach(), x.grad.clone()] + [p.grad.clone() for p in block.parameters()]

    eager = run(block)
    torch._dynamo.reset()
    compiled = run(torch.compile(block, fullgraph=True))
    # fp32 throughout; inductor fuses the norm and activation and may reorder their sums
    for got, want in zip(compiled, eager):
        torch.testing.assert_close(got, want, atol=GRAD_ATOL, rtol=1e-4)


def test_fused_and_torch_loss_agree():
    losses, grads = {}, {}
    for impl in ("torch", "fused"):
        torch.manual_seed(0)
        model = GPT(load("tiny", loss=impl, attention="sdpa", vocab_size=1000)).to(DEVICE)
        idx = torch.randint(0, 1000, (2, 33)).to(DEVICE)
        targets = idx.clone()
        targets[0, :5] = -100  # ignored positions
        _, loss = model(idx, targets)
        loss.backward()
        losses[impl] = loss.item()
        grads[impl] = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert losses["fused"] == pytest.approx(losses["torch"], abs=1e-5)
    for name in grads["torch"]:
        torch.testing.assert_close(grads["fused"][name], grads["torch"][name], atol=GRAD_ATOL, rtol=1e-4)


def test_tiny_model_overfits_one_batch():
    model = tiny(attention="sdpa", loss="torch")
    idx = torch.randint(0, 50257, (2, 32))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = None
    for _ in range(60):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert first > 10 and loss.item() < 1.0


@pytest.mark.parametrize("preset", ["tiny", "gpt124m"])
def test_kv_cached_decoding_matches_full_forward(preset):
    overrides = dict(n_layer=2, vocab_size=300, attention="sdpa")
    if preset == "gpt124m":
        overrides.update(n_head=2, n_embd=64, ffn_hidden=128, sequence_length=64)
    model = GPT(load(preset, **overrides)).eval()
    idx = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        full, _ = model(idx)
        model.setup_caches(batch=2, max_seq=32, dtype=torch.float32)
        prefill, _ = model(idx[:, :12], input_pos=torch.arange(12))
        steps = [model(idx[:, t:t + 1], input_pos=torch.tensor([t]))[0] for t in range(12, 20)]
    torch.testing.assert_close(prefill, full[:, :12], atol=LOGIT_ATOL, rtol=0)
    torch.testing.assert_close(torch.cat(steps, dim=1), full[:, 12:], atol=LOGIT_ATOL, rtol=0)
