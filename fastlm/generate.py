"""Text generation from a checkpoint: `fastlm generate_text --config_file_path CONFIG` (the tutorial's
interactive prompt) and `python -m fastlm.generate --checkpoint PATH --tokenizer PATH --prompt "..."`.

A static KV cache per layer (model.setup_caches), the prompt prefilled in one forward, then one token per
step through the same forward as training. Prompts of different lengths are left-padded; padding is
masked out and skipped by the positions. Small functions: prefill, decode_one_token, sample, generate.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from fastlm.model import GPT, ModelConfig
from fastlm.yamlconf import ConfigError, check_keys, coerce_value, load_yaml


@dataclass
class GenerationSettings:
    model_path: str = ""  # a run folder, a model.safetensors, or a checkpoint folder (DCP)
    tokenizer_path: str = ""  # tokenizer.json or its folder
    device: str = "auto"  # auto | cpu | cuda | a GPU index such as 0
    sequence_length: int = 0  # context window; 0: the model's sequence_length
    max_new_tokens: int = 128
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0  # 1: no nucleus filter
    seed: int = 0
    stop_at_eod: bool = True
    eod_token: str = "<|endoftext|>"
    prompt_too_long: str = "error"  # error | truncate_left
    context_full: str = "stop"  # stop | slide (drop the oldest half of the context and continue)
    compile: str = "auto"  # auto (CUDA: compile the decode step with CUDA graphs) | true | false
    dtype: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp16 | fp32


SETTING_CHOICES = {"prompt_too_long": ("error", "truncate_left"), "context_full": ("stop", "slide"),
                   "compile": ("auto", "true", "false"), "dtype": ("auto", "bf16", "fp16", "fp32")}


def load_generation_config(path: str | Path) -> GenerationSettings:
    """The tutorial's generation config: a `settings` block (unknown keys are errors). Its
    `referencing_keys` and the `text_inference_component` block are accepted for compatibility."""
    source = str(path)
    raw = load_yaml(path)
    check_keys(raw, ["settings", "text_inference_component"], "", source, required=["settings"])
    section = raw["settings"]
    names = [f.name for f in fields(GenerationSettings)]
    check_keys(section, names + ["referencing_keys"], "settings", source, required=["model_path"])
    hints = {f.name: f.type for f in fields(GenerationSettings)}
    values = {}
    for name in names:
        if name in section:
            value = section[name]
            if name in ("device", "compile") and not isinstance(value, str):
                value = str(value).lower()
            values[name] = coerce_value(value, hints[name], f"{source}: settings.{name}")
    settings = GenerationSettings(**values)
    for key, allowed in SETTING_CHOICES.items():
        if getattr(settings, key) not in allowed:
            raise ConfigError(f"{source}: settings.{key} must be one of {' | '.join(allowed)}, "
                              f"found {getattr(settings, key)!r}")
    check_ranges(settings, {name: f"{source}: settings.{name}" for name in names})
    return settings


def check_ranges(settings: GenerationSettings, where: dict[str, str]) -> None:
    """ConfigError for a sampling setting out of its range; `where` names each setting (the config key or
    the command-line flag it came from)."""
    s = settings
    checks = (("sequence_length", s.sequence_length == 0 or s.sequence_length >= 2,
               "0 (the model's own) or an integer >= 2 (a prompt token and one to generate)"),
              ("max_new_tokens", s.max_new_tokens >= 0, "an integer >= 0"),
              ("temperature", math.isfinite(s.temperature) and s.temperature >= 0,
               "a finite number >= 0 (0: greedy)"),
              ("top_k", s.top_k >= 0, "an integer >= 0 (0: no top-k filter)"),
              ("top_p", 0 < s.top_p <= 1, "a number in (0, 1] (1: no nucleus filter)"))
    for key, ok, expected in checks:
        if key in where and not ok:
            raise ConfigError(f"{where[key]} must be {expected}, found {getattr(s, key)!r}")


def resolve_device(spec: str) -> torch.device:
    """settings.device (or --device): auto | cpu | cuda | cuda:N | a GPU index N. A CUDA device that this
    machine does not have is a ConfigError here, not an assertion deep in torch."""
    expected = "auto, cpu, cuda, cuda:N or a GPU index N"
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.isdigit():
        device = torch.device("cuda", int(spec))
    else:
        try:
            device = torch.device(spec)
        except RuntimeError:
            raise ConfigError(f"settings.device (--device) must be {expected}, found {spec!r}") from None
        if device.type not in ("cpu", "cuda"):
            raise ConfigError(f"settings.device (--device) must be {expected}, found {spec!r}")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"settings.device (--device) is {spec!r}, but this machine has no CUDA device "
                              f"(torch.cuda.is_available() is false); expected cpu or auto here")
        if device.index is not None and device.index >= count:
            raise ConfigError(f"settings.device (--device) is {spec!r}, but this machine has {count} CUDA "
                              f"device(s) (indices 0 to {count - 1})")
    return device


# ---- loading ------------------------------------------------------------------------------------------

def load_model(path: str | Path, device: torch.device, dtype: torch.dtype) -> GPT:
    """A GPT from a run folder (its model.safetensors, else its latest checkpoint), a model.safetensors
    file, or a DCP checkpoint folder. Safetensors and DCP only; DCP's metadata pickle is read by an
    unpickler limited to DCP's own classes (fastlm.checkpoint.SafeReader), so a crafted file cannot run
    code. A tensor whose name or shape does not fit the config is an error that names it."""
    from fastlm import checkpoint as ckpt

    path = Path(path)
    if path.is_dir() and (path / "model.safetensors").is_file():
        path = path / "model.safetensors"
    elif path.is_dir() and not ckpt.holds_checkpoint(path):
        latest = ckpt.find_latest(path)
        if latest is None and path.name == "checkpoints":  # RUN/checkpoints: the run's latest checkpoint
            latest = ckpt.find_latest(path.parent)
        if latest is None:
            raise FileNotFoundError(
                f"{path}: no model.safetensors and no complete checkpoint in this folder (expected a run "
                f"folder, its checkpoints folder, a checkpoint folder such as checkpoints/step_00000100 "
                f"or a model.safetensors file)")
        path = latest
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    if path.is_file():
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                state = {k: f.get_tensor(k) for k in f.keys()}
        except SafetensorError as err:
            raise ValueError(f"{path}: not a safetensors file (expected a model.safetensors written by "
                             f"training, or a run or checkpoint folder); safetensors says: {err}") from None
        config_file = path.with_name("model.json")
        if "config" in meta:
            model_cfg = json.loads(meta["config"])
        elif config_file.is_file():
            model_cfg = json.loads(config_file.read_text())
        else:
            raise FileNotFoundError(f"{path}: no model config (expected model.json beside it)")
        cfg = ModelConfig.from_dict(model_cfg, str(path))
        model = GPT(cfg)
        if cfg.tie_weights:
            state.setdefault("lm_head.weight", state.get("tok_emb.weight"))
        _load_checked(model, state, str(path))
    else:
        import torch.distributed.checkpoint as dcp

        train_state = json.loads((path / "train_state.json").read_text())
        cfg = ModelConfig.from_dict(train_state["config"]["model"], str(path / "train_state.json"))
        model = GPT(cfg)
        sd = model.state_dict()
        # DCP loads the keys it is asked for and ignores the rest: a checkpoint with more (e.g. more
        # layers than the config says) would load without a word
        reader = ckpt.SafeReader(str(path))
        saved = reader.read_metadata().state_dict_metadata
        extra = sorted(k.removeprefix("model.") for k in saved
                       if k.startswith("model.") and k.removeprefix("model.") not in sd)
        if extra:
            raise ValueError(f"{path}: tensors the model config does not have: {', '.join(extra[:5])}")
        try:
            ckpt.dcp_io(dcp.load, {"model": sd}, path, reader)
        except ckpt.CheckpointFilesError as err:
            raise ValueError(f"the checkpoint is damaged or incomplete: {err}") from None
        except ValueError as err:  # missing keys and shape conflicts, named by DCP
            raise ValueError(f"checkpoint does not fit the model config: {err}") from None
        model.load_state_dict(sd)
    return model.to(device=device, dtype=dtype).eval()


def _load_checked(model: GPT, state: dict, source: str) -> None:
    expected = model.state_dict()
    for name, tensor in expected.items():
        if name not in state:
            raise ValueError(f"{source}: tensor {name!r} is missing (the model config expects shape "
                             f"{tuple(tensor.shape)})")
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise ValueError(f"{source}: tensor {name!r} has shape {tuple(state[name].shape)} but the model "
                             f"config expects {tuple(tensor.shape)}")
    extra = sorted(set(state) - set(expected))
    if extra:
        raise ValueError(f"{source}: tensors the model config does not have: {', '.join(extra[:5])}")
    model.load_state_dict(state)


# ---- sampling -----------------------------------------------------------------------------------------

def sample(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
           generator: torch.Generator | None) -> torch.Tensor:
    """Next ids (B,) from logits (B, V): greedy at temperature 0, else softmax(logits / T) restricted to
    the top_k largest (when top_k > 0) and to the smallest set whose probability reaches top_p."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float()
    # shifted to a maximum of 0 first: a tiny temperature then gives -inf, never inf - inf (NaN)
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
    logits = filter_logits(logits, top_k, top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """-inf for every id outside the top-k and outside the nucleus of mass top_p (the most likely id
    always stays)."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass of the ids ranked above each one
        drop_sorted = before >= top_p
        drop_sorted[..., 0] = False  # the most likely id, even at top_p <= 0
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


# ---- the decoding loop --------------------------------------------------------------------------------

def prefill(model: GPT, tokens: torch.Tensor, pad_lens: torch.Tensor, start: int = 0) -> torch.Tensor:
    """Run the (left-padded) prompts through the model, filling the caches; logits of the last position."""
    input_pos = torch.arange(start, start + tokens.shape[1], device=tokens.device)
    logits, _ = model(tokens, input_pos=input_pos, pad_lens=pad_lens)
    return logits[:, -1]


def decode_one_token(model: GPT, token: torch.Tensor, input_pos: torch.Tensor, pad_lens: torch.Tensor):
    logits, _ = model(token[:, None], input_pos=input_pos, pad_lens=pad_lens)
    return logits[:, -1]


class Generator:
    """A model, a tokenizer and the settings, ready to continue prompts."""

    def __init__(self, settings: GenerationSettings, origin: dict[str, str] | None = None):
        """origin: where a setting came from ("gen.yaml: settings.model_path", "--checkpoint"), to name in
        the errors about it."""
        from fastlm.tokenizer import Tokenizer

        def named(key: str, err: object) -> ConfigError:
            where = (origin or {}).get(key)
            return ConfigError(f"{where}: {err}" if where else str(err))

        self.s = settings
        self.device = resolve_device(settings.device)
        dtype = settings.dtype
        if dtype == "auto":
            dtype = "bf16" if self.device.type == "cuda" else "fp32"
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
        if not settings.tokenizer_path:
            raise ConfigError("a tokenizer is required: give --tokenizer (or settings.tokenizer_path in the "
                              "config file), tokenizer.json or its folder")
        try:
            self.tokenizer = Tokenizer(settings.tokenizer_path)
        except (OSError, ValueError) as err:
            raise named("tokenizer_path", err) from None
        try:
            self.model = load_model(settings.model_path, self.device, self.dtype)
        except (OSError, ValueError) as err:
            raise named("model_path", err) from None
        cfg = self.model.cfg
        self.context = settings.sequence_length or cfg.sequence_length
        if cfg.pos_encoding == "learned" and self.context > cfg.sequence_length:
            raise ConfigError(f"settings.sequence_length {self.context} exceeds the model's learned "
                              f"positions ({cfg.sequence_length})")
        try:  # one prompt's caches at least: a context that cannot fit fails here, not at the first prompt
            self.model.check_cache_memory(1, self.context, self.dtype)
        except ValueError as err:
            raise ConfigError(f"settings.sequence_length {self.context:,}: {err}") from None
        if self.context > cfg.sequence_length:
            print(f"fastlm: note: settings.sequence_length {self.context} is longer than the "
                  f"{cfg.sequence_length} tokens the model of {settings.model_path} was trained on; past "
                  f"them its positions ({cfg.pos_encoding}) are ones it never saw and the text degrades (0: "
                  f"the model's own length)", file=sys.stderr)
        tokenizer_ids = self.tokenizer.max_id + 1
        if tokenizer_ids > cfg.vocab_size:
            raise ConfigError(
                f"{self.tokenizer.path}: the tokenizer has {tokenizer_ids} ids (0 to {tokenizer_ids - 1}) "
                f"but the model of {settings.model_path} has vocab_size {cfg.vocab_size}; expected the "
                f"tokenizer the model was trained with (settings.tokenizer_path)")
        # ids past the tokenizer's vocabulary (a model vocab_size padded beyond it) are never sampled
        self.vocab = min(cfg.vocab_size, tokenizer_ids)
        self.eod_id = self.tokenizer.token_to_id(settings.eod_token)
        if self.eod_id is None:
            raise named("eod_token", f"eod_token {settings.eod_token!r} is not in the vocabulary of "
                                     f"{self.tokenizer.path}")
        use_compile = (settings.compile == "true"
                       or (settings.compile == "auto" and self.device.type == "cuda"))
        self._decode = (torch.compile(decode_one_token, mode="reduce-overhead", fullgraph=True) if use_compile
                        else decode_one_token)
        self._batch = 0
        self.notes: list[str] = []  # of the last generate() call

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def _decode_step(self, token, input_pos, pad_lens):
        try:
            return self._decode(self.model, token, input_pos, pad_lens).clone()
        except Exception as err:  # a compiled step that fails to build falls back to eager, once
            if self._decode is decode_one_token:
                raise
            print(f"fastlm: compiling the decode step failed ({type(err).__name__}: {err}); decoding eagerly",
                  file=sys.stderr)
            self._decode = decode_one_token
            return decode_one_token(self.model, token, input_pos, pad_lens).clone()

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], on_token=None) -> list[list[int]]:
        """Continuations (ids) of each prompt. on_token(row, id) is called as tokens are chosen. Notes for
        the user (a row that reached the context) are left in `self.notes`, for the caller to print where
        they do not cut into streamed text.

        One host sync per token (the chosen ids, which the caller streams anyway): which rows are done
        and the token history (for sliding the window) are kept on the host. A finished row keeps being
        decoded with the rest of the batch; rows never attend to each other, so what it draws is dropped.

        Rows share one cache position, the widest row's. When it reaches the context: with context_full
        stop, the rows whose own history fills the context are done and the others are prefilled again
        from their own histories (a done row by a 1-token placeholder), so a row of a batch gets what it
        would get alone; with slide, the full rows keep the newest half of their windows and the others
        all of theirs, which is also what each would do alone."""
        s, model = self.s, self.model
        self.notes = []
        rows = [list(self.fit_prompt(p)) for p in prompts]  # each row's tokens so far (copies: they grow)
        B = len(rows)
        if B != self._batch:
            model.setup_caches(B, self.context, dtype=self.dtype)
            self._batch = B
        gen = torch.Generator(device=self.device).manual_seed(s.seed)
        out: list[list[int]] = [[] for _ in range(B)]
        done = [False] * B
        start = [0] * B  # where each row's window begins in its history (context_full: slide moves it)
        logits, pad_lens, pos = self._prefill(rows)
        input_pos = torch.zeros(1, dtype=torch.long, device=self.device)
        for _ in range(s.max_new_tokens):
            nxt = sample(logits[:, :self.vocab], s.temperature, s.top_k, s.top_p, gen)
            for b, t in enumerate(nxt.tolist()):  # the one sync of the step
                if done[b]:
                    continue
                out[b].append(t)
                rows[b].append(t)
                if on_token is not None:
                    on_token(b, t)
                done[b] = s.stop_at_eod and t == self.eod_id
            if all(done):
                break
            if pos >= self.context:
                # each row's window is rows[b][start[b]:]: it is full when its newest token would go past
                # the context (its own position is the batch's position less its padding)
                full = [not done[b] and len(rows[b]) - start[b] - 1 >= self.context for b in range(B)]
                if s.context_full == "stop":
                    for b in range(B):
                        if full[b]:
                            done[b] = True
                            which = f"row {b} " if B > 1 else ""
                            self.notes.append(f"fastlm: {which}reached the context of {self.context} tokens; "
                                              f"stopping (settings.context_full: slide keeps going)")
                    if all(done):
                        break
                else:  # slide: a full row keeps the newest half of its window, the others all of theirs
                    for b in range(B):
                        if full[b]:
                            start[b] = len(rows[b]) - self.context // 2
                # every row as it would be alone, the caches recomputed over the windows (a done row: a
                # 1-token placeholder)
                logits, pad_lens, pos = self._prefill([[self.eod_id] if done[b] else rows[b][start[b]:]
                                                       for b in range(B)])
                continue
            input_pos.fill_(pos)  # on the device: no host-to-device copy (a stream sync) per token
            logits = self._decode_step(nxt, input_pos, pad_lens)
            pos += 1
        return out

    def _prefill(self, rows: list[list[int]]):
        """Left-pad the rows to one width and fill the caches with them: (last logits, pad_lens, width)."""
        width = max(len(r) for r in rows)
        tokens = torch.tensor([[self.eod_id] * (width - len(r)) + r for r in rows], dtype=torch.long)
        pad_lens = torch.tensor([width - len(r) for r in rows])
        tokens, pad_lens = tokens.to(self.device), pad_lens.to(self.device)
        return prefill(self.model, tokens, pad_lens), pad_lens, width

    def fit_prompt(self, ids: list[int]) -> list[int]:
        room = self.context - 1
        if len(ids) <= room:
            return ids or [self.eod_id]
        if self.s.prompt_too_long == "truncate_left":
            return ids[-room:]
        raise ValueError(f"the prompt has {len(ids)} tokens but the context holds {self.context} "
                         f"(one is needed for the answer); shorten it or set "
                         f"settings.prompt_too_long: truncate_left")


def continuation_text(tokenizer, prompt_ids: list[int], ids: list[int], head: str | None = None) -> str:
    """The text that ids add after the prompt. Decoded together with the prompt: a tokenizer that marks
    word starts (SentencePiece's Metaspace) drops the space of a leading word when it is decoded alone.
    When the prompt's own text (`head`, decoded here when not given) is not a prefix of the whole, the
    continuation is decoded alone."""
    if not prompt_ids:
        return tokenizer.decode(ids)
    head = tokenizer.decode(prompt_ids) if head is None else head
    text = tokenizer.decode(list(prompt_ids) + list(ids))
    return text[len(head):] if text.startswith(head) else tokenizer.decode(ids)


def stream_text(tokenizer, ids: list[int], printed: int, prompt_ids: list[int] | tuple = (),
                final: bool = False, head: str | None = None) -> tuple[str, int]:
    """The new text of a growing id list after its prompt, holding back an incomplete UTF-8 character
    until the end (final: whatever is left, so that the streamed text is the whole continuation). head:
    the prompt's decoded text, when the caller keeps it across tokens."""
    text = continuation_text(tokenizer, list(prompt_ids), ids, head)
    if text.endswith("\ufffd") and not final:
        return "", printed
    return text[printed:], len(text)


def interactive(gen: Generator, stdin=sys.stdin, stdout=sys.stdout, stderr=None) -> int:
    """The tutorial's loop: `enter prompt> `, the continuation streamed, again; an empty line or EOF ends
    it. With stdin not a terminal (a pipe, a file), every non-blank line is a prompt and the input's end
    ends it. A prompt that cannot be generated (too
    long for the context) is an `error: ...` line on stderr and the loop goes on with the next; the exit
    status is then 1."""
    stderr = sys.stderr if stderr is None else stderr
    tty = stdin.isatty()
    failed = False
    line_no = 0
    while True:
        if tty:
            stdout.write("enter prompt> ")
            stdout.flush()
        line = stdin.readline()
        line_no += 1
        if not line or (tty and not line.strip()):
            break
        if not line.strip():  # a blank line of piped input: no prompt
            continue
        prompt = line.rstrip("\r\n")
        if line_no == 1:
            prompt = prompt.removeprefix("\ufeff")  # a UTF-8 file's byte-order mark
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as err:  # bytes that are not UTF-8, which stdin kept as surrogates
            print(f"error: input line {line_no} is not valid UTF-8 (at character {err.start + 1}); "
                  f"expected UTF-8 text", file=stderr)
            failed = True
            continue
        if not tty:
            stdout.write(f"enter prompt> {prompt}\n")
        prompt_ids: list[int] = []
        head = ""  # the prompt's decoded text: decoded once, not at every token
        ids: list[int] = []
        printed = 0
        stdout.write(prompt)

        def on_token(_row, token):
            nonlocal printed
            if token == gen.eod_id:
                return
            ids.append(token)
            new, printed = stream_text(gen.tokenizer, ids, printed, prompt_ids, head=head)
            stdout.write(new)
            stdout.flush()

        try:
            prompt_ids = gen.encode(prompt)
            head = gen.tokenizer.decode(prompt_ids)
            gen.generate([prompt_ids], on_token=on_token)
        except ValueError as err:  # this prompt only (e.g. longer than the context)
            stdout.write("\n")
            stdout.flush()
            print(f"error: {err}", file=stderr)
            failed = True
            continue
        stdout.write(stream_text(gen.tokenizer, ids, printed, prompt_ids, final=True, head=head)[0] + "\n")
        stdout.flush()
        for note in gen.notes:  # after the streamed line, not inside it
            print(note, file=stderr)
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fastlm.generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--config_file_path", "--config-file-path",
                   help="generation config (the tutorial's format)")
    p.add_argument("--checkpoint", help="run folder, model.safetensors or checkpoint folder")
    p.add_argument("--tokenizer", help="tokenizer.json or its folder")
    p.add_argument("--prompt", action="append", help="a prompt (repeat for a batch)")
    p.add_argument("--batch-file", help="a file with one prompt per line, generated as one batch")
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--device")
    p.add_argument("--interactive", action="store_true", help="prompt loop (the default with a config file)")
    return p


def settings_from_args(args) -> GenerationSettings:
    s = load_generation_config(args.config_file_path) if args.config_file_path else GenerationSettings()
    given = {}  # setting -> the flag that set it
    for flag, key in (("checkpoint", "model_path"), ("tokenizer", "tokenizer_path"),
                      ("max_new_tokens", None), ("temperature", None), ("top_k", None), ("top_p", None),
                      ("seed", None), ("device", None)):
        value = getattr(args, flag)
        if value is not None:
            setattr(s, key or flag, value)
            given[key or flag] = "--" + flag.replace("_", "-")
    check_ranges(s, given)
    if not s.model_path:
        raise ConfigError("give --checkpoint (or a config file with settings.model_path)")
    return s


def main(argv: list[str] | None = None) -> int:
    from fastlm.cli import run_guarded

    args = build_parser().parse_args(argv)
    return run_guarded(_run, args, writes_files=False)


def setting_origins(args) -> dict[str, str]:
    """Where each path-like setting came from: its flag, or the config file's key."""
    flags = {"model_path": "checkpoint", "tokenizer_path": "tokenizer"}
    origins = {}
    for key in ("model_path", "tokenizer_path", "eod_token"):
        if flags.get(key) and getattr(args, flags[key]) is not None:
            origins[key] = "--" + flags[key]
        elif args.config_file_path:
            origins[key] = f"{args.config_file_path}: settings.{key}"
    return origins


def batch_file_prompts(path: str) -> list[tuple[int, str]]:
    """(line number, prompt) of each non-blank line of a --batch-file: UTF-8 (a byte-order mark is
    skipped), LF or CRLF line ends. A file that is not UTF-8 or holds no prompt is a ValueError naming it."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise OSError(f"--batch-file {path}: cannot be read: {err.strerror or err}") from None
    data = data.removeprefix(b"\xef\xbb\xbf")  # a byte-order mark
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise ValueError(f"--batch-file {path}: line {line} is not valid UTF-8 (byte "
                         f"0x{data[err.start]:02x}); expected UTF-8 text, one prompt per line") from None
    prompts = [(n, line.rstrip("\r")) for n, line in enumerate(text.split("\n"), start=1) if line.strip()]
    if not prompts:
        raise ValueError(f"--batch-file {path} holds no prompt (every line is blank); expected one prompt "
                         f"per line")
    return prompts


def _run(args) -> int:
    origins = [f"--prompt #{i + 1}" for i in range(len(args.prompt or []))]
    prompts = list(args.prompt or [])
    if args.batch_file:
        for line_no, line in batch_file_prompts(args.batch_file):
            origins.append(f"--batch-file {args.batch_file} line {line_no}")
            prompts.append(line)
    gen = Generator(settings_from_args(args), setting_origins(args))
    if not prompts or args.interactive:
        return interactive(gen)
    prompt_ids = [gen.encode(p) for p in prompts]
    for origin, ids in zip(origins, prompt_ids):  # (before any generation: which prompt does not fit)
        try:
            gen.fit_prompt(ids)
        except ValueError as err:
            raise ValueError(f"{origin}: {err}") from None
    outputs = gen.generate(prompt_ids)
    for note in gen.notes:
        print(note, file=sys.stderr)
    for prompt, ids_in, ids in zip(prompts, prompt_ids, outputs):
        ids = [t for t in ids if t != gen.eod_id]
        completion = continuation_text(gen.tokenizer, ids_in, ids)
        print(json.dumps({"prompt": prompt, "completion": completion}, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
