"""Checkpoints of the full training state with torch.distributed.checkpoint (DCP).

Layout of a run folder:

    RUN/checkpoints/step_00000100/   DCP shards of model + optimizer, train_state.json, rng_rank*.json
    RUN/checkpoints/latest           the name of the newest complete checkpoint (written last)
    RUN/model.safetensors, model.json   the consolidated model for generation and sharing

A checkpoint is written to a temporary folder and renamed when every rank has finished, so a crash
mid-write leaves only a `.tmp` folder that `resume=auto` ignores. Non-tensor state (step, tokens, data
position, RNG states) is JSON, never pickle. DCP's own `.metadata` file is a pickle: it is read with an
unpickler that knows only the classes DCP metadata is made of (`SafeReader`), so a crafted checkpoint
cannot run code; DCP reads the tensors themselves with torch.load(weights_only=True).
"""

from __future__ import annotations

import base64
import json
import os
import pickle
import re
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from fastlm.atomic import atomic_output
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

STEP_DIR = re.compile(r"^step_(\d{8})$")


# What DCP's .metadata pickle is made of (torch 2.4-2.13): its metadata dataclasses, the file reader's
# storage records, paths, sizes, dtypes and layouts. Nothing else may be named in the file.
_METADATA_GLOBALS = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "ChunkStorageMetadata",
        "TensorStorageMetadata", "BytesStorageMetadata", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"},
    "pathlib._local": {"Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}


class UnsafeCheckpointError(ValueError):
    pass


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file, source: str):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str):
        if name in _METADATA_GLOBALS.get(module, ()) or (
                module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise UnsafeCheckpointError(
            f"{self.source}: expected DCP checkpoint metadata, found a reference to {module}.{name}, which "
            f"DCP metadata does not contain; the file was not loaded (unpickling it could run code)")


class SafeReader(FileSystemReader):
    """DCP's file reader, but its .metadata pickle is read by `_MetadataUnpickler`."""

    def read_metadata(self, *args, **kwargs):
        rank = kwargs.get("rank")
        cache = self.__dict__.setdefault("_read", {})  # DCP asks again for what a caller already read
        if rank not in cache:
            cache[rank] = self._read_metadata(rank)
        metadata = cache[rank]
        metadata.storage_meta.load_id = getattr(self, "load_id", None)
        return metadata

    def _read_metadata(self, rank):
        name = ".metadata" if rank is None else f"__{rank}.metadata"
        path = Path(self.path) / name
        with open(path, "rb") as f:
            try:
                metadata = _MetadataUnpickler(f, str(path)).load()
            except UnsafeCheckpointError:
                raise
            except Exception as err:
                raise ValueError(f"{path}: expected DCP checkpoint metadata, found an unreadable file "
                                 f"({type(err).__name__}: {err})") from None
        if not hasattr(metadata, "state_dict_metadata"):
            raise ValueError(f"{path}: expected DCP checkpoint metadata, found a {type(metadata).__name__}")
        if getattr(metadata, "storage_meta", None) is None:
            from torch.distributed.checkpoint.metadata import StorageMeta

            metadata.storage_meta = StorageMeta()
        return metadata


def dcp_io(fn, state: dict, path, reader: SafeReader | None = None) -> None:
    """dcp.save or dcp.load of `state` at `path`, across the process group or, without one, by this process
    alone (DCP then warns that it runs alone: that is the intent, so the warning is dropped).

    Loads read the metadata through `SafeReader` (`reader`, when the caller has read it already), before
    DCP asks for it, so that a bad file is one clear ValueError. DCP reports any other failure as a
    CheckpointException (a BaseException, which `except Exception` misses): it is raised again as a
    ValueError that names the checkpoint and the first failure, e.g. a tensor whose shape does not fit."""
    from torch.distributed.checkpoint.api import CheckpointException

    if fn is dcp.load:
        reader = reader or SafeReader(str(path))
        check_files(path, reader.read_metadata())
        kwargs = {"storage_reader": reader}
    else:
        kwargs = {"checkpoint_id": str(path)}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        try:
            fn(state, no_dist=not dist.is_initialized(), **kwargs)
        except CheckpointException as err:
            failures = [exc for exc, _trace in err.failures.values()]
            what = f"{type(failures[0]).__name__}: {failures[0]}" if failures else str(err)
            # a file that is missing or cannot be read is damage, not a model that does not fit
            kind = CheckpointFilesError if failures and isinstance(failures[0], OSError) else ValueError
            raise kind(f"{path}: {'loading' if fn is dcp.load else 'saving'} the checkpoint failed on "
                       f"{len(failures) or 'some'} rank(s); the first failure: {what}") from None


class CheckpointFilesError(ValueError):
    """A checkpoint's file is missing, truncated or unreadable (DCP's failure was an OSError)."""


def check_files(path, metadata) -> None:
    """CheckpointFilesError naming the first data file that the metadata needs and the folder lacks, or
    that ends before the last byte the metadata places in it (a save cut short, a partial copy): checked
    from file sizes before DCP reads anything, which would fail with an EOFError that names no file."""
    needed: dict[str, int] = {}
    for info in metadata.storage_data.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, end in sorted(needed.items()):
        file = Path(path) / name
        if not file.is_file():
            raise CheckpointFilesError(f"{path}: the checkpoint's data file {name} is missing (its .metadata "
                                       f"lists it); the checkpoint is damaged")
        size = file.stat().st_size
        if size < end:
            raise CheckpointFilesError(f"{file}: holds {size:,} bytes but the checkpoint's .metadata places "
                                       f"data up to byte {end:,}: the file is truncated (a save cut short, "
                                       f"or a partial copy); the checkpoint is damaged")


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def _rng_state() -> dict:
    state = {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
    if torch.cuda.is_available():
        state["cuda"] = base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode()
    return state


def _set_rng_state(state: dict) -> None:
    def tensor(text):
        return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)

    torch.set_rng_state(tensor(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensor(state["cuda"]))


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def save(run_dir: Path, step: int, model, optimizer, train_state: dict, keep_last: int) -> Path:
    """Save the whole training state at `step` (a collective: every rank calls it).

    keep_last > 0 keeps that many complete checkpoints up to this one, this one included, and removes the
    older ones. Checkpoints of later steps are left alone: they come from an earlier run of this folder that
    went further (this run resumed from an earlier checkpoint); keeping the last K of all checkpoints would
    delete the one just written and leave `latest` naming nothing."""
    root = checkpoint_root(run_dir)
    final = root / f"step_{step:08d}"
    tmp = root / f".step_{step:08d}.tmp"
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    _barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp_io(dcp.save, {"model": model_sd, "optim": optim_sd}, tmp)
    _write_json(tmp / f"rng_rank{_rank()}.json", _rng_state())
    _barrier()
    if _rank() == 0:
        _write_json(tmp / "train_state.json", train_state)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_json(root / "latest", {"checkpoint": final.name})
        if keep_last > 0:
            older = [p for p in complete_checkpoints(run_dir) if _step_of(p) < step]
            for old in older[:max(0, len(older) - (keep_last - 1))]:
                shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def holds_checkpoint(path: Path) -> bool:
    """Whether the folder holds a whole checkpoint's files (DCP .metadata, written when every shard is,
    and train_state.json, written last): what a folder given by path must have, whatever its name."""
    return (path / ".metadata").is_file() and (path / "train_state.json").is_file()


def is_complete(path: Path) -> bool:
    """A complete checkpoint of a run's checkpoints folder: the files, under the step_NNNNNNNN name a save
    gives its temporary folder only when done (a scan skips a temporary folder that has the files)."""
    return STEP_DIR.match(path.name) is not None and holds_checkpoint(path)


def _step_of(path: Path) -> int:
    return int(STEP_DIR.match(path.name).group(1))


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary folders of interrupted saves are skipped)."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and is_complete(p)), key=_step_of)


def incomplete_checkpoints(run_dir: Path) -> list[Path]:
    """Folders named as checkpoints (step_NNNNNNNN) that are not complete: damaged, since a save writes a
    temporary folder and gives it that name only when complete."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name) and not is_complete(p)),
                  key=_step_of)


def find_latest(run_dir: Path) -> Path | None:
    """The newest complete checkpoint: the `latest` pointer when it names one, else a scan."""
    root = checkpoint_root(run_dir)
    try:
        name = json.loads((root / "latest").read_text())["checkpoint"]
        if is_complete(root / name):
            return root / name
    except (OSError, ValueError, KeyError, TypeError):
        pass
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def read_train_state(path: Path) -> dict:
    """train_state.json of the checkpoint at `path` (step, tokens, data position, world size, config),
    checked: read before any tensor, so that a broken checkpoint is named before DCP loads anything."""
    path = Path(path)
    if not holds_checkpoint(path):
        raise FileNotFoundError(
            f"{path}: not a complete fastlm checkpoint (expected DCP .metadata and train_state.json)"
        )
    file = path / "train_state.json"
    try:
        state = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{file}: expected the checkpoint's training state as JSON, found an unreadable "
                         f"file ({err})") from None
    counts = ("step", "tokens", "data_position")  # data_position: absent in checkpoints of older versions

    def count(key):
        if key == "data_position" and key not in state:
            return True
        return type(state.get(key)) is int and state[key] >= 0

    if not (isinstance(state, dict) and all(count(key) for key in counts)):
        found = {k: state.get(k) for k in counts} if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{file}: expected a JSON object with step, tokens and data_position counts, "
                         f"found {found}")
    return state


def load(path: Path, model, optimizer) -> dict:
    """Load model and optimizer state (resharded to this run's world size) and this rank's RNG state;
    returns train_state.json's content (checked first, by `read_train_state`)."""
    path = Path(path)
    train_state = read_train_state(path)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp_io(dcp.load, state, path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rng_file = path / f"rng_rank{_rank()}.json"
    if not rng_file.is_file():  # fewer ranks wrote the checkpoint than read it
        rng_file = path / "rng_rank0.json"
    try:
        rng = json.loads(rng_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{rng_file}: the checkpoint's random number generator state is missing or "
                         f"unreadable ({getattr(err, 'strerror', None) or err}); every rng_rank*.json a save "
                         f"writes is needed to continue bit for bit") from None
    _set_rng_state(rng)
    return train_state


def save_consolidated(run_dir: Path, model, model_config: dict) -> Path | None:
    """model.safetensors (full, unsharded, fp32, tied weights stored once) + model.json, on rank 0."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    sd = get_model_state_dict(model, options=options)
    if _rank() != 0:
        return None
    from safetensors.torch import save_file

    if model_config.get("tie_weights"):
        sd.pop("lm_head.weight", None)
    sd = {k: v.contiguous().float() for k, v in sd.items()}
    out = Path(run_dir) / "model.safetensors"
    with atomic_output(out) as tmp:
        save_file(sd, tmp, metadata={"format": "fastlm", "config": json.dumps(model_config)})
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # safetensors creates it 0600; the other outputs follow the umask
    _write_json(Path(run_dir) / "model.json", model_config)
    return out
