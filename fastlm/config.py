"""The typed run config: one YAML file describes a whole training run.

Sections are dataclasses; every key has a type, a default and a one-line doc (the `doc` metadata), from
which the README's config reference is generated. Loading checks everything at start: unknown keys are
errors with "did you mean", values are type-checked, and numbers that must agree are checked together,
with the arithmetic in the message. `key=value` overrides from the command line are typed by the field
they set (`optim.lr=3e-4`, `parallel.fsdp=false`).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import typing
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any

from fastlm.model import ModelConfig
from fastlm.yamlconf import ConfigError, check_keys, coerce_value, interpolate, load_yaml


def doc(text: str, default: Any = dataclasses.MISSING, factory: Any = dataclasses.MISSING):
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"doc": text})
    return field(default=default, metadata={"doc": text})


@dataclass
class RunSection:
    name: str = doc("run name: the folder under output_dir and the wandb run name", "run")
    output_dir: str = doc("where run folders go (checkpoints/, metrics.jsonl)", "checkpoints")
    seed: int = doc("seed of initialisation, data order and dropout", 1337)
    resume: str = doc(
        "none | auto (the latest complete checkpoint of the run folder) | a checkpoint path", "none")
    device: str = doc("auto (cuda when available, else cpu) | cpu | cuda", "auto")
    deterministic: bool = doc("repeat a GPU run bit for bit, resumes included: deterministic torch "
                              "algorithms and cuBLAS workspace, compiled kernels and Triton kernels "
                              "configured without timing-based autotuning and without atomic adds "
                              "(slower); CPU runs repeat anyway", False)


@dataclass
class DataSection:
    train_path: str = doc("training .pbin (from fastlm data pack_encoded_data)", "")
    val_path: str = doc("validation .pbin; empty: no evaluation", "")
    tokenizer_path: str = doc("tokenizer.json or its folder (for generation and vocab checks)", "")
    dataset: str = doc("continuous (Modalities' blocks) | document_aligned", "continuous")
    num_workers: int = doc("0: load batches in the training loop; > 0: one background thread loads the "
                           "next 2 batches (the value is not a process count)", 1)


@dataclass
class OptimSection:
    lr: float = doc("peak learning rate", 6e-4)
    betas: list = doc("AdamW betas", factory=lambda: [0.9, 0.95])
    eps: float = doc("AdamW epsilon", 1e-8)
    weight_decay: float = doc("decoupled weight decay of matrices (not norms, biases, embeddings)", 0.1)
    grad_clip: float = doc("clip the global gradient norm to this; 0: no clipping", 1.0)
    fused: bool = doc("fused AdamW (one kernel over all parameters, CUDA and CPU); false: foreach", True)
    skip_nonfinite: bool = doc(
        "skip a step whose loss or gradient norm is not finite (one host sync per step); false: stop at the "
        "next log or checkpoint, naming the first bad step", False)


@dataclass
class ScheduleSection:
    warmup_steps: int = doc("linear warm-up steps from 0 to optim.lr", 100)
    decay: str = doc("after warm-up: cosine | linear | constant", "cosine")
    min_lr: float = doc("learning rate at the end of the decay", 6e-5)


@dataclass
class BatchSection:
    micro_batch_size: int = doc("sequences per rank per forward pass", 8)
    grad_accum_steps: int = doc(
        "micro batches per optimizer step; 0: derived from global_batch_tokens (1 when that is 0 too)", 0)
    global_batch_tokens: int = doc(
        "tokens per optimizer step across all ranks; 0: micro x seq x accum x world", 0)


@dataclass
class TargetSection:
    steps: int = doc("optimizer steps to train; 0: derived from tokens", 0)
    tokens: int = doc("tokens to train on (when steps is 0)", 0)
    allow_repeat: bool = doc("allow more tokens than one pass over the training data", False)


@dataclass
class IntervalSection:
    log: int = doc("log every N steps (one host sync per log interval)", 10)
    eval: int = doc("evaluate every N steps and at the end; 0: only at the end", 0)
    eval_batches: int = doc("micro batches per evaluation; 0: the whole validation set", 0)
    checkpoint: int = doc("checkpoint every N steps and at the end; 0: only at the end", 0)


@dataclass
class ParallelSection:
    fsdp: bool = doc("with several processes: shard parameters, gradients and optimizer state with FSDP2 "
                     "(fully_shard per block); false: DDP (every rank holds everything, gradients "
                     "all-reduced), less work per step for a model that fits one GPU", True)
    reshard_after_forward: bool = doc("FSDP2: free gathered parameters after each block's forward (gathered "
                                      "again for its backward)", True)
    activation_checkpointing: str = doc("none | full | selective (every other block)", "none")
    compile: bool = doc("torch.compile each block", False)
    cuda_graphs: bool = doc("one process on a GPU, with compile: each compiled block's forward and backward "
                            "replay as CUDA graphs (torch.compile's reduce-overhead mode), one launch "
                            "instead of one per kernel: less host work per step, which is what limits "
                            "small models; not with activation checkpointing", False)


@dataclass
class LoggingSection:
    console: bool = doc("progress bar and log lines on rank 0", True)
    metrics_file: bool = doc("write metrics.jsonl in the run folder", True)
    wandb_mode: str = doc("online | offline | disabled", "disabled")
    wandb_project: str = doc("wandb project", "fastlm")
    wandb_dir: str = doc(
        "folder in which wandb keeps its wandb/ folder (default: the working directory)", ".")
    profile_steps: list = doc(
        "[FIRST, LAST] (e.g. [20, 24]): profile those steps with torch.profiler; rank 0 writes "
        "profile.txt (time per step, top operators and kernels) and trace.json (Chrome/Perfetto) to the "
        "run folder; []: off",
        factory=list)


@dataclass
class CheckpointSection:
    keep_last: int = doc("keep the last K complete checkpoints up to the one just written (0: keep all)", 2)
    consolidated: bool = doc("also write model.safetensors + model.json at the end", True)


@dataclass
class Config:
    run: RunSection = field(default_factory=RunSection)
    data: DataSection = field(default_factory=DataSection)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimSection = field(default_factory=OptimSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    batch: BatchSection = field(default_factory=BatchSection)
    target: TargetSection = field(default_factory=TargetSection)
    intervals: IntervalSection = field(default_factory=IntervalSection)
    precision: str = doc("bf16 | fp16 | fp32 (bf16 and fp16 on CUDA only; fp32 on CPU)", "bf16")
    parallel: ParallelSection = field(default_factory=ParallelSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    source: str = field(default="config", metadata={"internal": True})


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config) if not f.metadata.get("internal")}
_CHOICES = {
    "run.resume": None,  # free text
    "run.device": ("auto", "cpu", "cuda"),
    "data.dataset": ("continuous", "document_aligned"),
    "schedule.decay": ("cosine", "linear", "constant"),
    "parallel.activation_checkpointing": ("none", "full", "selective"),
    "logging.wandb_mode": ("online", "offline", "disabled"),
    "precision": ("bf16", "fp16", "fp32"),
}


def _section_classes() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {name: hints[name] for name in SECTIONS if dataclasses.is_dataclass(hints[name])}


# list keys whose items have a type of their own (YAML 1.1 reads `9e-1` in `[9e-1, 0.95]` as a string)
_LIST_ITEMS = {"optim.betas": float}


def _check_misplaced(section: Any, prefix: str, classes: dict, source: str) -> None:
    """A key of another section (optim.micro_batch_size for batch.micro_batch_size): an error that says
    where it belongs, which "did you mean" within the section cannot."""
    if not isinstance(section, dict):
        return
    own = {f.name for f in dataclasses.fields(classes[prefix])}
    for key in section:
        if key in own:
            continue
        homes = [f"{other}.{key}" for other, cls in classes.items()
                 if other != prefix and key in {f.name for f in dataclasses.fields(cls)}]
        if homes:
            raise ConfigError(f'{source}: unknown key "{prefix}.{key}": {key} belongs to another section '
                              f'(did you mean "{homes[0]}"?)')


def _build_section(cls: type, section: dict, prefix: str, source: str):
    if cls is ModelConfig:
        return ModelConfig.from_dict(section, source)
    names = [f.name for f in dataclasses.fields(cls)]
    check_keys(section, names, prefix, source)
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        if f.name in section:
            key = f"{prefix}.{f.name}"
            value = coerce_value(section[f.name], hints[f.name], f"{source}: {key}")
            if key in _LIST_ITEMS:
                value = [coerce_value(item, _LIST_ITEMS[key], f"{source}: {key}[{i}]")
                         for i, item in enumerate(value)]
            values[f.name] = value
    return cls(**values)


def _parse_scalar(text: str) -> Any:
    import yaml

    return yaml.safe_load(text) if text != "" else ""


def apply_overrides(raw: dict, overrides: list[str], source: str) -> dict:
    """Set `section.key=value` items (YAML-typed values) on the raw config mapping."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like section.key=value (e.g. optim.lr=3e-4)")
        parts = key.split(".")
        if parts[0] not in SECTIONS:
            close = difflib.get_close_matches(parts[0], list(SECTIONS), n=1)
            hint = f' (did you mean "{close[0]}"?)' if close else ""
            raise ConfigError(f'override {item!r}: unknown section "{parts[0]}"{hint}')
        node = raw
        for p in parts[:-1]:
            if node.get(p) is None:  # absent, or a section left empty in the file (`logging:`)
                node[p] = {}
            node = node[p]
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p} is not a section")
        try:
            value = _parse_scalar(text)
        except Exception as err:  # yaml's errors: a value cut at a space by the shell, an open bracket
            first = str(err).splitlines()[0]
            raise ConfigError(f"override {item!r}: expected a YAML value after '=', found {text!r} "
                              f"({first}); quote an override that holds spaces, e.g. \"{key}=[20, 24]\", "
                              f"or drop the spaces") from None
        node[parts[-1]] = interpolate(value, f"override {key}")
    return raw


def load_config(path: str | os.PathLike, overrides: list[str] = ()) -> Config:
    source = str(path)
    raw = load_yaml(path)
    raw = apply_overrides(raw, list(overrides), source)
    try:
        return config_from_dict(raw, source)
    except ConfigError as err:  # a key set on the command line: name the override, not only the file
        text = str(err)
        subject = re.sub(r"\(did you mean [^)]*\)", "", text)  # the key at fault, not the one suggested
        for item in reversed(overrides):  # (a key given twice: the last one is in effect)
            key = item.partition("=")[0].strip()
            if re.search(rf"(?<![\w.]){re.escape(key)}(?![\w.])", subject):  # optim.lr, not optim.lr_x
                raise ConfigError(f"override {item!r} (on {source}): "
                                  f"{text.removeprefix(source + ': ')}") from None
        raise


def config_from_dict(raw: dict, source: str = "config") -> Config:
    check_keys(raw, list(SECTIONS), "", source)
    classes = _section_classes()
    values = {}
    for name, cls in classes.items():
        section = raw.get(name, {})
        if section is None:
            section = {}
        _check_misplaced(section, name, classes, source)
        if not isinstance(section, dict):
            raise ConfigError(f'{source}: "{name}" must be a mapping, found {type(section).__name__}')
        values[name] = _build_section(cls, section, name, source)
    if "precision" in raw:
        values["precision"] = coerce_value(raw["precision"], str, f"{source}: precision")
    cfg = Config(**values, source=source)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Checks of single values and of numbers that must agree (with world size checked at run time)."""
    src = cfg.source
    for key, allowed in _CHOICES.items():
        if allowed is None:
            continue
        section, _, name = key.rpartition(".")
        value = getattr(getattr(cfg, section), name) if section else getattr(cfg, name)
        if value not in allowed:
            raise ConfigError(f"{src}: {key} must be one of {' | '.join(allowed)}, found {value!r}")
    positive = {"batch.micro_batch_size": cfg.batch.micro_batch_size, "intervals.log": cfg.intervals.log}
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{src}: {key} must be at least 1, found {value}")
    for key, value in {"batch.grad_accum_steps": cfg.batch.grad_accum_steps,
                       "batch.global_batch_tokens": cfg.batch.global_batch_tokens,
                       "target.steps": cfg.target.steps, "target.tokens": cfg.target.tokens,
                       "intervals.eval": cfg.intervals.eval, "intervals.checkpoint": cfg.intervals.checkpoint,
                       "intervals.eval_batches": cfg.intervals.eval_batches,
                       "schedule.warmup_steps": cfg.schedule.warmup_steps,
                       "data.num_workers": cfg.data.num_workers,
                       "checkpoint.keep_last": cfg.checkpoint.keep_last}.items():
        if value < 0:
            raise ConfigError(f"{src}: {key} must not be negative, found {value}")
    if not (math.isfinite(cfg.optim.lr) and cfg.optim.lr > 0):
        raise ConfigError(f"{src}: optim.lr must be a finite number above 0, found {cfg.optim.lr}")
    # a negative clip norm scales gradients by a negative factor (gradient ascent); inf: no clipping
    for key, value, finite in (("optim.grad_clip", cfg.optim.grad_clip, False),
                               ("optim.eps", cfg.optim.eps, True),
                               ("optim.weight_decay", cfg.optim.weight_decay, True),
                               ("schedule.min_lr", cfg.schedule.min_lr, True)):
        if not value >= 0 or (finite and math.isinf(value)):  # `not >=` catches NaN
            what = "a finite number >= 0" if finite else "a number >= 0"
            raise ConfigError(f"{src}: {key} must be {what}, found {value}")
    if cfg.target.steps == 0 and cfg.target.tokens == 0:
        raise ConfigError(f"{src}: set target.steps or target.tokens (both are 0)")
    if cfg.target.steps and cfg.target.tokens:
        # (one would silently win: an override of target.tokens on a config that sets steps did nothing)
        raise ConfigError(f"{src}: target.steps ({cfg.target.steps:,}) and target.tokens "
                          f"({cfg.target.tokens:,}) are both set; set one and the other to 0 (e.g. "
                          f"target.steps=0 target.tokens={cfg.target.tokens})")
    if not cfg.data.train_path:
        raise ConfigError(f"{src}: data.train_path is empty; expected the training .pbin (from fastlm data "
                          f"pack_encoded_data)")
    name = cfg.run.name
    if (not name.strip() or name.strip() in (".", "..") or Path(name).is_absolute()
            or ".." in Path(name).parts):  # (a/../../x: a folder outside output_dir)
        # the run folder is output_dir/name: an empty name would put one run's files among all runs' folders
        raise ConfigError(f"{src}: run.name must name a folder under run.output_dir ({cfg.run.output_dir}), "
                          f"found {name!r}")
    if len(cfg.optim.betas) != 2:
        raise ConfigError(f"{src}: optim.betas must be two numbers, found {cfg.optim.betas!r}")
    for i, beta in enumerate(cfg.optim.betas):
        if not 0 <= beta < 1:
            raise ConfigError(f"{src}: optim.betas[{i}] must be in [0, 1), found {beta}")
    if cfg.schedule.min_lr > cfg.optim.lr:
        raise ConfigError(f"{src}: schedule.min_lr ({cfg.schedule.min_lr}) exceeds optim.lr ({cfg.optim.lr})")
    if cfg.parallel.cuda_graphs and not cfg.parallel.compile:
        raise ConfigError(f"{src}: parallel.cuda_graphs needs parallel.compile: true (the graphs are those "
                          f"of the compiled blocks); found parallel.compile: false")
    if cfg.parallel.cuda_graphs and cfg.parallel.activation_checkpointing != "none":
        raise ConfigError(f"{src}: parallel.cuda_graphs does not go with activation checkpointing (found "
                          f"parallel.activation_checkpointing: {cfg.parallel.activation_checkpointing}); "
                          f"set one of them off")
    profile_window(cfg)


def profile_window(cfg: Config) -> tuple[int, int] | None:
    """logging.profile_steps as (first, last), 1-based and inclusive; None when off."""
    window = cfg.logging.profile_steps
    if not window:
        return None
    ok = (len(window) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in window)
          and 1 <= window[0] <= window[1])
    if not ok:
        raise ConfigError(f"{cfg.source}: logging.profile_steps must be [FIRST, LAST] "
                          f"with 1 <= FIRST <= LAST (e.g. [20, 24]), found {window!r}")
    return window[0], window[1]


@dataclass
class Derived:
    """Numbers that follow from the config and the world size, computed once at start."""

    world_size: int
    tokens_per_micro_batch: int  # per rank
    grad_accum_steps: int
    tokens_per_step: int  # across ranks
    steps: int
    total_tokens: int


def derive(cfg: Config, world_size: int, train_tokens: int | None = None) -> Derived:
    """Batch and target arithmetic; errors show the numbers."""
    src, seq = cfg.source, cfg.model.sequence_length
    per_micro = cfg.batch.micro_batch_size * seq
    if cfg.batch.global_batch_tokens:
        unit = per_micro * world_size
        if cfg.batch.global_batch_tokens % unit:
            raise ConfigError(
                f"{src}: batch.global_batch_tokens ({cfg.batch.global_batch_tokens:,}) is not divisible by "
                f"micro_batch_size x sequence_length x world_size = {cfg.batch.micro_batch_size} x {seq} x "
                f"{world_size} = {unit:,}"
            )
        accum = cfg.batch.global_batch_tokens // unit
        if cfg.batch.grad_accum_steps and cfg.batch.grad_accum_steps != accum:
            raise ConfigError(
                f"{src}: batch.grad_accum_steps ({cfg.batch.grad_accum_steps}) disagrees with "
                f"global_batch_tokens: {cfg.batch.global_batch_tokens:,} / "
                f"({cfg.batch.micro_batch_size} x {seq} x {world_size}) = {accum}"
            )
    else:
        accum = cfg.batch.grad_accum_steps or 1
    per_step = per_micro * accum * world_size
    steps = cfg.target.steps or -(-cfg.target.tokens // per_step)
    total = steps * per_step
    if train_tokens is not None and total > train_tokens and not cfg.target.allow_repeat:
        raise ConfigError(
            f"{src}: the run needs {steps:,} steps x {per_step:,} tokens = {total:,} tokens but "
            f"{cfg.data.train_path} holds {train_tokens:,}; lower target.steps/target.tokens or set "
            f"target.allow_repeat: true"
        )
    return Derived(world_size, per_micro, accum, per_step, steps, total)


def config_reference() -> list[tuple[str, str, str, str]]:
    """(key, type, default, doc) for every key of the config, the source of the README's reference."""
    rows = []
    for name, cls in _section_classes().items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            typ = getattr(hints[f.name], "__name__", str(hints[f.name]).replace("typing.", ""))
            rows.append((f"{name}.{f.name}", typ, repr(default),
                         f.metadata.get("doc", MODEL_DOCS.get(f.name, ""))))
    precision = next(f for f in dataclasses.fields(Config) if f.name == "precision")
    rows.append(("precision", "str", repr(precision.default), precision.metadata["doc"]))
    return rows


MODEL_DOCS = {
    "vocab_size": "the tokenizer's vocabulary size; the embedding is padded to a multiple of 64",
    "sequence_length": "tokens per training sample (context length)",
    "n_layer": "transformer blocks",
    "n_head": "attention (query) heads",
    "n_kv_head": "key/value heads (grouped-query attention); empty: n_head",
    "n_embd": "model width",
    "ffn_hidden": "MLP hidden width; empty: 4 x n_embd (gelu) or 8/3 x n_embd (swiglu)",
    "dropout": "dropout on embeddings and residual branches",
    "bias": "biases in linear layers and LayerNorm",
    "pos_encoding": "rope | learned | none",
    "rope_theta": "RoPE base",
    "norm": "layernorm | rmsnorm",
    "norm_eps": "normalisation epsilon",
    "activation": "gelu | swiglu",
    "tie_weights": "share the token embedding with the LM head",
    "attention": "auto (triton on CUDA, sdpa elsewhere) | triton | sdpa | manual",
    "loss": "auto (fused on CUDA, torch elsewhere) | fused | torch",
    "init_std": "standard deviation of the weight initialisation",
}


REFERENCE_BEGIN = "<!-- config-reference: generated by `python -m fastlm.config --reference`; do not edit -->"
REFERENCE_END = "<!-- end of config-reference -->"


def reference_markdown() -> str:
    """The README's config reference, one row per key of the typed config."""
    lines = [REFERENCE_BEGIN, "", "| key | type | default | meaning |", "|---|---|---|---|"]
    for key, typ, default, text in config_reference():
        lines.append(f"| `{key}` | {typ.replace(' | ', ' or ')} | `{default}` "
                     f"| {text.replace('|', '&#124;')} |")
    lines += ["", REFERENCE_END]
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["--reference"]:
        print(reference_markdown())
    else:
        print("usage: python -m fastlm.config --reference", file=sys.stderr)
        sys.exit(2)
