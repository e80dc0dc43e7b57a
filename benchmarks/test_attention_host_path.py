"""Host time of a flash attention forward + backward: the Python between the call and its kernel launches.

Below T ~ 2048 one attention call on an H100 is bound by it (benchmarks/test_attention_speed.py: the
kernels of a B8 H16 T512 call take ~90 us of GPU time, the call ~640 us of wall time at commit 662ca35).
This benchmark measures that path on any machine, GPU or not: the real autograd Function, validation,
allocations, tuning lookups and launch path of `fastlm.kernels.flash_attention`, with every kernel
replaced by a stand-in that launches nothing. It compares, in the same run:

- fastlm as it runs (launch plans: a call's direct launches replayed for later calls of the same layout);
- fastlm with the plans switched off: every launch through the per-launch direct path (signature, options,
  grid function), what the code did before the plans;
- fastlm with its launches through the Python half of Triton's CUDA launcher, given tensors, as they went
  before they called its C half directly with addresses (kernels/launch.py `kernel_launcher`; what that
  saves in the C half, a data_ptr() call and a driver query per tensor, shows only with real launches: the
  GPU test at the end of this file);
- fastlm's eager host path in C++ (kernels/attention_host.cpp; fastlm.kernels.flash_attention.HOST_PATH):
  the same plans replayed from a C++ autograd node, without Python between the call and the launches;
- the floor for any Python autograd Function: one that allocates its output and gradients and does
  nothing else (torch's own autograd machinery, which fastlm's path also pays);
- and what a compiled model's graph calls instead, fastlm's forward and backward ops, against the same
  two functions declared with torch.library.custom_op (whose wrappers fastlm's ops leave out).

And the attention of a model without rotary embedding both ways: on the packed projection
(flash_attention_qkv, one gradient) against its split into q, k, v views (flash_attention, whose backward
autograd concatenates), eager and as a compiled graph's ops. The packed way saves GPU time (no copy of the
projection's gradient); these rows say what it costs or saves on the host.

Tensors are tiny: on a GPU the caching allocator makes an allocation cost the same at any size, while on
a CPU a large one would pay for fresh pages, which is not what a GPU host pays. It runs in a subprocess
without Triton's interpreter (which would make the launches not direct) and without touching the kernels
that other benchmarks of this session use.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from conftest import ROOT, record

SCRIPT = textwrap.dedent("""
    import json, sys, time
    import torch
    import fastlm.kernels
    fa = sys.modules["fastlm.kernels.flash_attention"]

    from triton.backends.nvidia.driver import CudaLauncher
    launch_mod = sys.modules["fastlm.kernels.launch"]

    def launch(*args):  # Triton's generated C launcher, launching nothing
        pass

    class Compiled:  # a compiled kernel: Triton's CUDA launcher (its Python half) around that C function
        function, packed_metadata = "function", "metadata"
        run = CudaLauncher.__new__(CudaLauncher)
        run.launch, run.num_ctas, run.global_scratch_size, run.profile_scratch_size = launch, 1, 0, 0
        run.global_scratch_align = run.profile_scratch_align = 1
        run.launch_cooperative_grid = run.launch_pdl = False

    class Jit:
        def __init__(self, fn):
            self.arg_names = fn.arg_names
        def __getitem__(self, grid):
            return lambda *args, **kwargs: Compiled()

    class Chosen(dict):  # as if autotuning had chosen each kernel's first config
        def __init__(self, config):
            self.config = dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
        def get(self, key, default=None):
            return self.config

    for launcher in (fa._FWD.launch, fa._BWD_Q.launch, fa._BWD_KV.launch, fa._BWD_KV_ATOMIC.launch,
                     fa._PREP, fa._SCALE_CAST):
        launcher.fn, launcher.direct = Jit(launcher.fn), True
        launcher.current_device, launcher.current_stream = (lambda: 0), (lambda device: 0)
    for tuned in (fa._FWD, fa._BWD_Q, fa._BWD_KV, fa._BWD_KV_ATOMIC):
        tuned.chosen = Chosen(tuned.kernel.configs[0])
    fa._INTERPRET = True  # CPU tensors past the device check (the launches stay direct)
    fa.BWD_DQ = "separate"  # as "auto" chose at every T on the H100

    # the model's layout: q, k, v are (batch, heads, seq, head_dim) views of one projection
    batch, heads, seq, head_dim = 2, 2, 16, 64
    qkv = torch.randn(batch, seq, 3, heads, head_dim)
    q, k, v = (qkv[:, :, i].transpose(1, 2).detach().requires_grad_() for i in range(3))
    do = torch.randn(batch, heads, seq, head_dim)

    class Floor(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v):
            ctx.save_for_backward(q, k, v)
            return torch.empty_like(q)
        @staticmethod
        def backward(ctx, do):
            q, k, v = ctx.saved_tensors
            return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    plans_apply = fa._plans_apply
    def step(attention):
        q.grad = k.grad = v.grad = None
        attention(q, k, v).backward(do)
    def launch_through_triton(on):  # the kernels' launches through Triton's launcher, given tensors
        launch_mod.RAW_LAUNCH = not on
        fa.forget_launches()

    ways = {"plans": fastlm.kernels.flash_attention, "no plans": fastlm.kernels.flash_attention,
            "plans, Triton's launcher": fastlm.kernels.flash_attention, "floor": Floor.apply,
            "C++ host path": fastlm.kernels.flash_attention}
    best = {name: float("inf") for name in ways}
    for _ in range(7):  # interleaved rounds, the best of each: the least disturbed by other processes
        for name, attention in ways.items():
            fa._plans_apply = plans_apply if name != "no plans" else (lambda: False)
            fa.HOST_PATH = fa._HOST_ON_CPU = name == "C++ host path"
            launch_through_triton(name == "plans, Triton's launcher")
            for _ in range(100):
                step(attention)
            n = 1000
            start = time.perf_counter()
            for _ in range(n):
                step(attention)
            best[name] = min(best[name], (time.perf_counter() - start) / n * 1e6)
    fa._plans_apply = plans_apply
    fa.HOST_PATH = fa._HOST_ON_CPU = False
    host_replays = fa._HOST.replays()
    launch_through_triton(False)

    # What a compiled graph calls: the forward op and, in the compiled backward, the backward op (grad
    # mode off, as AOTAutograd runs them), against the same functions declared with custom_op.
    @torch.library.custom_op("fastlm_bench::forward", mutates_args=())
    def custom_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                       sm_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        return fa._forward(q, k, v, causal, sm_scale)

    @torch.library.custom_op("fastlm_bench::backward", mutates_args=())
    def custom_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                        lse: torch.Tensor, causal: bool,
                        sm_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return fa._backward(do, q, k, v, o, lse, causal, sm_scale)

    # the model's attention without rope: on the packed projection, or split into views (its backward
    # concatenates the three gradients)
    projection = torch.randn(batch, seq, 3 * heads * head_dim, requires_grad=True)

    def split(x):
        views = [t.view(batch, seq, heads, head_dim).transpose(1, 2) for t in x.split(heads * head_dim, -1)]
        return fastlm.kernels.flash_attention(*views)

    def packed(x):
        return fastlm.kernels.flash_attention_qkv(x, heads, heads)

    for _ in range(7):
        for name, attention in (("split", split), ("packed", packed)):
            for _ in range(100):
                projection.grad = None
                attention(projection).backward(do)
            n = 1000
            start = time.perf_counter()
            for _ in range(n):
                projection.grad = None
                attention(projection).backward(do)
            best[name] = min(best.get(name, float("inf")), (time.perf_counter() - start) / n * 1e6)

    qd, kd, vd = (t.detach() for t in (q, k, v))
    pd = projection.detach()
    ops = {"ops": (fa._forward_op, fa._backward_op), "custom_op": (custom_forward, custom_backward),
           "packed ops": (lambda q, k, v, causal, scale: fa._qkv_forward_op(pd, heads, heads, causal, scale),
                          lambda do, q, k, v, o, lse, causal, scale: fa._qkv_backward_op(
                              do, pd, o, lse, heads, heads, causal, scale))}
    for _ in range(7):
        for name, (forward, backward) in ops.items():
            def op_step():
                o, lse = forward(qd, kd, vd, True, 0.125)
                backward(do, qd, kd, vd, o, lse, True, 0.125)
            with torch.no_grad():
                for _ in range(100):
                    op_step()
                n = 1000
                start = time.perf_counter()
                for _ in range(n):
                    op_step()
            best[name] = min(best.get(name, float("inf")), (time.perf_counter() - start) / n * 1e6)
    replays = sum(plan.replays for plan in fa._PLANS.values())
    print("RESULT " + json.dumps({**best, "replays": replays, "host_replays": host_replays}))
""")


def test_attention_host_path():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *(p for p in sys.path if p)])
    env.setdefault("OMP_NUM_THREADS", "1")
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True,
                         timeout=600, check=True)
    us = json.loads(out.stdout.split("RESULT ", 1)[1])
    assert us["replays"] > 0  # the plans were used (not a silent fallback to the path without them)
    name = "attention host path per fwd+bwd (kernels stubbed out)"
    record(name, us["plans"], "us", "fastlm without launch plans", us["no plans"], higher_is_better=False)
    record(name, us["plans"], "us", "the same through the Python half of Triton's launcher, given tensors",
           us["plans, Triton's launcher"], higher_is_better=False)
    record(name, us["plans"], "us", "an autograd.Function that only allocates (the floor)", us["floor"],
           higher_is_better=False)
    print(f"  host time beyond the floor: {us['plans'] - us['floor']:.0f} us with plans, "
          f"{us['no plans'] - us['floor']:.0f} us without")
    assert us["host_replays"] > 0  # the C++ path replayed its plans (no silent fallback to Python's)
    record(name, us["C++ host path"], "us", "fastlm's Python path (autograd.Function, plans replayed)",
           us["plans"], higher_is_better=False)
    ops = "attention ops of a compiled graph, host time per fwd+bwd (kernels stubbed out)"
    record(ops, us["ops"], "us", "the same ops declared with torch.library.custom_op", us["custom_op"],
           higher_is_better=False)
    record("attention on a packed qkv projection, host time per fwd+bwd (kernels stubbed out)", us["packed"],
           "us", "split into q, k, v views (the backward concatenates)", us["split"], higher_is_better=False)
    record(f"{ops}: the packed ops", us["packed ops"], "us", "the ops over split views", us["ops"],
           higher_is_better=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the real launches need a CUDA GPU")
def test_attention_host_time_on_gpu():
    """The same path with its real launches, on a shape whose GPU work (B1 H1 T128) is far below the host's:
    microseconds of wall time per forward + backward issued back to back, which is then the host's time.
    fastlm as it runs (its direct launches call the C half of Triton's launcher, tensors given as
    addresses) against the same launches through Triton's whole launcher (whose C half calls each
    tensor's data_ptr() and asks the driver about the address), and against SDPA; and the C++ host path
    (HOST_PATH) against the Python path and SDPA.

    Two more rows take that time apart, since the stubbed benchmark above (CPU tensors, nothing launched)
    has measured far less than a real call costs on a GPU's host: fastlm with its launch plans' launches
    replaced by a function that does nothing (CUDA tensors and everything else real: what the launches
    themselves cost), and the floor with CUDA tensors (an autograd Function that only allocates its output
    and gradients: what torch's autograd costs any Python Function there, the backward run by the device's
    autograd thread)."""
    from fastlm.kernels import flash_attention

    import fastlm.kernels.launch as launch_mod

    fa = sys.modules["fastlm.kernels.flash_attention"]
    q, k, v, do = (torch.randn(1, 1, 128, 64, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    for t in (q, k, v):
        t.requires_grad_()

    def ours(a, b, c):
        return flash_attention(a, b, c, causal=True)

    def sdpa(a, b, c):
        return torch.nn.functional.scaled_dot_product_attention(a, b, c, is_causal=True)

    class Floor(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a, b, c):
            ctx.save_for_backward(a, b, c)
            return torch.empty_like(a)

        @staticmethod
        def backward(ctx, grad):
            a, b, c = ctx.saved_tensors
            return torch.empty_like(a), torch.empty_like(b), torch.empty_like(c)

    def nothing(*args):  # in place of the C launcher: launches nothing
        pass

    kept: dict = {}

    def set_up(name: str) -> None:
        for plan, launches in kept.items():  # the real launches back
            plan.launches = launches
        kept.clear()
        launch_mod.RAW_LAUNCH = name != "triton"
        fa.HOST_PATH = name == "host"
        fa.forget_launches()
        if name == "stubbed":
            for _ in range(3):  # the plans, made of real launches
                step(ours)
            for plan in fa._PLANS.values():
                kept[plan] = plan.launches
                plan.launches = tuple(((nothing, head, addresses), *rest)
                                      for (_, head, addresses), *rest in plan.launches)

    def step(fn):
        q.grad = k.grad = v.grad = None
        fn(q, k, v).backward(do)

    ways = {"raw": ours, "triton": ours, "stubbed": ours, "floor": Floor.apply, "sdpa": sdpa, "host": ours}
    best = dict.fromkeys(ways, float("inf"))
    replays = 0
    try:
        for _ in range(5):
            for name, fn in ways.items():
                set_up(name)
                for _ in range(20):
                    step(fn)
                torch.cuda.synchronize()
                n = 300
                before = sum(plan.replays for plan in kept)
                start = time.perf_counter()
                for _ in range(n):
                    step(fn)
                torch.cuda.synchronize()
                best[name] = min(best[name], (time.perf_counter() - start) / n * 1e6)
                replays += sum(plan.replays for plan in kept) - before
    finally:
        set_up("raw")
    # every stubbed call replayed its forward's and its backward's plan (none launched through Triton)
    assert replays == 5 * 300 * 2, f"stubbed calls replayed {replays} plans, expected {5 * 300 * 2}"
    name = (f"attention host time per fwd+bwd on {torch.cuda.get_device_name()} (B1 H1 T128, calls back to "
            "back)")
    record(name, best["raw"], "us", "the launches through Triton's whole launcher", best["triton"],
           higher_is_better=False)
    record(name, best["raw"], "us", "torch SDPA", best["sdpa"], higher_is_better=False)
    record(name, best["raw"], "us", "the same with its launches stubbed out (what the launches cost)",
           best["stubbed"], higher_is_better=False)
    record(name, best["host"], "us", "fastlm's Python path (the row's first)", best["raw"],
           higher_is_better=False)
    record(f"{name}, C++ host path", best["host"], "us", "torch SDPA", best["sdpa"], higher_is_better=False)
    record(f"{name}, launches stubbed out", best["stubbed"], "us",
           "an autograd.Function that only allocates, on CUDA (the floor)", best["floor"],
           higher_is_better=False)
