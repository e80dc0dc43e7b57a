"""Flash attention kernel against the fp32 torch reference: outputs and dq, dk, dv.

On CPU the kernels run under Triton's interpreter (TRITON_INTERPRET=1, set here when no GPU is present and
before the kernel module is imported), so the CPU shapes are tiny but awkward: sequence lengths that are not
multiples of the blocks (the interpreter uses 32x16 / 16x32 tiles), seq 1, GQA, seq_q < seq_k causal.
With a GPU the same tests run on CUDA tensors through the compiled kernels (in bf16 there, see CASE_DTYPE).
bf16 is checked on GPU only: the interpreter's bf16 matmul is wrong. The GPU tests use realistic shapes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fastlm.kernels import attention_reference, flash_attention, flash_attention_qkv  # noqa: E402
from conftest import ROOT, assert_lowers_to_sm90  # noqa: E402

FA = sys.modules["fastlm.kernels.flash_attention"]  # the package exports the function under its name

# The tests below that are not marked gpu run on CUDA when there is a GPU (compiled Triton) and on CPU under
# Triton's interpreter otherwise.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Their dtype: fp32 on CPU, because the interpreter's bf16 matmul is wrong; bf16 on GPU, because fp32 there
# compiles IEEE-matmul kernels (~10-30 s per autotune config), too slow for the GPU check's time budget.
# _check applies the fp32 tolerances to fp32 and the low-precision rule (2x torch SDPA's error) to bf16.
CASE_DTYPE = torch.float32 if DEVICE == "cpu" else torch.bfloat16

# --- Tolerances -------------------------------------------------------------------------------------------
# fp32: the reference *is* PyTorch's own fp32 computation, so the 2x rule of STYLE.md has nothing to compare
# with; kernel (IEEE fp32 matmuls, online softmax) and reference differ only by summation order, measured at
# <= 2e-6 on these shapes (unit-normal inputs, outputs and gradients O(1)). 1e-5 leaves headroom; any masking
# or indexing bug shows up as an error of O(0.1).
FP32_ATOL = 1e-5
FP32_RTOL = 1e-5
# fp16/bf16 (STYLE.md): the kernel's max error against the fp32 reference may be at most 2x the max error of
# PyTorch's own SDPA run in the same dtype on the same inputs (measured on CPU: the kernel is at or below
# SDPA's error on every tensor, so 2x is the rule, not a fudge).
LOWP_RATIO = 2.0
# ...plus an absolute floor of a quarter ulp at 1.0 of the dtype (fp16 2^-12, bf16 2^-9), so that a lucky,
# near-exact SDPA tensor cannot turn rounding noise of the same order into a failure.


def lowp_floor(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 4

# Triton's interpreter converts 1-element arrays to ints (loop bounds); NumPy >= 1.25 warns about each.
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _causal_mask(seq_q: int, seq_k: int, device) -> torch.Tensor:
    # Bottom-right aligned: query i sees keys j <= i + seq_k - seq_q.
    return torch.ones(seq_q, seq_k, dtype=torch.bool, device=device).tril(seq_k - seq_q)


def _sdpa(q, k, v, causal, softmax_scale=None):
    """PyTorch's own attention in the inputs' dtype (the yardstick for low-precision errors)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    if causal and q.shape[2] == k.shape[2]:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=softmax_scale)
    mask = _causal_mask(q.shape[2], k.shape[2], q.device) if causal else None
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=softmax_scale)


def _out_and_grads(fn, q, k, v, do, causal, softmax_scale=None):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v, causal=causal, softmax_scale=softmax_scale)
    return [out, *torch.autograd.grad(out, (q, k, v), do.to(out.dtype))]


def _inputs(batch, n_head, n_kv_head, seq_q, seq_k, head_dim, dtype, device=DEVICE, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device, dtype=torch.float32).to(dtype)

    return (randn(batch, n_head, seq_q, head_dim), randn(batch, n_kv_head, seq_k, head_dim),
            randn(batch, n_kv_head, seq_k, head_dim), randn(batch, n_head, seq_q, head_dim))


def _check(q, k, v, do, causal, softmax_scale=None):
    """Kernel output and gradients against the fp32 reference, with the tolerance rule of q's dtype."""
    names = ("out", "dq", "dk", "dv")
    ref = _out_and_grads(attention_reference, q.float(), k.float(), v.float(), do.float(), causal,
                         softmax_scale)
    got = _out_and_grads(flash_attention, q, k, v, do, causal, softmax_scale)
    for name, g, r, t in zip(names, got, ref, (q, q, k, v)):
        assert (g.shape, g.dtype) == (t.shape, t.dtype), f"{name}: {g.shape} {g.dtype} != {t.shape} {t.dtype}"
        assert torch.isfinite(g).all(), f"{name} has non-finite values"
    if q.dtype == torch.float32:
        for name, g, r in zip(names, got, ref):
            torch.testing.assert_close(g, r, atol=FP32_ATOL, rtol=FP32_RTOL,
                                       msg=lambda m, n=name: f"{n}: {m}")
        return
    torch_lowp = _out_and_grads(_sdpa, q, k, v, do, causal, softmax_scale)
    for name, g, t, r in zip(names, got, torch_lowp, ref):
        err = (g.float() - r).abs().max().item()
        torch_err = (t.float() - r).abs().max().item()
        bound = LOWP_RATIO * torch_err + lowp_floor(q.dtype)
        assert err <= bound, (f"{name} ({q.dtype}): kernel error {err:.3g} > {LOWP_RATIO} x torch SDPA error "
                              f"{torch_err:.3g} + {lowp_floor(q.dtype):.3g}")


# (batch, n_head, n_kv_head, seq_q, seq_k, head_dim, causal)
CPU_CASES = {
    "seq1": (1, 1, 1, 1, 1, 32, True),
    "seq7": (1, 2, 2, 7, 7, 32, True),
    "batch2_seq100_hd64": (2, 2, 2, 100, 100, 64, True),
    "gqa4to2_seq129": (1, 4, 2, 129, 129, 32, True),
    "gqa4to1_seq200_noncausal": (1, 4, 1, 200, 200, 32, False),
    "cached_q37_k129_hd64": (1, 2, 1, 37, 129, 64, True),
    "decode_q1_k100": (1, 2, 2, 1, 100, 32, True),
    # shift seq_k - seq_q = 46 puts the causal diagonal one row/column off the block edges, where an
    # off-by-one in the fully-visible block ranges (forward, dq and dk/dv) would go unmasked.
    "cached_gqa_q52_k98": (1, 4, 2, 52, 98, 32, True),
    "noncausal_q50_k100": (1, 2, 2, 50, 100, 32, False),
    "noncausal_q100_k37": (1, 2, 1, 100, 37, 32, False),
}


@pytest.mark.parametrize("case", list(CPU_CASES), ids=list(CPU_CASES))
def test_fp32_matches_reference(case):
    # fp32 on CPU, bf16 on GPU (CASE_DTYPE)
    *shape, causal = CPU_CASES[case]
    q, k, v, do = _inputs(*shape, dtype=CASE_DTYPE)
    _check(q, k, v, do, causal)


@pytest.fixture
def dq_mode(monkeypatch):
    """Sets the backward's dq mode (FA.BWD_DQ) for one test; returns the modes the backwards then ran."""
    ran = []
    run = FA._backward_with

    def spy(mode, *args):
        ran.append(mode)
        return run(mode, *args)

    monkeypatch.setattr(FA, "_backward_with", spy)

    def set_mode(mode):
        monkeypatch.setattr(FA, "BWD_DQ", mode)
        return ran

    return set_mode


@pytest.fixture
def fixed_tiles():
    """Deterministic mode (torch.use_deterministic_algorithms) for the whole test: one tiling per kernel,
    the smallest, without autotuning. The program order is part of the tuning key, so on a GPU each order
    autotunes by itself and may pick other tiles, which sum in another order; the interpreter has one
    config per kernel anyway."""
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(was)


@pytest.mark.parametrize("case", ["gqa4to2_seq129", "cached_gqa_q52_k98", "batch2_seq100_hd64"])
def test_program_order_changes_nothing(case, dq_mode, fixed_tiles):
    # HEAVY_FIRST only reorders the programs (the grid is (heads, blocks), blocks from the heaviest): with
    # the same tiles, each program computes the same tile either way and no two write the same place, so
    # the two orders agree bit for bit, outputs and every gradient (dq from its own kernel: atomic adds sum
    # in varying order); a block or head mapped wrongly in either order would not.
    dq_mode("separate")
    *shape, causal = CPU_CASES[case]
    q, k, v, do = _inputs(*shape, dtype=CASE_DTYPE)
    results = {}
    for heavy_first in (True, False):
        FA.HEAVY_FIRST = heavy_first
        try:
            results[heavy_first] = _out_and_grads(flash_attention, q, k, v, do, causal)
        finally:
            FA.HEAVY_FIRST = True
    for name, a, b in zip(("out", "dq", "dk", "dv"), results[True], results[False]):
        assert torch.equal(a, b), name


def test_batch_heads_beyond_the_grids_second_axis_go_first(monkeypatch, dq_mode, fixed_tiles):
    # A grid's second axis holds 65,535 programs: a non-causal call with more (batch x heads) takes the
    # (heads, blocks) order too, with the same results (same tiles, dq from its own kernel, as above).
    # Checked with the limit lowered to 3 (B1 H4).
    dq_mode("separate")
    *shape, causal = CPU_CASES["gqa4to1_seq200_noncausal"]
    q, k, v, do = _inputs(*shape, dtype=CASE_DTYPE)
    plain = _out_and_grads(flash_attention, q, k, v, do, causal)
    grids, grid = [], FA._grid
    monkeypatch.setattr(FA, "_grid", lambda *args: grids.append(args) or grid(*args))
    monkeypatch.setattr(FA, "_MAX_GRID_Y", 3)
    many = _out_and_grads(flash_attention, q, k, v, do, causal)
    assert len(grids) >= 2 and all(heads_first for _, _, heads_first in grids), grids
    for name, a, b in zip(("out", "dq", "dk", "dv"), plain, many):
        assert torch.equal(a, b), name


ADDED_DQ = ["atomic", "bulk"]  # the dq modes where the dk/dv kernel adds dq (bulk: whole tiles, by TMA)


@pytest.mark.parametrize("mode", ADDED_DQ)
@pytest.mark.parametrize("case", ["seq1", "batch2_seq100_hd64", "gqa4to2_seq129", "gqa4to1_seq200_noncausal",
                                  "cached_gqa_q52_k98", "noncausal_q100_k37", "decode_q1_k100"])
def test_atomic_dq_matches_reference(case, mode, dq_mode):
    # dq added atomically by the dk/dv kernel (atomic in fp32 inputs: into dq itself): partial blocks, GQA
    # (each kv program adds to its group's query heads), seq_q < seq_k, non-causal, a single query row.
    # (bulk: the rows of a partial query block past seq_q add zeros, q = dO = 0 there, but they lie past
    # the descriptor's bounds, which keep them from the next head's rows or the accumulator's end)
    ran = dq_mode(mode)
    *shape, causal = CPU_CASES[case]
    q, k, v, do = _inputs(*shape, dtype=CASE_DTYPE)
    _check(q, k, v, do, causal)
    assert ran == [mode]


@pytest.mark.parametrize("mode", ADDED_DQ)
def test_atomic_dq_with_padded_keys_and_far_negative_scores(mode, dq_mode):
    # Non-causal, seq_k not a multiple of the key block: keys past seq_k load k = 0, so their score is 0
    # and P there is exp2(-lse), which overflows when every real score of a row is far below 0 (here about
    # -150). dS must be zeroed at those keys, or dS K puts inf * 0 = NaN into dq.
    # Held to the dq kernel's results (the reference's fixed fp32 tolerances assume O(1) values; here q is
    # ~ -27 per element). The two modes differ only in the order of dq's fp32 sums. Those terms are O(1)
    # while dq is ~0.02: the keys share one direction and dS sums to 0 over the keys, so dq is what is left
    # after they cancel. Hence an absolute tolerance of 10 units in the last place at 1 (or at the
    # tensor's largest value, for the larger dk).
    ran = dq_mode(mode)
    gen = torch.Generator().manual_seed(8)
    head_dim, direction = 32, torch.ones(32) / 32 ** 0.5  # queries point away from every key
    q = torch.randn(1, 2, 20, head_dim, generator=gen) * 0.1 - 150 * direction
    k = torch.randn(1, 2, 40, head_dim, generator=gen) * 0.1 + direction
    v, do = torch.randn(1, 2, 40, head_dim, generator=gen), torch.randn(1, 2, 20, head_dim, generator=gen)
    q, k, v, do = (t.to(DEVICE, CASE_DTYPE) for t in (q, k, v, do))
    got = _out_and_grads(flash_attention, q, k, v, do, False, softmax_scale=1.0)
    dq_mode("separate")
    want = _out_and_grads(flash_attention, q, k, v, do, False, softmax_scale=1.0)
    assert ran == [mode, "separate"]
    eps = torch.finfo(CASE_DTYPE).eps
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert torch.isfinite(g).all(), f"{name} has non-finite values"
        torch.testing.assert_close(g, w, rtol=10 * eps, atol=10 * eps * max(1.0, w.abs().max().item()),
                                   msg=lambda m, n=name: f"{n}: {m}")


def test_atomic_dq_is_right_on_the_call_that_autotunes(dq_mode, monkeypatch):
    # The autotuner times each tiling by running it many times, and each run adds its dq into the
    # accumulator: the kernel's reset_to_zero clears it around them. Simulated with two tilings and a
    # timing that runs the kernel three times.
    import triton

    ran = dq_mode("atomic")
    tuner = FA._BWD_KV_ATOMIC.kernel

    def bench(kernel_call, quantiles):
        for _ in range(3):
            kernel_call()
        return [1.0, 1.0, 1.0]

    tilings = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=4, num_stages=1)
               for m, n in ((16, 32), (32, 16))]
    monkeypatch.setattr(tuner, "configs", tilings)
    monkeypatch.setattr(tuner, "_do_bench", bench)
    monkeypatch.delitem(tuner.__dict__, "do_bench", raising=False)  # a cached property
    monkeypatch.setattr(tuner, "cache", {})
    monkeypatch.setattr(FA._BWD_KV_ATOMIC, "chosen", {})
    monkeypatch.setattr(FA, "_PLANS", {})  # (on a GPU a launch plan of an earlier test would replay)
    q, k, v, do = _inputs(1, 2, 1, 40, 40, 32, CASE_DTYPE, seed=9)
    _check(q, k, v, do, causal=True)
    assert ran == ["atomic"] and FA._BWD_KV_ATOMIC.chosen  # this call tuned


def test_bulk_dq_sets_the_scratch_allocator_in_the_launching_thread():
    # The bulk kernel makes its tensor descriptors on the device, in scratch memory that Triton's launcher
    # asks triton.set_allocator's allocator for. That setting is a context variable: a new thread (as
    # autograd's device thread, where a CUDA backward runs) starts without it. _scratch_allocator, called
    # before each bulk backward's launches, sets it in the launching thread, and keeps one the user set.
    import triton
    from triton.runtime import _allocation

    seen = {}

    def users(size, alignment, stream):
        raise AssertionError("not called here")

    def launching_thread(name, user):
        if user is not None:
            triton.set_allocator(user)
        seen[name, "before"] = _allocation._allocator.get()
        FA._scratch_allocator()
        seen[name, "after"] = _allocation._allocator.get()

    for name, user in (("fresh thread", None), ("user's allocator", users)):
        thread = threading.Thread(target=launching_thread, args=(name, user))
        thread.start()
        thread.join()
    assert seen == {("fresh thread", "before"): _allocation._NULL_ALLOCATOR,
                    ("fresh thread", "after"): FA._scratch,
                    ("user's allocator", "before"): users, ("user's allocator", "after"): users}


@pytest.mark.parametrize("mode", ADDED_DQ)
@pytest.mark.parametrize("case", ["gqa4to2_seq100_hd64", "noncausal_seq129_hd64"])
def test_atomic_dq_fp16_within_2x_of_torch(case, mode, dq_mode):
    # fp16: dq is summed in a separate fp32 buffer, then scaled and rounded into dq
    ran = dq_mode(mode)
    *shape, causal = FP16_CASES[case]
    q, k, v, do = _inputs(*shape, dtype=torch.float16, seed=1)
    _check(q, k, v, do, causal)
    assert ran == [mode]


def test_dq_mode_rules(dq_mode):
    q, k, v, do = _inputs(1, 2, 1, 40, 40, 32, CASE_DTYPE)
    ran = dq_mode("atomic")
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        _out_and_grads(flash_attention, q, k, v, do, True)  # deterministic runs never add atomically
    finally:
        torch.use_deterministic_algorithms(was)
    assert ran == ["separate"]
    dq_mode("sometimes")
    with pytest.raises(ValueError, match="BWD_DQ must be 'auto' or one of"):
        _out_and_grads(flash_attention, q, k, v, do, True)
    if DEVICE == "cpu":  # "auto" times nothing off CUDA: the deterministic kernel
        ran = dq_mode("auto")
        ran.clear()
        _out_and_grads(flash_attention, q, k, v, do, True)
        assert ran == ["separate"] and not FA.DQ_CHOSEN


def _auto_as_on_cuda(monkeypatch, clock=None):
    """Makes "auto" time a new key on any device, as it does on CUDA, with empty DQ_CHOSEN / DQ_TIMES. The
    timing's events read `clock` (a one-element list of milliseconds) or, without one, are 1 ms apart.
    Only the module's own events are replaced: Triton's autotuner keeps the real ones on a GPU."""

    class Event:
        def record(self):
            self.t = clock[0] if clock else 0.0

        def synchronize(self):
            pass

        def elapsed_time(self, end):
            return end.t - self.t if clock else 1.0

    monkeypatch.setattr(FA, "_timing_event", Event)
    monkeypatch.setattr(FA, "_dq_mode", lambda key, device: FA.DQ_CHOSEN.get(key))
    monkeypatch.setattr(FA, "DQ_CHOSEN", {})
    monkeypatch.setattr(FA, "DQ_TIMES", {})


def _auto_with_costs(dq_mode, monkeypatch, cost: dict) -> list:
    """"auto" as on CUDA (_auto_as_on_cuda), with a clock that each mode's backward advances by its cost
    in `cost`, read by the timing events; returns the modes the backwards ran."""
    clock = [0.0]
    ran = dq_mode("auto")
    spy = FA._backward_with

    def costed(mode, *args):
        clock[0] += cost[mode]
        return spy(mode, *args)

    monkeypatch.setattr(FA, "_backward_with", costed)
    _auto_as_on_cuda(monkeypatch, clock)
    return ran


def test_auto_times_both_modes_once_and_keeps_the_faster(dq_mode, monkeypatch):
    # On CUDA, "auto" runs each mode once (it tunes and compiles), then DQ_TIMING_REPS times between two
    # CUDA events, and keeps the faster for the key. Simulated: a clock that each mode's backward advances
    # by its own cost, read by the events.
    cost = {"separate": 2.0, "atomic": 0.5}
    ran = _auto_with_costs(dq_mode, monkeypatch, cost)
    q, k, v, do = _inputs(1, 4, 2, 45, 45, 32, CASE_DTYPE, seed=4)
    first = _out_and_grads(flash_attention, q, k, v, do, True)
    reps = FA.DQ_TIMING_REPS
    assert ran == ["separate"] * (1 + reps) + ["atomic"] * (1 + reps)
    key = (45, 45, 32, True, CASE_DTYPE, True)
    assert FA.DQ_TIMES == {key: cost} and FA.DQ_CHOSEN == {key: "atomic"}
    ran.clear()
    second = _out_and_grads(flash_attention, q, k, v, do, True)
    assert ran == ["atomic"]  # chosen once: no more timing
    # the timing call's own gradients are right too (dq from either mode: equal up to the order of sums)
    for name, a, b in zip(("out", "dq", "dk", "dv"), first, second):
        torch.testing.assert_close(a, b, msg=lambda m, n=name: f"{n}: {m}")
    if DEVICE == "cpu":
        ref = _out_and_grads(attention_reference, q, k, v, do, True)
        for name, a, r in zip(("out", "dq", "dk", "dv"), first, ref):
            torch.testing.assert_close(a, r, atol=FP32_ATOL, rtol=FP32_RTOL,
                                       msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("tma", [True, False])
def test_auto_times_bulk_dq_only_where_the_gpu_has_tma(tma, dq_mode, monkeypatch):
    # "bulk" is not timed by "auto" until a GPU run has measured it (AUTO_DQ_MODES); once among them, it
    # is timed only on a GPU with TMA (Hopper on), and chosen where it is the fastest.
    assert "bulk" in FA._DQ_MODES and "bulk" not in FA.AUTO_DQ_MODES
    cost = {"separate": 2.0, "atomic": 1.0, "bulk": 0.5}
    ran = _auto_with_costs(dq_mode, monkeypatch, cost)
    monkeypatch.setattr(FA, "AUTO_DQ_MODES", ("separate", "atomic", "bulk"))
    monkeypatch.setattr(FA, "_has_tma", lambda device: tma)
    q, k, v, do = _inputs(1, 4, 2, 45, 45, 32, CASE_DTYPE, seed=4)
    _out_and_grads(flash_attention, q, k, v, do, True)
    timed = ["separate", "atomic", "bulk"] if tma else ["separate", "atomic"]
    assert ran == [mode for mode in timed for _ in range(1 + FA.DQ_TIMING_REPS)]
    key = (45, 45, 32, True, CASE_DTYPE, True)
    assert FA.DQ_TIMES == {key: {m: cost[m] for m in timed}} and FA.DQ_CHOSEN == {key: timed[-1]}


def test_auto_skips_a_mode_that_does_not_fit(dq_mode, monkeypatch):
    # On a GPU where no tiling of the atomic kernel fits (shared memory), "auto" keeps the dq kernel
    # instead of failing the backward; a failing dq kernel is still an error.
    from triton.runtime.errors import OutOfResources

    ran = dq_mode("auto")
    spy = FA._backward_with
    failing = {"atomic"}

    def limited(mode, *args):
        if mode in failing:
            raise OutOfResources(232448, 101376, "shared memory")
        return spy(mode, *args)

    monkeypatch.setattr(FA, "_backward_with", limited)
    _auto_as_on_cuda(monkeypatch)
    q, k, v, do = _inputs(1, 2, 2, 33, 33, 32, CASE_DTYPE, seed=7)
    got = _out_and_grads(flash_attention, q, k, v, do, True)
    key = (33, 33, 32, True, CASE_DTYPE, True)
    assert FA.DQ_CHOSEN == {key: "separate"} and list(FA.DQ_TIMES[key]) == ["separate"]
    assert set(ran) == {"separate"}
    dq_mode("separate")
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, _out_and_grads(flash_attention, q, k, v, do, True)):
        assert torch.equal(a, b), name  # the gradients it returned are the dq kernel's
    dq_mode("auto")
    failing.add("separate")
    FA.DQ_CHOSEN.clear()
    with pytest.raises(OutOfResources):
        _out_and_grads(flash_attention, q, k, v, do, True)


@pytest.mark.parametrize("fault", ["scaled", "nan"])
def test_auto_refuses_an_atomic_dq_that_disagrees(fault, dq_mode, monkeypatch):
    # On the call that times the two modes, "auto" also compares their dq: an atomic dq off by more than
    # DQ_AGREEMENT of dq's size (a miscompiled kernel on some GPU, say) is refused with a warning, and
    # the call returns the dq kernel's gradients. Simulated faults: dq scaled by 1.1, one NaN.
    ran = dq_mode("auto")
    spy = FA._backward_with

    def faulty(mode, *args):
        (dq, dk, dv), _ = spy(mode, *args)  # (the gradients returned, and dq among them)
        if mode == "atomic":
            dq = dq * 1.1 if fault == "scaled" else dq.index_put((torch.tensor([0]),) * 3,
                                                                  torch.tensor(float("nan"), dtype=dq.dtype))
        return (dq, dk, dv), dq

    monkeypatch.setattr(FA, "_backward_with", faulty)
    _auto_as_on_cuda(monkeypatch)
    q, k, v, do = _inputs(1, 2, 2, 33, 33, 32, CASE_DTYPE, seed=10)
    with pytest.warns(RuntimeWarning, match="dq added atomically differs from the dq kernel's"):
        got = _out_and_grads(flash_attention, q, k, v, do, True)
    key = (33, 33, 32, True, CASE_DTYPE, True)
    assert FA.DQ_CHOSEN == {key: "separate"} and list(FA.DQ_TIMES[key]) == ["separate"]
    assert ran == ["separate"] * (1 + FA.DQ_TIMING_REPS) + ["atomic"]
    dq_mode("separate")
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, _out_and_grads(flash_attention, q, k, v, do, True)):
        assert torch.equal(a, b), name


FP16_CASES = {
    "gqa4to2_seq100_hd64": (2, 4, 2, 100, 100, 64, True),
    "gqa4to1_cached_q77_k129": (1, 4, 1, 77, 129, 32, True),
    "noncausal_seq129_hd64": (1, 2, 2, 129, 129, 64, False),
}


@pytest.mark.parametrize("case", list(FP16_CASES), ids=list(FP16_CASES))
def test_fp16_within_2x_of_torch(case):
    *shape, causal = FP16_CASES[case]
    q, k, v, do = _inputs(*shape, dtype=torch.float16, seed=1)
    _check(q, k, v, do, causal)


@pytest.mark.parametrize("mode", ["separate", *ADDED_DQ])
def test_model_layout_and_custom_scale(mode, dq_mode):
    # The model projects to (B, T, H, D) and transposes: q, k, v arrive non-contiguous (and atomic dq's
    # accumulator is laid out as q: its rows n_head * head_dim apart).
    ran = dq_mode(mode)
    batch, seq, n_head, n_kv_head, head_dim = 2, 45, 4, 2, 32
    gen = torch.Generator().manual_seed(2)  # values drawn on CPU, moved before the views are taken

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(DEVICE, CASE_DTYPE)

    q = randn(batch, seq, n_head, head_dim).transpose(1, 2)
    kv = randn(batch, seq, 2, n_kv_head, head_dim)
    k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
    assert not q.is_contiguous() and not k.is_contiguous()
    do = randn(batch, n_head, seq, head_dim)
    _check(q, k, v, do, causal=True, softmax_scale=0.3)
    # ... and the output is stored as (B, T, H, D), as SDPA's: merging the heads back is a view
    out = flash_attention(q, k, v, causal=True)
    merged = out.transpose(1, 2).reshape(batch, seq, n_head * head_dim)
    assert merged.data_ptr() == out.data_ptr() and merged.is_contiguous()
    # ... and dq, dk, dv are stored as their inputs, (B, T, H, D): the projection's gradient is then a
    # concatenation of whole rows, not a transpose
    for name, g in zip(("dq", "dk", "dv"), _out_and_grads(flash_attention, q, k, v, do, True)[1:]):
        assert g.transpose(1, 2).is_contiguous(), (name, g.stride())
    assert set(ran) == {mode}


def test_custom_ops_fakes_match_the_real_ops_in_the_models_layout(dq_mode):
    # Under torch.compile the attention is two custom ops, and inductor compiles the graph around them from
    # their fake implementations: those must give the real outputs' shapes and strides (o and dq, dk, dv
    # follow the inputs' (B, T, H, D) layout), or the compiled graph reads the outputs wrongly. opcheck runs
    # each op for real and on fake tensors and compares them, and checks the schema and the autograd
    # registration. Inputs as the model makes them (GQA): views of a projection. (dq from its own kernel:
    # opcheck compares repeated runs, and atomic adds sum in varying order on a GPU.)
    dq_mode("separate")
    gen = torch.Generator().manual_seed(4)
    batch, seq, n_head, n_kv_head, head_dim = 2, 40, 4, 2, 32
    q_proj = torch.randn(batch, seq, n_head, head_dim, generator=gen).to(DEVICE, CASE_DTYPE)
    kv_proj = torch.randn(batch, seq, 2, n_kv_head, head_dim, generator=gen).to(DEVICE, CASE_DTYPE)
    q, k, v = q_proj.transpose(1, 2), kv_proj[:, :, 0].transpose(1, 2), kv_proj[:, :, 1].transpose(1, 2)
    torch.library.opcheck(FA._forward_op, (q, k, v, True, 0.2))
    o, lse = FA._forward_op(q, k, v, True, 0.2)
    do = torch.randn(batch, seq, n_head, head_dim, generator=gen).to(DEVICE, CASE_DTYPE).transpose(1, 2)
    torch.library.opcheck(FA._backward_op, (do, q, k, v, o, lse, True, 0.2))


def _packed(batch, seq, n_head, n_kv_head, head_dim, seed, dtype=CASE_DTYPE):
    """A packed projection output (batch, seq, (n_head + 2 n_kv_head) head_dim) and an output gradient."""
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(batch, seq, (n_head + 2 * n_kv_head) * head_dim, generator=gen).to(DEVICE, dtype)
    do = torch.randn(batch, seq, n_head, head_dim, generator=gen).to(DEVICE, dtype).transpose(1, 2)
    return qkv, do


def _split_views(qkv, n_head, n_kv_head):
    """q, k, v as the model takes them apart: split the last axis, view the heads, transpose."""
    batch, seq, width = qkv.shape
    head_dim = width // (n_head + 2 * n_kv_head)
    parts = qkv.split([n_head * head_dim, n_kv_head * head_dim, n_kv_head * head_dim], dim=-1)
    return [t.view(batch, seq, -1, head_dim).transpose(1, 2) for t in parts]


# (batch, seq, n_head, n_kv_head, head_dim, causal); head_dim 64 only: on a GPU each new head_dim compiles
# every autotuning config again
PACKED_CASES = {"mha_seq45": (2, 45, 2, 2, 64, True), "gqa4to2_seq37": (1, 37, 4, 2, 64, True),
                "gqa4to1_seq40_noncausal": (2, 40, 4, 1, 64, False)}
# fp32 adds atomic dq into dq itself; fp16/bf16 through the fp32 accumulator (fp16 on CPU: the
# interpreter's bf16 matmuls are wrong)
PACKED_DTYPES = [torch.float32, torch.float16] if DEVICE == "cpu" else [torch.bfloat16]


@pytest.mark.parametrize("dtype", PACKED_DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("mode", ["separate", *ADDED_DQ])
@pytest.mark.parametrize("case", list(PACKED_CASES), ids=list(PACKED_CASES))
def test_packed_qkv_is_attention_over_its_views_with_one_dense_gradient(case, mode, dtype, dq_mode):
    # flash_attention_qkv runs the same kernels on the same views as flash_attention over the split: the
    # same output and dq, dk, dv, but written into one gradient laid out as qkv, which the projection's
    # backward reads without a concatenation. Atomic dq in fp16/bf16 goes through a dense fp32 accumulator
    # and a last pass into the q part of that gradient, whose rows lie (n_head + 2 n_kv_head) head_dim
    # apart (fp32 inputs add into that q part itself; bulk adds always go through the accumulator).
    ran = dq_mode(mode)
    batch, seq, n_head, n_kv_head, head_dim, causal = PACKED_CASES[case]
    qkv, do = _packed(batch, seq, n_head, n_kv_head, head_dim, seed=7, dtype=dtype)
    packed = qkv.clone().requires_grad_()
    out = flash_attention_qkv(packed, n_head, n_kv_head, causal=causal)
    (grad,) = torch.autograd.grad(out, packed, do)
    assert grad.shape == qkv.shape and grad.is_contiguous()
    split = qkv.clone().requires_grad_()
    want_out = flash_attention(*_split_views(split, n_head, n_kv_head), causal=causal)
    (want_grad,) = torch.autograd.grad(want_out, split, do)
    assert torch.equal(out, want_out)
    assert out.transpose(1, 2).is_contiguous()  # stored (B, T, H, D), as flash_attention's
    if mode in ADDED_DQ and DEVICE == "cuda":  # atomic adds sum dq in varying order on a GPU
        q_width = n_head * head_dim
        assert torch.equal(grad[..., q_width:], want_grad[..., q_width:])
        torch.testing.assert_close(grad[..., :q_width], want_grad[..., :q_width], atol=1e-2, rtol=1e-2)
    else:
        assert torch.equal(grad, want_grad)
    # (the split call is held to the fp32 reference by the tests above, the model's layout included)
    assert set(ran) == {mode}


@pytest.mark.parametrize("where", ["offset", "strided"])
def test_packed_qkv_takes_a_slice_or_a_strided_tensor(where, dq_mode):
    # The head views are taken at qkv's storage offset and strides: a qkv that starts inside a larger
    # tensor (a contiguous slice), or one that is not contiguous (made so first), gives what its copy gives
    dq_mode("separate")
    qkv, do = _packed(2, 33, 2, 2, 64, seed=11)
    if where == "offset":
        big = torch.cat([torch.randn_like(qkv[:1]), qkv]).requires_grad_()
        given = big[1:]
    else:
        big = torch.cat([qkv, qkv], -1).requires_grad_()
        given = big[..., :qkv.shape[-1]]
    assert given.is_contiguous() == (where == "offset") and torch.equal(given, qkv)
    results = []
    for x in (given, qkv.clone().requires_grad_()):
        out = flash_attention_qkv(x, 2, 2)
        results.append((out, *torch.autograd.grad(out, x, do)))
    for name, a, b in zip(("out", "dqkv"), *results):
        assert torch.equal(a, b), name


def test_packed_qkv_custom_ops_fakes_match_the_real_ops(dq_mode):
    # as test_custom_ops_fakes_match_the_real_ops_in_the_models_layout, for the packed ops: o stored (B, T,
    # H, D), the one gradient dense in qkv's shape
    dq_mode("separate")
    qkv, do = _packed(2, 40, 4, 2, 32, seed=8)
    torch.library.opcheck(FA._qkv_forward_op, (qkv, 4, 2, True, 0.2))
    o, lse = FA._qkv_forward_op(qkv, 4, 2, True, 0.2)
    torch.library.opcheck(FA._qkv_backward_op, (do, qkv, o, lse, 4, 2, True, 0.2))


@pytest.mark.parametrize("args, error, match", [
    (((2, 8, 160), 2, 2), ValueError, r"last axis \(160\) must hold n_head \+ 2 \* n_kv_head = 6 heads"),
    (((8, 192), 2, 2), ValueError, r"qkv must be 3-D .* got shape \(8, 192\)"),
    (((2, 8, 192), 0, 2), ValueError, r"n_head must be a positive int, got 0"),
    (((2, 8, 192), 3, 2.0), ValueError, r"n_kv_head must be a positive int, got 2.0"),
    (((2, 8, 192), True, 2), ValueError, r"n_head must be a positive int, got True"),
    (((2, 8, 7 * 32), 3, 2), ValueError, r"n_head \(3\) must be a multiple of n_kv_head \(2\)"),
    (((2, 8, 6 * 48), 2, 2), ValueError, r"head_dim must be one of .* got 48 \(qkv's last axis 288 / 6 "),
    (((2, 0, 192), 2, 2), ValueError, r"empty input, qkv \(2, 0, 192\)"),
    (((2, 8, 192), 2, 2, torch.float64), TypeError, r"qkv must be float16, bfloat16 or float32, got .*64"),
])
def test_packed_qkv_invalid_inputs(args, error, match):
    shape, n_head, n_kv_head, *dtype = args
    with pytest.raises(error, match=f"^flash_attention_qkv: .*{match}"):
        flash_attention_qkv(torch.randn(*shape, device=DEVICE, dtype=(dtype or [None])[0]), n_head, n_kv_head)
    if not dtype:
        return
    with pytest.raises(ValueError, match=r"^flash_attention_qkv: softmax_scale must be a positive finite"):
        flash_attention_qkv(torch.randn(*shape, device=DEVICE), n_head, n_kv_head, softmax_scale=0.0)


@pytest.mark.parametrize("mode", ["separate", "atomic"])
def test_grad_output_non_contiguous(mode, dq_mode):
    ran = dq_mode(mode)
    q, k, v, _ = _inputs(1, 2, 2, 40, 40, 32, CASE_DTYPE)
    do = torch.randn(1, 40, 2, 32).to(DEVICE, CASE_DTYPE).transpose(1, 2)  # non-contiguous upstream gradient
    assert not do.is_contiguous()
    # out, dq, dk, dv against the fp32 reference: fp32 tolerances on CPU, 2x torch SDPA's error in bf16 on GPU
    _check(q, k, v, do, causal=True)
    assert set(ran) == {mode}


def test_deterministic_and_tuned_once(dq_mode):
    # Bit-identical outputs and gradients on a second call (dq from its own kernel, no atomics: a resumed
    # run must repeat itself), and the second call takes the launch path that reuses the config chosen by
    # the first.
    fa = FA
    dq_mode("separate")
    q, k, v, do = _inputs(2, 4, 2, 70, 70, 32, CASE_DTYPE, seed=5)
    first = _out_and_grads(flash_attention, q, k, v, do, True)
    key = (70, 70, 32, True, CASE_DTYPE, True)  # seq lengths, head_dim, causal, dtype, heavy-first order
    assert key in fa._FWD.chosen and key in fa._BWD_Q.chosen and key in fa._BWD_KV.chosen
    second = _out_and_grads(flash_attention, q, k, v, do, True)
    for name, a, b in zip(("out", "dq", "dk", "dv"), first, second):
        assert torch.equal(a, b), f"{name} differs between two identical calls"
    _check(q, k, v, do, causal=True)  # and the reused config still computes the right thing


def test_deterministic_mode_takes_the_smallest_tiles_without_autotuning(fixed_tiles):
    """Under torch.use_deterministic_algorithms(True) (run.deterministic) the launcher never times configs:
    it launches the plain kernel with the config of smallest tiles, the same in every process."""
    import triton

    fa = FA
    launches = []

    class Launcher:  # kernel.fn[grid](...): the plain launch
        arg_names = ()  # read by the direct launcher (on a GPU) after a first launch through Triton

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((grid, args, kwargs))

    class Kernel:  # an autotuned kernel's surface: its configs, kernel[grid] (autotunes) and kernel.fn
        configs = [triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3),
                   triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=5),
                   triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=3),
                   triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=2)]
        fn = Launcher()

        def __getitem__(self, grid):
            raise AssertionError("autotuned in deterministic mode")

    tuned = fa._Tuned(Kernel())
    tuned(("key",), "grid", 1, 2, HEAD_DIM=64)
    tuned(("other key",), "grid", 3, HEAD_DIM=128)
    assert [kw["BLOCK_M"] * kw["BLOCK_N"] for _, _, kw in launches] == [2048, 2048]
    assert all(kw["num_stages"] == 3 and kw["num_warps"] == 4 for _, _, kw in launches)
    assert launches[0][:2] == ("grid", (1, 2)) and launches[0][2]["HEAD_DIM"] == 64
    assert tuned.chosen == {}  # nothing was autotuned


# --- Input validation -------------------------------------------------------------------------------------


def _qkv(n_head=2, n_kv_head=2, head_dim=32, dtypes=(torch.float32,) * 3, seq_q=8, seq_k=8):
    # On DEVICE: on a GPU without the interpreter, CPU tensors would stop at the device check first.
    return (torch.randn(1, n_head, seq_q, head_dim, dtype=dtypes[0], device=DEVICE),
            torch.randn(1, n_kv_head, seq_k, head_dim, dtype=dtypes[1], device=DEVICE),
            torch.randn(1, n_kv_head, seq_k, head_dim, dtype=dtypes[2], device=DEVICE))


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(dtypes=(torch.float16, torch.float32, torch.float32)), TypeError, r"one dtype.*q torch.float16"),
    (dict(dtypes=(torch.float64,) * 3), TypeError, r"q must be float16, bfloat16 or float32, got .*float64"),
    (dict(head_dim=48), ValueError, r"head_dim must be one of .* got 48"),
    (dict(n_head=3, n_kv_head=2), ValueError, r"n_head \(q.shape\[1\] = 3\) must be a multiple of n_kv_head"),
    (dict(seq_q=9, seq_k=8), ValueError, r"seq_q <= seq_k.*got seq_q 9 > seq_k 8"),
])
def test_invalid_inputs(kwargs, error, match):
    with pytest.raises(error, match=match):
        flash_attention(*_qkv(**kwargs))


def test_rows_past_32_bit_offsets_are_refused_before_any_launch():
    """Offsets within a head are int32 in the kernels: a layout whose rows reach 2**31 elements is refused
    where a launch is planned (meta tensors: the shapes of a huge call, no memory)."""
    def view(seq, row_stride):  # (1, 1, seq, 64): one head, rows row_stride apart
        return torch.empty_strided((1, 1, seq, 64), (2**40, 2**40, row_stride, 1), device="meta")

    last_fit = 2**31 // 2048  # rows 0 .. last_fit - 1 at stride 2048: the last element is 2**31 - 1985
    FA._check_row_offsets(q=view(last_fit, 2048))
    with pytest.raises(ValueError, match=r"^flash_attention: k's rows reach element 2,147,483,711 of a head "
                                         r"\(1,048,577 rows x row stride 2,048\), past the kernels' 32-bit"):
        FA._check_row_offsets(q=view(last_fit, 2048), k=view(last_fit + 1, 2048))
    ok, big = view(8, 64), view(last_fit + 1, 2048)
    lse = torch.empty(1, 1, 8, device="meta")
    with pytest.raises(ValueError, match=r"^flash_attention: o's rows"):
        FA._launch_forward(ok, ok, ok, big, lse, True, 0.125, None)
    with pytest.raises(ValueError, match=r"^flash_attention: do's rows"):
        FA._launch_backward("separate", big, ok, ok, ok, ok, lse, lse, ok, ok, ok, None, True, 0.125,
                            FA.backward_key(ok.shape, 8, True, ok.dtype), None)


@pytest.mark.parametrize("scale", [0.0, -0.125, float("nan"), float("inf"), "0.125", True])
def test_softmax_scale_must_be_positive(scale):
    with pytest.raises(ValueError, match=r"softmax_scale must be a positive finite number.* got "):
        flash_attention(*_qkv(), softmax_scale=scale)


def test_invalid_rank_and_batch():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"q must be 4-D .* got shape \(2, 8, 32\)"):
        flash_attention(q[0], k, v)
    with pytest.raises(ValueError, match=r"k/v batch must equal q batch 2, got 1"):
        flash_attention(torch.cat([q, q]), k, v)


def test_kernels_lower_to_h100_code():
    # The interpreter never compiles the kernels; lowering them to PTX and SASS for sm_90 (no GPU needed)
    # catches what only the compiler sees (loop-carried types, constexpr branches, tuple returns of helper
    # functions) before a GPU run does. bf16 and fp16 only: an fp32 (IEEE-matmul) variant takes ~80 s to
    # lower on 2 cores; the GPU run compiles those.
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT / "tools")!r})
        import kernel_report
        fa = kernel_report._module()
        for dtype, head_dim, causal in (("bf16", 64, True), ("fp16", 128, False)):
            for kernel, tuned in zip(("fwd", "bwd_q", "bwd_kv", "bwd_kv_atomic", "bwd_kv_bulk"),
                                     (fa._FWD, fa._BWD_Q, fa._BWD_KV, fa._BWD_KV_ATOMIC, fa._BWD_KV_BULK)):
                # the configuration deterministic runs use, which must fit an A100 (163 KB of shared memory),
                # compiled without the alignment hints (the code odd strides or lengths get)
                f = tuned.fixed
                config = (f["BLOCK_M"], f["BLOCK_N"], f["num_warps"], f["num_stages"])
                r = kernel_report.compile_report(kernel, config, head_dim, dtype, causal, aligned=False)
                assert r.sass.strip(), (kernel, dtype)
                assert r.shared_bytes <= 163 * 1024, (kernel, dtype, r.shared_bytes)
        # atomic dq's last pass, from the fp32 accumulator into dq through both tensors' strides
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        jit = fa._scale_cast_kernel
        constexprs = {{"HEAD_DIM": 64, "BLOCK_R": fa._SCALE_CAST_ROWS}}
        types = {{"X": "*fp32", "Y": "*bf16", "scale": "fp32", **dict.fromkeys(constexprs, "constexpr")}}
        signature = {{name: types.get(name, "i32") for name in jit.arg_names}}
        src = ASTSource(fn=jit, signature=signature, constexprs=constexprs)
        assert triton.compile(src, target=GPUTarget("cuda", 90, 32), options={{"num_warps": 4}}).asm["cubin"]
        print("LOWERED")
    """)
    assert_lowers_to_sm90(code)


def test_gpu_configs_do_not_spill_registers_on_h100():
    # Every GPU tiling of the three attention kernels and every timed candidate of the cross-entropy kernel,
    # compiled for sm_90 as a launch specializes it (bf16, head_dim 64, causal; tools/kernel_report.py):
    # registers spilled to local memory cost every tile, so a kernel change or a new tiling that spills
    # fails here, except the tilings the kernel modules list as allowed to (timed anyway, and the two
    # attention ones measured fastest); those must still spill, or the list is stale. All must fit the
    # H100's 227 KiB of shared memory per block. (The autotuner would drop a tiling that does not fit; the
    # list should hold none.)
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT / "tools")!r})
        import kernel_report
        fa = kernel_report._module()
        ce = sys.modules["fastlm.kernels.cross_entropy"]
        for kernel in kernel_report.KERNELS:
            for config in kernel_report.configs(kernel):
                r = kernel_report.compile_report(kernel, config)
                allowed = config in (ce.SPILLING_CANDIDATES if kernel == "ce"
                                     else fa.SPILLING_CONFIGS.get(kernel, ()))
                assert (r.spill_bytes > 0) == allowed, r.line()
                assert r.shared_bytes <= 227 * 1024, r.line()
                # Hopper's tensor-core path, not the older mma.sync (the loss kernel has no matmul)
                assert (r.ops["HGMMA"] > 0) == (kernel != "ce"), r.line()
                print(r.line())
        print("LOWERED")
    """)
    assert_lowers_to_sm90(code)


def test_cpu_without_interpreter_is_a_clear_error(tmp_path):
    script = textwrap.dedent("""
        import torch
        from fastlm.kernels import flash_attention
        q = torch.randn(1, 1, 4, 32)
        try:
            flash_attention(q, q, q)
        except RuntimeError as e:
            print("ERROR:", e)
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "ERROR:" in out and "CUDA" in out and "TRITON_INTERPRET=1" in out, out


# --- GPU: realistic shapes, bf16 and fp16 -----------------------------------------------------------------
# Each new (dtype, head_dim, causal, seq % 16) combination compiles every autotune config of three kernels
# (~1-3 s each), so the list covers each path once and keeps benchmarks/device_check.sh in its time budget.
# fp32 on GPU (IEEE matmuls, ~10-30 s per compile) is left to the interpreter tests.

GPU_CASES = {
    "mha_T1024_hd64": (4, 8, 8, 1024, 1024, 64, True),
    "mha_T1024_hd128": (2, 8, 8, 1024, 1024, 128, True),
    "gqa8to2_T1024_hd64": (2, 8, 2, 1024, 1024, 64, True),
    "cached_q256_k1024_hd64": (2, 8, 8, 256, 1024, 64, True),
    "noncausal_T1000_hd64": (2, 8, 8, 1000, 1000, 64, False),
}
GPU_RUNS = [(case, torch.bfloat16) for case in GPU_CASES] + [
    ("mha_T1024_hd64", torch.float16), ("mha_T1024_hd128", torch.float16)]


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("case, dtype", GPU_RUNS, ids=[f"{c}-{str(d)[6:]}" for c, d in GPU_RUNS])
def test_gpu_within_2x_of_torch(case, dtype):
    *shape, causal = GPU_CASES[case]
    q, k, v, do = _inputs(*shape, dtype=dtype, device="cuda", seed=3)
    _check(q, k, v, do, causal)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("case", ["gqa_T300_hd64", "mha_T1024_hd64"])
def test_gpu_compiled_fullgraph_matches_eager(case, dq_mode):
    """Under torch.compile the attention is a custom op (no graph break: fullgraph=True) and gives what the
    eager call gives, forward and backward (dq from its own kernel: atomic adds would vary its last bits)."""
    dq_mode("separate")
    *shape, causal = {"gqa_T300_hd64": (2, 8, 2, 300, 300, 64, True),
                      "mha_T1024_hd64": (2, 8, 8, 1024, 1024, 64, True)}[case]
    q, k, v, do = _inputs(*shape, dtype=torch.bfloat16, device="cuda", seed=5)
    eager = _out_and_grads(flash_attention, q, k, v, do, causal)
    torch._dynamo.reset()
    compiled = torch.compile(flash_attention, fullgraph=True)
    got = _out_and_grads(compiled, q, k, v, do, causal)
    # Same kernels, same autotuned config (chosen once per shape), same inputs: the same bits.
    for name, g, e in zip(("out", "dq", "dk", "dv"), got, eager):
        assert torch.equal(g, e), name


@pytest.mark.gpu
@requires_cuda
def test_gpu_packed_qkv_compiled_fullgraph_matches_eager(dq_mode):
    """The packed ops under torch.compile (what a compiled block without rotary embedding runs) give the
    eager call's output and the one gradient, bit for bit."""
    dq_mode("separate")
    gen = torch.Generator(device="cuda").manual_seed(9)
    qkv = torch.randn(2, 300, 12 * 64, generator=gen, device="cuda").to(torch.bfloat16)
    do = torch.randn(2, 300, 8, 64, generator=gen, device="cuda").to(torch.bfloat16).transpose(1, 2)

    def run(fn):
        x = qkv.clone().requires_grad_()
        out = fn(x, 8, 2)
        return [out, *torch.autograd.grad(out, x, do)]

    eager = run(flash_attention_qkv)
    torch._dynamo.reset()
    got = run(torch.compile(flash_attention_qkv, fullgraph=True))
    for name, g, e in zip(("out", "dqkv"), got, eager):
        assert torch.equal(g, e), name


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("mode", ADDED_DQ)
@pytest.mark.parametrize("case", ["mha_T1024_hd64", "mha_T1024_hd128", "gqa8to2_T1024_hd64",
                                  "noncausal_T1000_hd64"])
def test_gpu_atomic_dq_within_2x_of_torch(case, mode, dq_mode):
    ran = dq_mode(mode)
    *shape, causal = GPU_CASES[case]
    q, k, v, do = _inputs(*shape, dtype=torch.bfloat16, device="cuda", seed=3)
    _check(q, k, v, do, causal)
    assert ran == [mode]


@pytest.mark.gpu
@requires_cuda
def test_gpu_auto_dq_mode_times_both(dq_mode):
    ran = dq_mode("auto")
    q, k, v, do = _inputs(2, 8, 8, 768, 768, 64, torch.bfloat16, device="cuda", seed=6)
    key = FA.backward_key(q.shape, 768, True, torch.bfloat16)
    FA.DQ_CHOSEN.pop(key, None)
    _check(q, k, v, do, True)  # the gradients of the call that timed the two modes
    times = FA.DQ_TIMES[key]
    assert set(times) == {"separate", "atomic"} and all(t > 0 for t in times.values())
    assert FA.DQ_CHOSEN[key] == min(times, key=times.get)
    print(f"backward at B2 H8 T768 hd64 bf16: {times} ms -> {FA.DQ_CHOSEN[key]}")
    ran.clear()
    _out_and_grads(flash_attention, q, k, v, do, True)
    assert ran == [FA.DQ_CHOSEN[key]]


@pytest.mark.parametrize("causal", ["no", 0, None])
def test_causal_must_be_a_bool(causal):
    # ("no" is truthy: it would have run causal attention)
    with pytest.raises(TypeError, match=rf"flash_attention: causal must be True or False, got {causal!r}"):
        flash_attention(*_qkv(), causal=causal)
    qkv, _ = _packed(1, 8, 2, 2, 32, seed=0)
    with pytest.raises(TypeError, match=r"flash_attention_qkv: causal must be True or False"):
        flash_attention_qkv(qkv, 2, 2, causal=causal)


def test_a_double_backward_is_an_error_not_a_silent_zero():
    """The kernels' gradients carry no graph: with create_graph=True a second derivative raises instead of
    being dropped (the first gradient would not require grad, and a penalty on it would add nothing)."""
    q, k, v = (t.requires_grad_() for t in _qkv())
    qkv = _packed(1, 8, 2, 2, 32, seed=0)[0].requires_grad_()
    for fn, out, x in (("flash_attention", flash_attention(q, k, v), q),
                       ("flash_attention_qkv", flash_attention_qkv(qkv, 2, 2), qkv)):
        with pytest.raises(RuntimeError, match=rf"^{fn}: backward with create_graph=True \(a second "
                                               r"derivative\) is not supported"):
            torch.autograd.grad(out.sum(), x, create_graph=True)
