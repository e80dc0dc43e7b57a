"""Flash attention speed on GPU: fastlm's Triton kernel next to torch SDPA (whatever backend torch picks as
fastest; cuDNN's flash attention on an H200 with torch 2.11).

Causal forward + backward, bf16, head_dim 64, batch 8 x 16 heads (enough programs to fill an H100), for
T in {512, 1024, 2048}. TFLOP/s come from the explicit formula below, the same for both, and both are timed
in the same run with CUDA events after a warm-up (the warm-up also runs the Triton autotuner): one call as a
program sees it, host launch cost included (the bar's row). A second row per T times calls issued back to
back with one synchronisation at the end, as a model's step issues them: there the host runs ahead and its
cost shows only where it exceeds the kernels' time. A third gives the GPU kernel time alone
(torch.profiler), the kernels' own efficiency. Each case also checks that the two outputs, and their
gradients, agree with the fp32 reference equally well. Without CUDA the file skips.
"""

from __future__ import annotations

import statistics
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import gpu_kernel_times, record

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="attention benchmark needs a CUDA GPU (no CUDA device found)")

BATCH, N_HEAD, HEAD_DIM = 8, 16, 64
DTYPE = torch.bfloat16
WARMUP, REPS = 10, 30
FA2_H100_T1024 = 190.0  # FlashAttention-2's published figure: causal fwd+bwd, hd 64, T=1024, H100, TFLOP/s


def attention_flops(batch: int, n_head: int, seq: int, head_dim: int, causal: bool) -> float:
    """Forward: two matmuls (QK^T and PV) of 2*T*T*D flops each per head = 4*B*H*T*T*D. Backward: 2.5x the
    forward (five matmuls, QK^T recomputed). Causal attention does half the work. Returns fwd + bwd."""
    forward = 4.0 * batch * n_head * seq * seq * head_dim
    total = forward * (1.0 + 2.5)
    return total / 2 if causal else total


def fwd_bwd_step(fn, q, k, v, do) -> None:
    q.grad = k.grad = v.grad = None
    fn(q, k, v).backward(do)


def fwd_bwd_ms(fn, q, k, v, do) -> float:
    """Median milliseconds of one forward + backward, CUDA-event timed (host launch cost included)."""

    def step():
        fwd_bwd_step(fn, q, k, v, do)

    for _ in range(WARMUP):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(REPS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def fwd_bwd_ms_back_to_back(fn, q, k, v, do) -> float:
    """Milliseconds per forward + backward over REPS calls issued back to back (one synchronisation)."""
    for _ in range(WARMUP):
        fwd_bwd_step(fn, q, k, v, do)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(REPS):
        fwd_bwd_step(fn, q, k, v, do)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / REPS


def sdpa_causal(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


@pytest.mark.parametrize("seq", [512, 1024, 2048])
def test_flash_attention_fwd_bwd(benchmark, seq):
    from fastlm.kernels import attention_reference, flash_attention

    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, do = (torch.randn(BATCH, N_HEAD, seq, HEAD_DIM, device="cuda", generator=gen).to(DTYPE)
                   for _ in range(4))
    q.requires_grad_(), k.requires_grad_(), v.requires_grad_()

    # Agreement first (also compiles and autotunes): both against the fp32 reference on one batch element,
    # the kernel within 2x of SDPA's own bf16 error plus a bf16-ulp floor (the tests' rule, STYLE.md).
    with torch.no_grad():
        sl = slice(0, 1)
        ref = attention_reference(q[sl], k[sl], v[sl], causal=True).float()
        ours = flash_attention(q[sl], k[sl], v[sl], causal=True).float()
        theirs = sdpa_causal(q[sl], k[sl], v[sl]).float()
        err, torch_err = (ours - ref).abs().max().item(), (theirs - ref).abs().max().item()
    assert err <= 2 * torch_err + 2.0**-8, f"T={seq}: kernel error {err:.3g} vs SDPA error {torch_err:.3g}"

    def ours(a, b, c):
        return flash_attention(a, b, c, causal=True)

    ms = benchmark.pedantic(fwd_bwd_ms, args=(ours, q, k, v, do), rounds=1, iterations=1)
    sdpa_ms = fwd_bwd_ms(sdpa_causal, q, k, v, do)

    # The gradients too, now that the timed steps have chosen how dq is computed (BWD_DQ), by the same rule
    # on the same batch element.
    def grads(fn, dtype):
        a, b, c = (t[sl].detach().to(dtype).requires_grad_() for t in (q, k, v))
        out = fn(a, b, c)
        return torch.autograd.grad(out, (a, b, c), do[sl].to(out.dtype))

    ref_grads = grads(lambda a, b, c: attention_reference(a, b, c, causal=True), torch.float32)
    grad_errs = {}
    for name, g, t, r in zip(("dq", "dk", "dv"), grads(ours, DTYPE), grads(sdpa_causal, DTYPE), ref_grads):
        grad_errs[name] = (g.float() - r).abs().max().item(), (t.float() - r).abs().max().item()
        assert grad_errs[name][0] <= 2 * grad_errs[name][1] + 2.0**-8, f"T={seq} {name}: {grad_errs[name]}"
    # The same work as the GPU sees it (kernel time only, no host launch cost): the kernels' own efficiency.
    gpu_us, sdpa_gpu_us = (sum(gpu_kernel_times(lambda fn=fn: fwd_bwd_step(fn, q, k, v, do)).values())
                           for fn in (ours, sdpa_causal))
    flops = attention_flops(BATCH, N_HEAD, seq, HEAD_DIM, causal=True)
    tflops, sdpa_tflops = flops / ms / 1e9, flops / sdpa_ms / 1e9
    name = f"attention fwd+bwd causal bf16 B{BATCH} H{N_HEAD} T{seq} hd{HEAD_DIM}"
    # how the backward computed dq here (BWD_DQ "auto": the faster of two, timed on the first backward)
    fa = sys.modules["fastlm.kernels.flash_attention"]
    key = fa.backward_key((BATCH, N_HEAD, seq, HEAD_DIM), seq, True, DTYPE)
    record(name, tflops, "TFLOP/s", "torch SDPA", sdpa_tflops, bar=1.0, ms=ms, sdpa_ms=sdpa_ms,
           max_err=err, sdpa_max_err=torch_err, grad_max_err={n: e[0] for n, e in grad_errs.items()},
           sdpa_grad_max_err={n: e[1] for n, e in grad_errs.items()}, device=torch.cuda.get_device_name(),
           dq_mode=fa.DQ_CHOSEN.get(key), dq_mode_ms=fa.DQ_TIMES.get(key))
    print(f"  dq: {fa.DQ_CHOSEN.get(key)} (ms per backward as timed on first use: {fa.DQ_TIMES.get(key)})")
    # The same with the eager host path in C++ (HOST_PATH; off by default until measured here)
    fa.HOST_PATH = True
    try:
        host_ms, host_queued_ms = fwd_bwd_ms(ours, q, k, v, do), fwd_bwd_ms_back_to_back(ours, q, k, v, do)
    finally:
        fa.HOST_PATH = False
    record(f"{name}, C++ host path", flops / host_ms / 1e9, "TFLOP/s", "torch SDPA", sdpa_tflops, ms=host_ms,
           sdpa_ms=sdpa_ms)
    queued_ms, sdpa_queued_ms = (fwd_bwd_ms_back_to_back(fn, q, k, v, do) for fn in (ours, sdpa_causal))
    record(f"{name}, C++ host path, calls back to back", flops / host_queued_ms / 1e9, "TFLOP/s",
           "torch SDPA", flops / sdpa_queued_ms / 1e9, ms=host_queued_ms, sdpa_ms=sdpa_queued_ms)
    record(f"{name}, calls back to back", flops / queued_ms / 1e9, "TFLOP/s", "torch SDPA",
           flops / sdpa_queued_ms / 1e9, ms=queued_ms, sdpa_ms=sdpa_queued_ms)
    record(f"{name}, GPU kernel time", gpu_us, "us", "torch SDPA kernels", sdpa_gpu_us,
           higher_is_better=False)
    if seq == 1024:
        record(name, tflops, "TFLOP/s", "FlashAttention-2 (quoted published figure, H100)", FA2_H100_T1024,
               measured_baseline=False)


def test_attention_on_the_packed_projection():
    """gpt124m's attention layer as a model calls it (B16 T1024, 12 heads of 64, bf16), forward + backward
    down to the projection's gradient, GPU kernel time: flash_attention_qkv on the packed projection (dq,
    dk, dv written into one gradient) against flash_attention on the split views, whose backward autograd
    concatenates into the projection's gradient (a copy of all of it), and against SDPA on the same views.
    """
    from fastlm.kernels import flash_attention, flash_attention_qkv

    batch, seq, n_head = 16, 1024, 12
    gen = torch.Generator(device="cuda").manual_seed(0)
    proj = torch.randn(batch, seq, 3 * n_head * HEAD_DIM, device="cuda", generator=gen).to(DTYPE)
    proj.requires_grad_()
    do = torch.randn(batch, seq, n_head, HEAD_DIM, device="cuda", generator=gen).to(DTYPE).transpose(1, 2)

    def views(x):
        return [t.view(batch, seq, n_head, HEAD_DIM).transpose(1, 2) for t in x.split(n_head * HEAD_DIM, -1)]

    ways = {"packed": lambda x: flash_attention_qkv(x, n_head, n_head),
            "split": lambda x: flash_attention(*views(x), causal=True),
            "sdpa": lambda x: sdpa_causal(*views(x))}
    grads = {}

    def step(fn):
        proj.grad = None
        fn(proj).backward(do)

    for name, fn in ways.items():
        for _ in range(WARMUP):
            step(fn)
        grads[name] = proj.grad.clone()
    # the same kernels: dk and dv agree bit for bit (dq too, unless "auto" chose atomic adds)
    assert torch.equal(grads["packed"][..., n_head * HEAD_DIM:], grads["split"][..., n_head * HEAD_DIM:])
    us = {name: sum(gpu_kernel_times(lambda fn=fn: step(fn)).values()) for name, fn in ways.items()}
    label = (f"attention fwd+bwd on a packed qkv projection, bf16 B{batch} H{n_head} T{seq} hd{HEAD_DIM}, "
             "GPU time")
    record(label, us["packed"], "us", "fastlm on split views (gradients concatenated)", us["split"],
           higher_is_better=False)
    record(label, us["packed"], "us", "SDPA on split views (gradients concatenated)", us["sdpa"],
           higher_is_better=False)
