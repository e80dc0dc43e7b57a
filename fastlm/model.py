"""The GPT decoder: blocks, the typed model config, and GPT with training and decoding in one forward.

Reads top to bottom: config -> rotary embedding -> attention -> MLP -> block -> GPT. Shapes use
B (batch), T (sequence), C (n_embd), H / Hkv (query / key-value heads), D (head dim), V (padded vocab).

Implementation choices are plain `if`s on the config: attention "triton" (fastlm.kernels.flash_attention, or
flash_attention_qkv on the packed projection where no rotary embedding or KV cache splits it first),
"sdpa" (PyTorch's scaled_dot_product_attention) or "manual" (explicit softmax); loss "fused"
(fastlm.kernels.fused_linear_cross_entropy: the LM head and the loss in one chunked pass) or "torch".
"auto" picks Triton and fused on CUDA, SDPA and torch elsewhere.
"""

from __future__ import annotations

import math
import typing
import zlib
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastlm.yamlconf import ConfigError, check_keys, coerce_value

IGNORE_INDEX = -100

ATTENTION_IMPLS = ("auto", "triton", "sdpa", "manual")
TRITON_HEAD_DIMS = (16, 32, 64, 128)  # what fastlm.kernels.flash_attention takes (without importing it)
LOSS_IMPLS = ("auto", "fused", "torch")


@dataclass
class ModelConfig:
    """The `model` section of a config. `vocab_size` is the tokenizer's true size; the embedding is
    padded to `padded_vocab_size` (a multiple of 64) for speed."""

    vocab_size: int = 50257
    sequence_length: int = 1024
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int | None = None  # None: as many as n_head (no grouped-query attention)
    n_embd: int = 768
    ffn_hidden: int | None = None  # None: 4 * n_embd for gelu, 8/3 * n_embd (rounded to 64) for swiglu
    dropout: float = 0.0  # on embeddings and residual branches (attention probabilities are not dropped)
    bias: bool = False
    pos_encoding: str = "rope"  # rope | learned | none
    rope_theta: float = 10000.0
    norm: str = "rmsnorm"  # layernorm | rmsnorm
    norm_eps: float = 1e-5
    activation: str = "swiglu"  # gelu | swiglu
    tie_weights: bool = True
    attention: str = "auto"  # auto | triton | sdpa | manual
    loss: str = "auto"  # auto | fused | torch
    init_std: float = 0.02

    def __post_init__(self):
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.ffn_hidden is None:
            self.ffn_hidden = (4 * self.n_embd if self.activation == "gelu"
                               else _round_up(8 * self.n_embd // 3, 64))
        self.validate()

    @property
    def padded_vocab_size(self) -> int:
        return _round_up(self.vocab_size, 64)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def validate(self, source: str = "model") -> None:
        def bad(key, why):
            raise ConfigError(f"{source}: model.{key} {why}")

        for key in ("vocab_size", "sequence_length", "n_layer", "n_head", "n_kv_head", "n_embd",
                    "ffn_hidden"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                bad(key, f"must be a positive integer, found {value!r}")
        if self.n_embd % self.n_head:
            bad("n_embd", f"({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.n_head % self.n_kv_head:
            bad("n_kv_head", f"({self.n_kv_head}) must divide n_head ({self.n_head})")
        if self.pos_encoding == "rope" and self.head_dim % 2:
            bad("pos_encoding", f"rope needs an even head dim, found {self.head_dim}")
        choices = {"pos_encoding": ("rope", "learned", "none"), "norm": ("layernorm", "rmsnorm"),
                   "activation": ("gelu", "swiglu"), "attention": ATTENTION_IMPLS, "loss": LOSS_IMPLS}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                bad(key, f"must be one of {' | '.join(allowed)}, found {getattr(self, key)!r}")
        for key in ("dropout", "rope_theta", "norm_eps", "init_std"):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                bad(key, f"must be a number, found {value!r}")
        for key in ("bias", "tie_weights"):
            if not isinstance(getattr(self, key), bool):
                bad(key, f"must be true or false, found {getattr(self, key)!r}")
        if self.attention == "triton" and self.head_dim not in TRITON_HEAD_DIMS:
            bad("attention", f"is triton, whose kernels take head dims {TRITON_HEAD_DIMS}, but n_embd / "
                             f"n_head = {self.n_embd} / {self.n_head} = {self.head_dim}; expected sdpa or "
                             f"auto (which takes sdpa for this head dim), or another n_head")
        if not 0.0 <= self.dropout < 1.0:
            bad("dropout", f"must be in [0, 1), found {self.dropout!r}")
        for key, ok, expected in (("rope_theta", self.rope_theta > 0, "> 0"),
                                  ("norm_eps", self.norm_eps >= 0, ">= 0"),
                                  ("init_std", self.init_std >= 0, ">= 0")):
            value = getattr(self, key)
            if not (math.isfinite(value) and ok):  # (NaN logits, or a failure deep in torch, otherwise)
                bad(key, f"must be a finite number {expected}, found {value!r}")

    @classmethod
    def from_dict(cls, section: dict, source: str = "config") -> "ModelConfig":
        names = [f.name for f in fields(cls)]
        check_keys(section, names, "model", source)
        hints = typing.get_type_hints(cls)
        try:
            cfg = cls.__new__(cls)
            for f in fields(cls):
                value = section.get(f.name, f.default)
                if f.name in section:
                    value = coerce_value(value, hints[f.name], f"{source}: model.{f.name}")
                setattr(cfg, f.name, value)
            cfg.__post_init__()
        except ConfigError as err:
            raise ConfigError(str(err).replace("model: ", f"{source}: ", 1)) from None
        return cfg


def _round_up(x: int, multiple: int) -> int:
    return (x + multiple - 1) // multiple * multiple


def _normal(shape, std: float, seed: int, name: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
    return torch.empty(shape).normal_(0.0, std, generator=gen)


def _copy_full(param: torch.Tensor, value: torch.Tensor) -> None:
    """Copy a full CPU tensor into a parameter, which may be a DTensor shard (FSDP2) or on the meta device."""
    if param.device.type == "meta":
        return
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(param, DTensor):
        value = distribute_tensor(value.to(param.device_mesh.device_type), param.device_mesh,
                                  param.placements)
    param.copy_(value)


def resolve_attention(cfg: ModelConfig, device: torch.device) -> str:
    if cfg.attention != "auto":
        return cfg.attention
    return "triton" if device.type == "cuda" and cfg.head_dim in TRITON_HEAD_DIMS else "sdpa"


def resolve_loss(cfg: ModelConfig, device: torch.device) -> str:
    if cfg.loss != "auto":
        return cfg.loss
    return "fused" if device.type == "cuda" else "torch"


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # fp32 statistics whatever the activation dtype
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.n_embd, cfg.norm_eps)
    return nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias)


def rope_cache(seq_len: int, head_dim: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, (seq_len, head_dim // 2) each, in fp32."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., :D/2], x[..., D/2:]) of x (B, H, T, D) by the angles of cos/sin, (T, D/2) or
    (B, 1, T, D/2) for per-row positions."""
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.type_as(x)


def available_memory(device: torch.device) -> int | None:
    """Bytes that can still be allocated on `device`: free memory on a GPU, MemAvailable of the host for
    the CPU; None where it cannot be told."""
    if device.type == "cuda":  # free on the device + what torch's caching allocator holds unused
        return (torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device)
                - torch.cuda.memory_allocated(device))
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            pass
    return None


class KVCache(nn.Module):
    """Static key/value buffers for decoding: (B, Hkv, max_seq, D), written at `input_pos`."""

    def __init__(self, batch: int, n_kv_head: int, max_seq: int, head_dim: int, dtype, device=None):
        super().__init__()
        shape = (batch, n_kv_head, max_seq, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        # input_pos (T,), k/v (B, Hkv, T, D)
        self.k[:, :, input_pos] = k
        self.v[:, :, input_pos] = v
        return self.k, self.v


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        kv_dim = 2 * cfg.n_kv_head * cfg.head_dim
        self.qkv = nn.Linear(cfg.n_embd, cfg.n_embd + kv_dim, bias=cfg.bias)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.kv_cache: KVCache | None = None

    def forward(self, x, rope, input_pos, mask):
        B, T, C = x.shape
        H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
        qkv = self.qkv(x)  # (B, T, (H + 2 Hkv) D): q's heads, then k's, then v's
        impl = resolve_attention(self.cfg, x.device)
        if impl == "triton" and rope is None and self.kv_cache is None and mask is None:
            # the kernel takes the projection as it is, and its backward writes dq, dk and dv into one
            # gradient of qkv's layout (attention over three views would leave autograd to concatenate them)
            y = _flash_attention_qkv()(qkv, H, Hkv)
        else:
            q, k, v = qkv.split([C, Hkv * D, Hkv * D], dim=-1)
            q = q.view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
            k = k.view(B, T, Hkv, D).transpose(1, 2)  # (B, Hkv, T, D)
            v = v.view(B, T, Hkv, D).transpose(1, 2)
            if rope is not None:
                q, k = apply_rope(q, *rope), apply_rope(k, *rope)
            if self.kv_cache is not None:
                k, v = self.kv_cache.update(input_pos, k, v)  # (B, Hkv, max_seq, D); `mask` hides the rest
            y = attention(q, k, v, mask, impl)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.proj(y)


def _flash_attention():
    """fastlm.kernels.flash_attention, imported on first use (it imports Triton). Under torch.compile it is
    a custom op, opaque to the graph: a compiled block stays one graph around it (see the kernel's module)."""
    from fastlm.kernels import flash_attention

    return flash_attention


def _flash_attention_qkv():
    """fastlm.kernels.flash_attention_qkv, imported on first use, as _flash_attention."""
    from fastlm.kernels import flash_attention_qkv

    return flash_attention_qkv


def attention(q, k, v, mask, impl: str):
    """Causal attention of q (B, H, Tq, D) over k/v (B, Hkv, Tk, D). With `mask`, (Tq, Tk) or (B, 1, Tq, Tk)
    bool (True = may attend), that mask replaces the causal one (decoding with a KV cache)."""
    if impl == "triton" and mask is None:
        return _flash_attention()(q, k, v, causal=True)
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    if impl == "manual":
        scores = (q.float() @ k.float().transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (B, H, Tq, Tk)
        if mask is None:
            Tq, Tk = q.shape[-2], k.shape[-2]
            mask = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(diagonal=Tk - Tq)
        scores = scores.masked_fill(~mask, float("-inf"))
        return (scores.softmax(dim=-1) @ v.float()).type_as(q)
    if mask is None and q.shape[-2] == k.shape[-2]:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if mask is None:  # SDPA's is_causal aligns the triangle top-left; the other paths, bottom-right
        Tq, Tk = q.shape[-2], k.shape[-2]
        mask = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(diagonal=Tk - Tq)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.swiglu = cfg.activation == "swiglu"
        self.up = nn.Linear(cfg.n_embd, cfg.ffn_hidden * (2 if self.swiglu else 1), bias=cfg.bias)
        self.down = nn.Linear(cfg.ffn_hidden, cfg.n_embd, bias=cfg.bias)

    def forward(self, x):
        h = self.up(x)
        if self.swiglu:
            gate, value = h.chunk(2, dim=-1)
            h = F.silu(gate) * value
        else:
            h = F.gelu(h, approximate="tanh")
        return self.down(h)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm1 = make_norm(cfg)
        self.attn = Attention(cfg)
        self.norm2 = make_norm(cfg)
        self.mlp = MLP(cfg)
        self.dropout = nn.Dropout(cfg.dropout)
        self.checkpointing = False  # recompute this block's activations in backward (set by parallelize)

    def forward(self, x, rope, input_pos, mask):
        if self.checkpointing and self.training and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            return checkpoint(self._forward, x, rope, input_pos, mask, use_reentrant=False)
        return self._forward(x, rope, input_pos, mask)

    def _forward(self, x, rope, input_pos, mask):
        x = x + self.dropout(self.attn(self.norm1(x), rope, input_pos, mask))
        return x + self.dropout(self.mlp(self.norm2(x)))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.padded_vocab_size, cfg.n_embd)
        self.pos_emb = (nn.Embedding(cfg.sequence_length, cfg.n_embd) if cfg.pos_encoding == "learned"
                        else None)
        self.dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.padded_vocab_size, bias=False)
        if cfg.tie_weights:
            self.lm_head.weight = self.tok_emb.weight
        self.max_seq = cfg.sequence_length
        if cfg.pos_encoding == "rope":
            cos, sin = rope_cache(self.max_seq, cfg.head_dim, cfg.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """GPT-2 initialisation: N(0, init_std) for weights, residual projections scaled by
        1/sqrt(2 * n_layer), zero biases, unit norms. Each parameter draws from its own generator, seeded
        by `seed` (default: torch's initial seed) and its name, and is generated whole before it is
        sharded: the same seed gives the same model on any number of ranks. Also recomputes the rotary
        tables, so a model built on the meta device is complete after to_empty() and this call."""
        seed = torch.initial_seed() if seed is None else seed
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if name.endswith("attn.proj.weight") or name.endswith("mlp.down.weight"):
                value = _normal(p.shape, std / math.sqrt(2 * self.cfg.n_layer), seed, name)
            elif p.ndim >= 2:
                value = _normal(p.shape, std, seed, name)
            elif name.endswith("bias"):
                value = torch.zeros(p.shape)
            else:  # norm weights
                value = torch.ones(p.shape)
            _copy_full(p, value)
        if self.cfg.pos_encoding == "rope":  # as long as the tables are (setup_caches may have grown them)
            cos, sin = rope_cache(self.rope_cos.shape[0], self.cfg.head_dim, self.cfg.rope_theta,
                                  device=self.rope_cos.device)
            self.rope_cos.copy_(cos)
            self.rope_sin.copy_(sin)

    def to_empty(self, *, device, recurse: bool = True):
        """nn.Module.to_empty gives each module its own new tensor, which unties a tied LM head; tie again."""
        super().to_empty(device=device, recurse=recurse)
        if self.cfg.tie_weights and self.lm_head.weight is not self.tok_emb.weight:
            self.lm_head.weight = self.tok_emb.weight
        return self

    def num_params(self, exclude_position_embeddings: bool = True) -> int:
        """Parameters (a tied weight counted once); by default without position embeddings, the N of
        the 6N flops-per-token formula."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_position_embeddings and self.pos_emb is not None:
            n -= self.pos_emb.weight.numel()
        return n

    def setup_caches(self, batch: int, max_seq: int, dtype=None) -> None:
        """Allocate static KV caches for decoding `batch` sequences of up to `max_seq` tokens.

        Caches larger than the memory the device has available are a ValueError that shows the
        arithmetic, raised before anything is allocated (on CPU a huge allocation would otherwise succeed
        lazily and end in swapping or the OOM killer, on CUDA in an out-of-memory error deep in torch)."""
        if max_seq > self.cfg.sequence_length and self.cfg.pos_encoding == "learned":
            raise ValueError(f"max_seq {max_seq} exceeds the learned position table "
                             f"({self.cfg.sequence_length})")
        device = self.tok_emb.weight.device
        dtype = dtype or self.tok_emb.weight.dtype
        self.check_cache_memory(batch, max_seq, dtype)
        self.clear_caches()
        for block in self.blocks:
            block.attn.kv_cache = KVCache(batch, self.cfg.n_kv_head, max_seq, self.cfg.head_dim, dtype,
                                          device)
        if self.cfg.pos_encoding == "rope" and max_seq > self.rope_cos.shape[0]:
            cos, sin = rope_cache(max_seq, self.cfg.head_dim, self.cfg.rope_theta, device=device)
            self.rope_cos, self.rope_sin = cos, sin
        self.max_seq = max_seq

    def check_cache_memory(self, batch: int, max_seq: int, dtype: torch.dtype) -> None:
        """ValueError, with the arithmetic, when KV caches for `batch` sequences of `max_seq` tokens would
        not fit in the memory the device has available (caches this model holds count as available)."""
        cfg, itemsize = self.cfg, dtype.itemsize
        need = 2 * cfg.n_layer * batch * cfg.n_kv_head * max_seq * cfg.head_dim * itemsize
        device = self.tok_emb.weight.device
        available = available_memory(device)
        if available is None or need <= available + self._cache_bytes():
            return
        raise ValueError(
            f"KV caches for {batch} sequence(s) of {max_seq:,} tokens need {need / 2**30:,.1f} GiB (k and v: "
            f"2 x {cfg.n_layer} layers x {batch} x {cfg.n_kv_head} kv heads x {max_seq:,} tokens x "
            f"{cfg.head_dim} x {itemsize} bytes) but {device} has {available / 2**30:,.1f} GiB available; "
            f"expected a shorter context (sequence_length) or fewer sequences at once")

    def _cache_bytes(self) -> int:
        caches = [b.attn.kv_cache for b in self.blocks if b.attn.kv_cache is not None]
        return sum(c.k.nbytes + c.v.nbytes for c in caches)

    def clear_caches(self) -> None:
        for block in self.blocks:
            block.attn.kv_cache = None

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                input_pos: torch.Tensor | None = None, pad_lens: torch.Tensor | None = None):
        """idx (B, T) token ids. Training: targets (B, T) -> (logits or None, loss); with the fused loss the
        logits are never materialised and None is returned in their place. Decoding: after
        setup_caches(), input_pos (T,) gives the cache slots of idx and logits (B, T, V) come back; with
        left-padded prompts, pad_lens (B,) gives each row's padding, which no query attends and which
        positions skip (row b's first real token is at position 0)."""
        B, T = idx.shape
        decoding = self.blocks[0].attn.kv_cache is not None
        if decoding and input_pos is None:
            raise ValueError("the model has KV caches: pass input_pos (or call clear_caches() to train)")
        if input_pos is None:
            if T > self.cfg.sequence_length:
                raise ValueError(f"sequence of {T} tokens exceeds sequence_length {self.cfg.sequence_length}")
            input_pos = torch.arange(T, device=idx.device)
        mask, positions = None, input_pos  # positions: (T,), or (B, T) with padding
        if decoding:
            slots = torch.arange(self.max_seq, device=idx.device)
            # a query at slot p may attend every written slot <= p (slots beyond are unwritten)
            mask = input_pos[:, None] >= slots[None, :]  # (T, max_seq)
            if pad_lens is not None:
                # ... except the row's padding; a padding query attends itself only (no empty softmax rows)
                real = slots[None, None, :] >= pad_lens[:, None, None]  # (B, 1, max_seq)
                mask = ((mask[None] & real)
                        | (input_pos[None, :, None] == slots[None, None, :]))  # (B, T, max_seq)
                mask = mask[:, None]  # (B, 1, T, max_seq): broadcast over heads
                positions = (input_pos[None, :] - pad_lens[:, None]).clamp(min=0)  # (B, T)
        x = self.tok_emb(idx)  # (B, T, C)
        if self.pos_emb is not None:
            x = x + self.pos_emb(positions)
        x = self.dropout(x)
        rope = None
        if self.cfg.pos_encoding == "rope":
            cos, sin = self.rope_cos[positions], self.rope_sin[positions]  # (T, D/2) or (B, T, D/2)
            rope = (cos, sin) if cos.ndim == 2 else (cos[:, None], sin[:, None])  # (B, 1, T, D/2) over heads
        for block in self.blocks:
            x = block(x, rope, input_pos, mask)
        x = self.norm(x)

        if targets is None:
            return self.lm_head(x), None  # (B, T, V)
        if resolve_loss(self.cfg, x.device) == "fused":
            from fastlm.kernels import fused_linear_cross_entropy

            loss = fused_linear_cross_entropy(x.reshape(B * T, -1), self.lm_head.weight, targets.reshape(-1),
                                              ignore_index=IGNORE_INDEX)
            return None, loss
        logits = self.lm_head(x)  # (B, T, V)
        # the mean over the targets that count, 0 when none does (a fully padded batch: as the fused loss,
        # where F.cross_entropy's mean would be NaN and poison the step)
        total = F.cross_entropy(logits.reshape(B * T, -1).float(), targets.reshape(-1),
                                ignore_index=IGNORE_INDEX, reduction="sum")
        return logits, total / (targets != IGNORE_INDEX).sum().clamp(min=1)

    def estimate_mfu(self, tokens_per_s: float, device=None) -> tuple[float | None, str]:
        return estimate_mfu(self, tokens_per_s, device)

    def optimizer_groups(self, weight_decay: float) -> list[dict]:
        """AdamW parameter groups: decay for matrices of linear layers; none for norms, biases and
        embeddings (the tied LM head is the token embedding)."""
        embeddings = {id(self.tok_emb.weight)} | ({id(self.pos_emb.weight)} if self.pos_emb is not None
                                                  else set())
        decay, no_decay, seen = [], [], set()
        for p in self.parameters():
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            (decay if p.ndim >= 2 and id(p) not in embeddings else no_decay).append(p)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    def flops_per_token(self) -> float:
        """Training flops per token: 6N for the weights (forward + backward) + 12 * L * C * T for the
        attention scores and values, N without position embeddings (PaLM appendix B)."""
        cfg = self.cfg
        return 6 * self.num_params() + 12 * cfg.n_layer * cfg.n_embd * cfg.sequence_length


# Dense bf16 tensor-core peaks (no sparsity), TFLOP/s, by substrings of torch.cuda.get_device_name().
PEAK_BF16_TFLOPS = (
    ("H200", 989.0),
    ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM
    ("GH200", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("A10G", 70.0),
    ("L4", 121.0),
)


def peak_flops(device_name: str) -> float | None:
    """Peak dense bf16 flop/s of a GPU by name, or None when the GPU is not in the table."""
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in device_name:
            return tflops * 1e12
    return None


def estimate_mfu(model: GPT, tokens_per_s: float,
                 device: torch.device | str | None = None) -> tuple[float | None, str]:
    """Model flops utilisation: achieved training flop/s over the device's peak bf16 flop/s.
    Returns (mfu or None, explanation); None for a CPU or an unknown GPU rather than a wrong number."""
    device = (torch.device(device) if device is not None
              else torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda":
        return None, "MFU is defined against GPU tensor-core peaks; none for CPU"
    name = torch.cuda.get_device_name(device)
    peak = peak_flops(name)
    if peak is None:
        return None, f"unknown GPU {name!r}: no peak figure, no MFU"
    achieved = model.flops_per_token() * tokens_per_s
    return achieved / peak, f"{achieved / 1e12:.1f} TFLOP/s of {peak / 1e12:.0f} ({name})"
