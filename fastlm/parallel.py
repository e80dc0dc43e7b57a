"""Distributed set-up and `parallelize`: activation checkpointing, per-block compile and data parallelism
(FSDP2, or DDP when FSDP is off), applied as separate switchable steps in that order (each a no-op when
disabled), torchtitan style.

fastlm relies on torch.distributed and torchrun for processes and rendezvous; it adds no launcher.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from fastlm.config import ParallelSection


# environment variable: "1" makes torchrun with one process join a process group and run the data-parallel
# path (FSDP2 or DDP) over one rank, as the training benchmark does to measure that path's per-rank cost
ONE_RANK_GROUP = "FASTLM_ONE_RANK_GROUP"


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    mesh: object = None  # a 1-D DeviceMesh when distributed

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1 or dist.is_initialized()


def check_communication(d: Dist) -> str:
    """Modalities' `run --test_comm`: an all-reduce across the ranks before training, each rank adding its
    rank + 1, checked against the sum it must give (a mismatch or a hang shows a broken interconnect before a
    run is built on it). Returns the line rank 0 prints."""
    if not d.enabled:
        return "communication test: one process, nothing to test"
    start = time.perf_counter()
    x = torch.full((1024,), float(d.rank + 1), device=d.device)
    dist.all_reduce(x)
    want = d.world_size * (d.world_size + 1) / 2
    if not bool((x == want).all()):
        raise RuntimeError(f"communication test: an all-reduce over {d.world_size} ranks gave "
                           f"{x[0].item()} on rank {d.rank}, expected {want:g}")
    dist.barrier()
    return (f"communication test: all-reduce over {d.world_size} ranks ({dist.get_backend()}) ok in "
            f"{(time.perf_counter() - start) * 1e3:.1f} ms")


def setup_distributed(device_pref: str = "auto", source: str = "config") -> Dist:
    """Join the process group torchrun prepared (nccl on CUDA, gloo on CPU), or run as one process.
    `source` names the config file in errors."""
    use_cuda = torch.cuda.is_available() if device_pref == "auto" else device_pref == "cuda"
    if device_pref == "cuda" and not torch.cuda.is_available():
        from fastlm.yamlconf import ConfigError

        raise ConfigError(f"{source}: run.device is cuda but torch finds no CUDA device "
                          f"(torch.cuda.is_available() is false); set run.device: auto or cpu")
    if "RANK" not in os.environ:  # plain `python -m fastlm.train`
        return Dist(device=torch.device("cuda", 0) if use_cuda else torch.device("cpu"))
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if world == 1 and os.environ.get(ONE_RANK_GROUP) != "1":
        # torchrun with one process: FSDP over a single rank shards nothing and only adds work (on one H200,
        # gpt124m under FSDP2 trained at 0.60x the speed of a plain PyTorch loop; see benchmarks/results/),
        # so one process runs the single-device path: no process group, bf16 autocast. (ONE_RANK_GROUP=1
        # keeps the process group: the multi-GPU path's per-rank cost, measured on one GPU.)
        if use_cuda:
            torch.cuda.set_device(local)
        return Dist(device=torch.device("cuda", local) if use_cuda else torch.device("cpu"), local_rank=local)
    if use_cuda:
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if use_cuda else "gloo", device_id=device if use_cuda else None)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (world,))
    return Dist(rank, world, local, device, mesh)


def teardown_distributed() -> None:
    """Leave the process group once every rank is done: a rank that destroyed it while another was still at
    work (rank 0 writing the consolidated model) aborted in gloo's teardown now and then (SIGABRT, so that
    torchrun reported a finished run as failed)."""
    if dist.is_initialized():
        try:
            dist.barrier()
        except Exception:  # (a rank that failed or was stopped: leave anyway)
            pass
        dist.destroy_process_group()


def parallelize(model, pcfg: ParallelSection, d: Dist, param_dtype: torch.dtype) -> None:
    """Apply, in order: activation checkpointing (recompute inside the block, so it composes with FSDP's
    per-block gather), per-block torch.compile (before sharding, so compiled code sees plain modules
    wrapped by FSDP's hooks; with cuda_graphs, replayed as CUDA graphs), then, with several processes,
    FSDP2 per block and the root (bf16/fp16 compute with fp32 gradient reduction) or, with parallel.fsdp
    off, DDP through the composable `replicate` (the model keeps its class and parameter names; fp32
    gradients all-reduced in buckets during the backward; mixed precision is the caller's autocast).

    Why both: FSDP2 keeps a 1/N share of parameters, gradients and optimizer state per rank but runs
    Python hooks around every block and gathers each block's parameters (twice with
    reshard_after_forward); DDP keeps everything on every rank and only all-reduces gradients from C++.
    For a model that fits one GPU several times over, DDP's step has less host work (see
    benchmarks/test_data_parallel_overhead.py)."""
    if pcfg.activation_checkpointing != "none":
        for i, block in enumerate(model.blocks):
            block.checkpointing = pcfg.activation_checkpointing == "full" or i % 2 == 0
    if pcfg.compile:
        # reduce-overhead: inductor captures each compiled graph (a block's forward, its backward) as a CUDA
        # graph on its second call and replays it after; the training loop marks where a step begins
        # (mark_step_begin), after which the graphs may overwrite the previous step's outputs
        mode = "reduce-overhead" if pcfg.cuda_graphs else None
        for block in model.blocks:
            block.compile(mode=mode)
    if pcfg.fsdp and d.mesh is not None:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
        for block in model.blocks:
            fully_shard(block, mesh=d.mesh, mp_policy=mp, reshard_after_forward=pcfg.reshard_after_forward)
        # the root keeps embeddings, final norm and LM head; no point resharding what backward needs first
        fully_shard(model, mesh=d.mesh, mp_policy=mp, reshard_after_forward=False)
    elif d.mesh is not None:
        from torch.distributed._composable.replicate import replicate

        # (built lazily at the first forward, after the parameters are materialised and initialised;
        # it broadcasts rank 0's parameters, which every rank initialised identically anyway)
        replicate(model, device_id=d.device)
        if pcfg.compile:
            # Inside a DDP forward, torch.compile cuts each graph at DDP's bucket edges (DDPOptimizer: a
            # 1 MB first bucket, then 25 MB) so that a bucket's all-reduce can start before the graph's
            # backward ends. Compiled per block, gradients are already ready a block at a time; the cut
            # would only cost a graph break inside every block (two compiled pieces, no fusion across).
            torch._dynamo.config.optimize_ddp = False
