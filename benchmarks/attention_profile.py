"""Where the time of fastlm's flash attention goes on a GPU (a diagnostic, not a benchmark with a bar):

    python benchmarks/attention_profile.py                  # the kernels
    python benchmarks/attention_profile.py --compiled-block # the kernels inside a compiled block

For the benchmark's shapes (bf16, causal, B8 H16 hd64) it prints the autotuner's choices, the GPU time of each
kernel (torch.profiler) next to SDPA's kernels, next to fastlm's own with dq computed the other way (BWD_DQ:
its own kernel, or atomic adds in the dk/dv kernel) and in the program order used before (HEAVY_FIRST off),
forward-only TFLOP/s of both, and the host (Python) cost of one forward + backward
measured on a shape too small to keep the GPU busy, with the functions that spend it.

--compiled-block: gpt124m's transformer block compiled as training compiles it (per block, bf16 autocast),
with fastlm's attention as the model calls it (flash_attention_qkv on the packed projection: a custom op
under torch.compile, the block one graph, one gradient for the projection), over the split q, k, v views
(flash_attention's op: the model's call until 2026-11-27, whose backward concatenates three gradients),
behind torch.compiler.disable (graph breaks, the kernels launched eagerly), with the Triton kernels traced
into the graph (fullgraph: dynamo captures the autotuned kernels, inductor launches them), and with SDPA;
milliseconds per forward + backward at the training batch (16), and how far each variant's output and
input gradient are from the model's.
"""

from __future__ import annotations

import cProfile
import io
import pstats
import time

import torch
import torch.nn.functional as F
from conftest import gpu_kernel_times

B, H, D = 8, 16, 64


def _inputs(batch, heads, seq, grad=True):
    gen = torch.Generator(device="cuda").manual_seed(0)
    t = [torch.randn(batch, heads, seq, D, device="cuda", generator=gen, dtype=torch.bfloat16)
         for _ in range(4)]
    if grad:
        for x in t[:3]:
            x.requires_grad_()
    return t


def _ours(q, k, v):
    from fastlm.kernels import flash_attention

    return flash_attention(q, k, v, causal=True)


def _sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def _step(fn, q, k, v, do):
    q.grad = k.grad = v.grad = None
    fn(q, k, v).backward(do)


def kernel_table(fn, seq, rows=8):
    """Print (and return) the GPU time per fwd+bwd, with its `rows` most expensive kernels."""
    q, k, v, do = _inputs(B, H, seq)
    for _ in range(5):
        _step(fn, q, k, v, do)
    times = gpu_kernel_times(lambda: _step(fn, q, k, v, do))
    print(f"  GPU time per fwd+bwd: {sum(times.values()):.0f} us")
    for name, t in sorted(times.items(), key=lambda kv: -kv[1])[:rows]:
        print(f"    {t:8.1f} us  {name[:90]}")
    return sum(times.values())


def forward_tflops(fn, seq, reps=30):
    q, k, v, _ = _inputs(B, H, seq, grad=False)
    with torch.no_grad():
        for _ in range(5):
            fn(q, k, v)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn(q, k, v)
        end.record()
        torch.cuda.synchronize()
    ms = start.elapsed_time(end) / reps
    return 4.0 * B * H * seq * seq * D / 2 / ms / 1e9, ms


def host_cost(fn, reps=300):
    """Microseconds of host time per fwd+bwd on a shape whose GPU work is negligible."""
    q, k, v, do = _inputs(1, 1, 128)
    for _ in range(10):
        _step(fn, q, k, v, do)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        _step(fn, q, k, v, do)
    host = (time.perf_counter() - t0) / reps * 1e6
    torch.cuda.synchronize()
    return host


def main():
    import sys

    import fastlm.kernels  # noqa: F401  (the package exports the function under the module's name)

    fa = sys.modules["fastlm.kernels.flash_attention"]

    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    # first the host cost (a small shape compiles quickly), then the kernels at the benchmark's shapes
    print(f"host cost per fwd+bwd (B1 H1 T128): fastlm {host_cost(_ours):.0f} us, "
          f"SDPA {host_cost(_sdpa):.0f} us")
    q, k, v, do = _inputs(1, 1, 128)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(200):
        _step(_ours, q, k, v, do)
    prof.disable()
    torch.cuda.synchronize()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(14)
    print("host profile of 200 fastlm fwd+bwd (tottime):")
    print("\n".join(line for line in out.getvalue().splitlines() if line.strip())[:6000])
    for seq in (512, 1024, 2048):
        print(f"T={seq}:")
        print(" fastlm kernels:")
        heavy_first = kernel_table(_ours, seq)
        # how dq was computed: BWD_DQ "auto" timed both ways on the first backward of this shape
        key = fa.backward_key((B, H, seq, D), seq, True, torch.bfloat16)
        chosen = fa.DQ_CHOSEN.get(key, "separate")
        timed = {m: round(ms * 1e3) for m, ms in fa.DQ_TIMES.get(key, {}).items()}
        print(f"  dq mode: {chosen} (us per backward as timed on first use: {timed})")
        other = "atomic" if chosen == "separate" else "separate"
        was = fa.BWD_DQ
        try:
            fa.BWD_DQ = other
            print(f" fastlm kernels, dq {other}:")
            if other in fa.DQ_TIMES.get(key, {}) or other == "separate":
                other_time = kernel_table(_ours, seq, rows=5)
            else:  # the atomic kernel fit no tiling on this GPU (auto skipped it)
                print("  (does not run on this GPU)")
                other_time = float("nan")
            # the same kernels with the programs in the grid order used before 2026-11-26 (each head's
            # blocks in turn, the causal mask's heaviest blocks of the last heads last; see HEAVY_FIRST)
            fa.BWD_DQ, fa.HEAVY_FIRST = chosen, False
            print(" fastlm kernels, programs in (blocks, heads) order:")
            blocks_first = kernel_table(_ours, seq, rows=3)
        finally:
            fa.BWD_DQ, fa.HEAVY_FIRST = was, True
        print(f" dq: {chosen} {heavy_first:.0f} us vs {other} {other_time:.0f} us per fwd+bwd -> "
              f"{other_time / heavy_first:.2f}x")
        print(f" program order: heaviest blocks first {heavy_first:.0f} us vs (blocks, heads) "
              f"{blocks_first:.0f} us -> {blocks_first / heavy_first:.2f}x")
        # the tilings chosen for this shape in the heavy-first order (an autotuner's best_config is that of
        # its latest tuning, here the (blocks, heads) order's)
        for name, tuned in (("_fwd_kernel", fa._FWD), ("_bwd_kv_kernel", fa._BWD_KV),
                            ("_bwd_q_kernel", fa._BWD_Q), ("_bwd_kv_kernel, atomic dq", fa._BWD_KV_ATOMIC)):
            chosen_config = {k: v for k, v in tuned.chosen.get(key, {}).items()
                             if k in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")}
            print(f"  {name} config: {chosen_config or 'not tuned'}")
        print(" SDPA kernels:")
        kernel_table(_sdpa, seq)
        ours, sd = forward_tflops(_ours, seq), forward_tflops(_sdpa, seq)
        print(f" forward only: fastlm {ours[0]:.0f} TFLOP/s ({ours[1] * 1e3:.0f} us), "
              f"SDPA {sd[0]:.0f} TFLOP/s ({sd[1] * 1e3:.0f} us)")


def compiled_block(batches=(16,), reps=20):
    import math
    import sys
    from pathlib import Path

    from fastlm import model as M
    from fastlm.config import load_config
    from fastlm.kernels import flash_attention, flash_attention_qkv

    fa = sys.modules["fastlm.kernels.flash_attention"]

    def split(qkv, n_head, n_kv_head):  # flash_attention's op over the views, as a split gives them
        return flash_attention(*fa._split_qkv(qkv, n_head, n_kv_head), causal=True)

    def traced(qkv, n_head, n_kv_head):  # the autograd.Function itself: dynamo traces the Triton launches
        head_dim = qkv.shape[-1] // (n_head + 2 * n_kv_head)
        return fa._FlashAttentionQKV.apply(qkv, n_head, n_kv_head, True, 1.0 / math.sqrt(head_dim))

    config = Path(__file__).resolve().parents[1] / "configs" / "gpt124m.yaml"
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}; gpt124m block, bf16 autocast")
    # (name, attention impl, what the model calls for "triton" on the packed projection, fullgraph)
    # (most telling first: a deadline cuts the last)
    variants = (("packed custom op (the model's path)", "triton", flash_attention_qkv, True),
                ("custom op over split views (3 gradients concatenated)", "triton", split, True),
                ("SDPA", "sdpa", None, True),
                ("eager attention (torch.compiler.disable)", "triton",
                 torch.compiler.disable(flash_attention_qkv), False),
                ("traced Triton kernels (fullgraph)", "triton", traced, True))
    model_flash = M._flash_attention_qkv
    for batch in batches:
        outputs = {}
        for name, impl, flash, fullgraph in variants:
            cfg = load_config(config, [f"model.attention={impl}"]).model
            torch.manual_seed(0)
            block = M.Block(cfg).cuda()
            M._flash_attention_qkv = (lambda f=flash: f) if flash is not None else model_flash
            torch._dynamo.reset()
            block.compile(fullgraph=fullgraph)
            gen = torch.Generator(device="cuda").manual_seed(0)
            x = torch.randn(batch, cfg.sequence_length, cfg.n_embd, device="cuda", generator=gen,
                            requires_grad=True)
            gy = torch.randn(x.shape, device="cuda", generator=gen)

            def step():
                x.grad = None
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    y = block(x, None, None, None)
                y.backward(gy)
                return y

            try:
                t0 = time.perf_counter()
                for _ in range(3):
                    y = step()
                torch.cuda.synchronize()
                first = time.perf_counter() - t0
            except Exception as err:  # a diagnostic: say what failed and go on
                why = str(err).strip().splitlines()[0][:300] if str(err).strip() else ""
                print(f"  B{batch} {name}: FAILED {type(err).__name__}: {why}")
                continue
            outputs[name] = (y.detach().float(), x.grad.detach().float())
            t0 = time.perf_counter()
            for _ in range(reps):
                step()
            torch.cuda.synchronize()
            ms = (time.perf_counter() - t0) / reps * 1e3
            print(f"  B{batch} {name}: {ms:.2f} ms per fwd+bwd (3 first calls, compiling: {first:.0f} s)")
        M._flash_attention_qkv = model_flash
        ref = outputs.get(variants[0][0])
        for name, other in outputs.items():
            if ref is None or name == variants[0][0]:
                continue
            dy = (ref[0] - other[0]).abs().max().item()
            dx = (ref[1] - other[1]).abs().max().item()
            print(f"  B{batch} {name} vs the model's: max |dy| {dy:.3g}, max |dx| {dx:.3g} "
                  f"(|y| max {ref[0].abs().max().item():.3g})")


if __name__ == "__main__":
    import sys

    compiled_block() if "--compiled-block" in sys.argv[1:] else main()
