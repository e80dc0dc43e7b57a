"""Cross-entropy kernels on a GPU, side by side with what the model would otherwise run (same run and card).

GPT-2 124M's loss at 8 x 1024 tokens, vocabulary 50304, hidden 768, bf16; each measurement is one
forward + backward:
(a) cross_entropy(logits, targets) vs F.cross_entropy(logits.float(), targets) on materialised logits
    (the model's torch path), and F.cross_entropy on the bf16 logits directly for reference;
(b) fused_linear_cross_entropy(hidden, weight, targets) vs F.cross_entropy(F.linear(hidden, weight).float(),
    targets).
Time: triton.testing.do_bench (median, gradients reset each call). Peak memory:
torch.cuda.max_memory_allocated over one step, reset before it, minus what was allocated before the step
(the inputs): the step's own memory.
Bars: at least 4x less peak memory, and no slower (time ratio >= 1).
Without CUDA this file says so and skips: under Triton's interpreter the kernels' speed means nothing.
"""

from __future__ import annotations

import pytest

from conftest import record

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="needs a CUDA GPU: Triton kernel speed means nothing on CPU (interpreter)"),
]

N_TOKENS = 8 * 1024
VOCAB = 50304
DIM = 768
DTYPE = torch.bfloat16
MEMORY_BAR = 4.0  # at least 4x less peak memory than the torch path
SPEED_BAR = 1.0  # no slower


def peak_bytes(step, grads) -> int:
    """Memory one step allocates on top of what exists before it (inputs, their dead gradients freed)."""
    for t in grads:
        t.grad = None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    for t in grads:
        t.grad = None
    return peak


def time_ms(step, grads) -> float:
    import triton.testing

    return triton.testing.do_bench(step, warmup=25, rep=200, grad_to_none=grads, return_mode="median")


def compare(name: str, ours, baseline, baseline_name: str, grads, bars: bool = True) -> None:
    # Peaks first, on a quiet allocator; then times. Warm-up (compilation) happens in the first step.
    ours()
    baseline()
    mem_ours, mem_base = peak_bytes(ours, grads), peak_bytes(baseline, grads)
    t_ours, t_base = time_ms(ours, grads), time_ms(baseline, grads)
    mib = 2 ** 20
    record(f"{name} peak memory", mem_ours / mib, "MiB", baseline_name, mem_base / mib,
           higher_is_better=False, bar=MEMORY_BAR if bars else None)
    record(f"{name} fwd+bwd time", t_ours, "ms", baseline_name, t_base, higher_is_better=False,
           bar=SPEED_BAR if bars else None)


@pytest.fixture(scope="module")
def inputs():
    gen = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(N_TOKENS, DIM, device="cuda", generator=gen).to(DTYPE).requires_grad_()
    weight = (torch.randn(VOCAB, DIM, device="cuda", generator=gen) * 0.02).to(DTYPE).requires_grad_()
    targets = torch.randint(0, VOCAB, (N_TOKENS,), device="cuda", generator=gen)
    return hidden, weight, targets


def test_cross_entropy_speed(inputs):
    import torch.nn.functional as F

    from fastlm.kernels import cross_entropy

    hidden, weight, targets = inputs
    with torch.no_grad():
        logits = (hidden @ weight.T).requires_grad_()  # (N, V) bf16, materialised

    with torch.no_grad():  # a sanity check of the compiled kernel; no graph kept alive into the measurements
        torch.testing.assert_close(cross_entropy(logits, targets), F.cross_entropy(logits.float(), targets),
                                   rtol=1e-4, atol=1e-4)

    def ours():
        cross_entropy(logits, targets).backward()

    def torch_fp32():
        F.cross_entropy(logits.float(), targets).backward()

    def torch_bf16():
        F.cross_entropy(logits, targets).backward()

    compare("cross_entropy", ours, torch_fp32, "F.cross_entropy(logits.float())", [logits])
    # For reference only (no bars): torch on the bf16 logits directly, with a bf16 log_softmax.
    compare("cross_entropy (vs bf16 torch)", ours, torch_bf16, "F.cross_entropy(bf16 logits)", [logits],
            bars=False)


def test_fused_linear_cross_entropy_speed(inputs):
    import torch.nn.functional as F

    from fastlm.kernels import fused_linear_cross_entropy

    hidden, weight, targets = inputs
    with torch.no_grad():  # sanity check; the matmul's bf16 rounding differs only in summation order
        torch.testing.assert_close(fused_linear_cross_entropy(hidden, weight, targets),
                                   F.cross_entropy(F.linear(hidden, weight).float(), targets),
                                   rtol=1e-3, atol=1e-3)

    def ours():
        fused_linear_cross_entropy(hidden, weight, targets).backward()

    def baseline():
        F.cross_entropy(F.linear(hidden, weight).float(), targets).backward()

    compare("fused_linear_cross_entropy", ours, baseline, "F.cross_entropy(F.linear(h, w).float())",
            [hidden, weight])
    # A diagnostic, printed only (not a result): the time and memory of other chunk sizes than the default
    # (4096 rows here; larger chunks re-read and re-write the (V, D) fp32 grad_weight accumulator fewer
    # times, for more memory). Data for the default.
    grads = [hidden, weight]
    for rows in (1024, 2048, 4096):
        def step(rows=rows):
            fused_linear_cross_entropy(hidden, weight, targets, chunk_rows=rows).backward()

        step()
        print(f"\n  (diagnostic) fused_linear_cross_entropy chunk_rows={rows}: "
              f"{time_ms(step, grads):.3f} ms, peak {peak_bytes(step, grads) / 2 ** 20:,.0f} MiB")
