"""Flash attention (FlashAttention-2 style) forward and backward in Triton, with grouped-query attention.

Layering, top to bottom: `@triton.jit` kernels -> launchers (`_forward`, `_backward`) that validate inputs and
pick the grid -> a thin `torch.autograd.Function` -> the public `flash_attention`. `attention_reference` is
the plain fp32 torch computation that tests and benchmarks hold the kernels to.

Layout: q is (batch, n_head, seq_q, head_dim); k and v are (batch, n_kv_head, seq_k, head_dim) with
n_head % n_kv_head == 0; query head h reads kv head h // (n_head // n_kv_head). Any strides are accepted
(the last dimension is made contiguous if it is not). The output is a new tensor of q's shape and dtype,
laid out in memory as (batch, seq_q, n_head, head_dim) like SDPA's, so that merging the heads back,
`out.transpose(1, 2).reshape(batch, seq_q, -1)`, is a view. Causal masking is aligned bottom-right: query i
sees keys j <= i + seq_k - seq_q, which is the usual triangle when seq_q == seq_k and the KV-cached decoding
mask when seq_q < seq_k. `flash_attention_qkv` takes q, k, v packed in one (batch, seq, heads * head_dim)
projection output and returns their gradient as one tensor of that layout (the same kernels on views).

Numerics: scores, the online softmax and all accumulators are fp32; the probabilities (and in the backward the
score gradients) are rounded to the input dtype before they meet v (q, k) in a matmul, as FlashAttention does.
fp32 inputs use IEEE fp32 matmuls (no TF32), so fp32 results match an fp32 reference closely. dq is summed
either by a kernel of its own or with fp32 atomic adds, per element or per tile (BWD_DQ, timed per shape on
a GPU); deterministic runs take the former, which repeats bit for bit.

Limits: head_dim in {16, 32, 64, 128}; softmax_scale > 0; causal needs seq_q <= seq_k (a query with no
visible key has no softmax); no dropout, no attention bias, no variable-length (packed) batches. On CPU the
kernels run only under Triton's interpreter (TRITON_INTERPRET=1 set before this module is imported), which is
for tests: it is slow, and its bf16 matmuls are wrong, so bf16 is checked on GPU only.
"""

from __future__ import annotations

import math
import numbers
import os
import warnings

import torch
import triton
import triton.language as tl

from triton.runtime import _allocation  # (Triton 3.6's scratch allocator setting, see _scratch_allocator)
from triton.runtime.errors import OutOfResources, PTXASError

from . import launch as launch_module
from .launch import (CachedLauncher, LaunchPlan, Recording, aligned, direct_launches_allowed,
                     refuse_create_graph)

# Read once: @triton.jit decides at import time whether the kernels are compiled or interpreted.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _interpreter_adds_descriptor_tiles() -> None:
    """Triton 3.6's interpreter has no reduction through a tensor descriptor (descriptor.atomic_add, which
    BWD_DQ "bulk" uses): this gives it one, made of its own parts (the descriptor's pointers and bounds
    mask, its atomic add), so that the CPU tests run the bulk kernel's arithmetic too."""
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    if hasattr(builder, "create_descriptor_reduce"):
        return
    ir = interpreter._ir

    def create_descriptor_reduce(self, kind, desc, value, indices):
        if kind != ir.DESCRIPTOR_REDUCE_KIND.ADD:
            raise NotImplementedError(f"descriptor reduction {kind} under the interpreter (fastlm adds only)")
        ptrs, mask = desc.materialize_pointers(indices)
        return self.create_atomic_rmw(ir.ATOMIC_OP.FADD, ptrs, value, interpreter.TensorHandle(mask, tl.int1),
                                      ir.MEM_SEMANTIC.RELAXED, ir.MEM_SYNC_SCOPE.GPU)

    builder.create_descriptor_reduce = create_descriptor_reduce


if _INTERPRET:
    _interpreter_adds_descriptor_tiles()

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# exp2 is cheaper than exp on GPU: scores are kept in log2 units (score * softmax_scale * log2(e)), and so
# is the saved log-sum-exp. It is an internal quantity: only the backward kernels read it.
_LOG2E = 1.4426950408889634


def _configs(interpret_blocks, gpu_blocks):
    """One config under the interpreter (autotune with several configs fails there), a small list on GPU.

    The interpreter blocks are deliberately small and unequal (BLOCK_M != BLOCK_N) so that the tiny test
    shapes cross several blocks and exercise the partial-block and causal-diagonal paths of both axes.
    """
    if _INTERPRET:
        m, n = interpret_blocks
        return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
            for m, n, w, s in gpu_blocks]


# Autotuning keys: seq lengths and head_dim decide the tile shape; CAUSAL changes the work per tile, and
# HEAVY_FIRST (below) the order the tiles run in. The autotuner adds the tensors' dtypes to the key by
# itself. Configs that do not fit in shared memory (e.g. 128x128 tiles, head_dim 128) are dropped by the
# autotuner (OutOfResources), not errors. Every config is compiled (~1-2 s each) for every new dtype /
# head_dim / causal combination, so the lists hold only shapes known to do well on Hopper (FlashAttention-2's
# and Triton's tutorial tilings); the GPU tests run in parallel processes (benchmarks/device_check.sh) to
# keep those compilations in its time budget.
_TUNE_KEY = ["seq_q", "seq_k", "HEAD_DIM", "CAUSAL", "HEAVY_FIRST"]
# Head counts and the GQA group only enter index arithmetic: specializing on their values (==1, %16) would
# only multiply compilations.
_NO_SPECIALIZE = ["n_head", "group"]

# Program order. Under a causal mask a block's work grows with its position: query block m of the forward
# and dq kernels visits m + 1 key blocks, key block n of the dk/dv kernel visits the query blocks from n
# on. The GPU starts programs in grid order, so with the blocks of one head after another (the grid
# (blocks, heads)) the heaviest blocks of the last heads start last and finish alone. HEAVY_FIRST launches
# the grid (heads, blocks) with the blocks in decreasing work: the heaviest of every head first, the
# lightest last (longest processing time first, as FlashAttention-3 schedules causal tiles). In a model of
# the schedule (tools/causal_schedule.py: B8 H16 on 132 SMs) the forward goes from 63% / 77% / 86% of
# ideal at T = 512 / 1024 / 2048 to 97-99%; a real SM runs a lone program faster, so the real gain is
# smaller. It also lifts the grid's 65,535 limit on its second axis off batch x heads. Causal calls only
# (without the mask every block does the same work; `_heavy_first`); read at every launch:
# benchmarks/attention_profile.py times both orders on a GPU.
HEAVY_FIRST = True

# How the backward computes dq. "separate": its own kernel, which walks a query block's keys again and
# recomputes P and dP there (3 matmuls on top of the dk/dv kernel's 4), deterministic. "atomic": the dk/dv
# kernel adds each key block's dS K to an fp32 dq with atomic adds (5 matmuls in all, as FlashAttention-2/3
# and cuDNN do), then one pass scales and rounds it; the order of the adds varies from run to run, so dq
# varies in its last bits. "bulk": as "atomic", with each dq tile added by one TMA bulk reduction
# (Hopper's cp.reduce.async.bulk.tensor, as FlashAttention-3 adds dq) instead of one 16-byte atomic per four
# values, whose traffic grows with T^2 (~1 GB at B8 H16 T2048: there "atomic" took 1.5x the "separate"
# backward on an H100). "auto": on CUDA, the first backward of each shape (the tuning key) times the modes
# of AUTO_DQ_MODES and keeps the fastest; deterministic runs (torch.use_deterministic_algorithms) always
# take "separate", and so does "auto" where nothing is timed (the interpreter, CUDA graph capture).
BWD_DQ = "auto"
_DQ_MODES = ("separate", "atomic", "bulk")
# "bulk" joins these once a GPU run has checked it (tests/test_kernel_attention.py, GPU tests) and timed it
# (benchmarks/test_attention_dq_modes.py): until then it runs where asked for only.
AUTO_DQ_MODES = ("separate", "atomic")
DQ_TIMING_REPS = 3  # timed backwards of each mode, after one that tunes and compiles its kernels


def _prune_fp32(configs, named_args, **kwargs):
    # fp32 (IEEE matmuls) is for checks, not training speed, and each of its configs takes ~10-30 s to
    # compile: tune nothing, take the first config.
    return configs[:1] if named_args["Q"].dtype == torch.float32 else configs


_PRUNE = {"early_config_prune": _prune_fp32}
# (BLOCK_M, BLOCK_N, num_warps, num_stages). `python tools/kernel_report.py` compiles each for an H100
# without a GPU and shows its registers and spills: at head_dim 64 (bf16, causal) none of these spills,
# except the two dk/dv tilings marked below.
# The forward keeps a BLOCK_M x HEAD_DIM fp32 accumulator.
_FWD_CONFIGS = _configs(
    (32, 16),
    [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 64, 4, 4), (64, 128, 4, 3)],
)
# dk/dv: a program owns BLOCK_N keys (two BLOCK_N x HEAD_DIM fp32 accumulators, k and v in registers) and
# streams BLOCK_M queries: with 4 warps that needs more than 255 registers a thread. The 8-warp tilings
# share the accumulators among twice the threads and do not spill; (32, 128, 4, 3) and (64, 64, 4, 3)
# spill (272 and 200 bytes a thread, mostly outside the inner loop) but were the fastest of an earlier list
# on an H200 (at T=2048 and T=512), so they stay until a run says otherwise.
_BWD_KV_CONFIGS = _configs(
    (16, 32),
    [(32, 128, 8, 3), (64, 128, 8, 2), (64, 64, 8, 3), (32, 64, 4, 3), (32, 128, 4, 3), (64, 64, 4, 3)],
)
# dq: a program owns BLOCK_M queries and streams BLOCK_N keys through them.
_BWD_Q_CONFIGS = _configs(
    (32, 16),
    [(128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 4, 3), (128, 32, 4, 5), (64, 32, 4, 5)],
)
# dk/dv adding dq atomically (BWD_DQ): a fifth matmul, dq = dS K (BLOCK_M x HEAD_DIM), per step. Triton
# gathers its tile through shared memory into 16-byte reductions (REDG.E.ADD.F32x4: one per 4 values).
# With BLOCK_M = 32 that matmul runs on mma.sync (a wgmma needs 64 rows), with 64 on wgmma. 4 warps with
# BLOCK_M = 64 spill 320 bytes a thread; (64, 128, 8, 2) and (64, 64, 8, 3) spill 16 and 32.
_BWD_KV_ATOMIC_CONFIGS = _configs(
    (16, 32),
    [(64, 64, 8, 2), (64, 128, 8, 2), (32, 128, 8, 3), (32, 64, 4, 3), (64, 64, 8, 3)],
)
# the tilings allowed to spill registers at head_dim 64 (tests/test_kernel_attention.py holds the rest to 0)
SPILLING_CONFIGS = {"bwd_kv": ((32, 128, 4, 3), (64, 64, 4, 3)),
                    "bwd_kv_atomic": ((64, 128, 8, 2), (64, 64, 8, 3)),
                    "bwd_kv_bulk": ((64, 64, 8, 3),)}  # (24 bytes a thread; the other bulk tilings none)


# ----------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _block_and_head(HEAVY_FIRST: tl.constexpr, LAST_IS_HEAVIEST: tl.constexpr):
    """This program's (block, batch * head) index: the grid is (heads, blocks) in HEAVY_FIRST order, the
    blocks counted from the heaviest (the last one when LAST_IS_HEAVIEST), else (blocks, heads)."""
    if HEAVY_FIRST:
        block = tl.program_id(1)
        if LAST_IS_HEAVIEST:
            block = tl.num_programs(1) - 1 - block
        head = tl.program_id(0)
    else:
        block = tl.program_id(0)
        head = tl.program_id(1)
    return block, head


@triton.jit
def _key_range(start_m, seq_q, seq_k, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The keys that query rows [start_m, start_m + BLOCK_M) attend to, as (n_full, hi): keys below n_full
    lie inside seq_k and are visible to every row of the block (no mask needed there); keys in
    [n_full, hi) need the mask; keys from hi on are never visible (causal row i sees keys up to
    i + seq_k - seq_q: the mask is aligned bottom-right). The forward and the dq kernel walk the same
    range."""
    if CAUSAL:
        shift = seq_k - seq_q
        hi = tl.minimum(seq_k, start_m + BLOCK_M + shift)
        n_full = tl.maximum(0, tl.minimum(start_m + shift + 1, seq_k)) // BLOCK_N * BLOCK_N
    else:
        hi = seq_k
        n_full = seq_k // BLOCK_N * BLOCK_N
    return n_full, hi


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, lo, hi, offs_m, offs_n, offs_d,
               seq_k, causal_shift, qk_scale,
               MASKED: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr):
    """Online softmax over key blocks [lo, hi). MASKED blocks may cross seq_k or the causal diagonal."""
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        kT_ptrs = k_base + cols[None, :] * stride_kt + offs_d[:, None]  # (HEAD_DIM, BLOCK_N)
        v_ptrs = v_base + cols[:, None] * stride_vt + offs_d[None, :]  # (BLOCK_N, HEAD_DIM)
        if MASKED:
            kT = tl.load(kT_ptrs, mask=cols[None, :] < seq_k, other=0.0)
            v = tl.load(v_ptrs, mask=cols[:, None] < seq_k, other=0.0)
        else:
            kT = tl.load(kT_ptrs)
            v = tl.load(v_ptrs)
        s = tl.dot(q, kT, input_precision=PRECISION)  # (BLOCK_M, BLOCK_N), unscaled
        if MASKED:
            keep = cols[None, :] < seq_k
            if CAUSAL:
                keep = keep & (cols[None, :] <= offs_m[:, None] + causal_shift)
            s = tl.where(keep, s, float("-inf"))
        # The scale (> 0, so it commutes with max, exactly even after rounding) goes on the row max, and
        # scaling and shifting the scores is one fused multiply-add each: one multiply per score fewer, in
        # the loop where the non-matmul work per score is what limits head_dim 64.
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)  # log2 units
        p = tl.math.exp2(s * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.autotune(configs=_FWD_CONFIGS, key=_TUNE_KEY, prune_configs_by=_PRUNE)
@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _fwd_kernel(Q, K, V, O, LSE, qk_scale,
                stride_qb, stride_qh, stride_qt,
                stride_kb, stride_kh, stride_kt,
                stride_vb, stride_vh, stride_vt,
                stride_ob, stride_oh, stride_ot,
                n_head, group, seq_q, seq_k,
                HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
                HEAVY_FIRST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m, pid_bh = _block_and_head(HEAVY_FIRST, True)
    off_b = (pid_bh // n_head).to(tl.int64)
    off_h = (pid_bh % n_head).to(tl.int64)
    off_kvh = off_h // group

    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < seq_q

    q_base = Q + off_b * stride_qb + off_h * stride_qh
    k_base = K + off_b * stride_kb + off_kvh * stride_kh
    v_base = V + off_b * stride_vb + off_kvh * stride_vh
    q = tl.load(q_base + offs_m[:, None] * stride_qt + offs_d[None, :], mask=row_ok[:, None], other=0.0)

    causal_shift = seq_k - seq_q
    n_full, hi = _key_range(start_m, seq_q, seq_k, CAUSAL, BLOCK_M, BLOCK_N)

    # m starts finite so that a row whose first block is fully masked gives exp2(-inf - m) = 0, not NaN.
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, 0, n_full,
                               offs_m, offs_n, offs_d, seq_k, causal_shift, qk_scale,
                               False, CAUSAL, PRECISION, BLOCK_N)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, n_full, hi,
                               offs_m, offs_n, offs_d, seq_k, causal_shift, qk_scale,
                               True, CAUSAL, PRECISION, BLOCK_N)

    out = acc / l_i[:, None]
    o_base = O + off_b * stride_ob + off_h * stride_oh
    tl.store(o_base + offs_m[:, None] * stride_ot + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=row_ok[:, None])
    # LSE is (batch, n_head, seq_q) contiguous fp32, in log2 units of the scaled scores.
    tl.store(LSE + pid_bh.to(tl.int64) * seq_q + offs_m, m_i + tl.math.log2(l_i), mask=row_ok)


@triton.jit
def _bwd_kv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, dq_base, stride_qt, stride_dot,
                  stride_dqt, lo, hi,
                  offs_n, offs_m0, offs_d, seq_q, seq_k, causal_shift, qk_scale,
                  MASKED: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                  HEAD_DIM: tl.constexpr, ATOMIC_DQ: tl.constexpr, DQ_BULK: tl.constexpr,
                  MASK_KEYS: tl.constexpr):
    """Accumulate dk, dv of one key block over query blocks [lo, hi); MASKED applies the causal mask.
    ATOMIC_DQ: also add this key block's share of dq, dS K (unscaled), to the fp32 rows at dq_base (with
    DQ_BULK, dq_base is a tensor descriptor of those rows, and each tile goes in one bulk reduction).
    MASK_KEYS: zero dS at keys past seq_k (see the kernel).

    Works on transposed scores (keys x queries) so that dv += P^T dO and dk += dS^T Q need no transposes of
    the accumulators. Query rows past seq_q load q = dO = 0, lse = delta = 0, so they add exactly zero.
    """
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m0
        row_ok = rows < seq_q
        q = tl.load(q_base + rows[:, None] * stride_qt + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        do = tl.load(do_base + rows[:, None] * stride_dot + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        lse = tl.load(lse_base + rows, mask=row_ok, other=0.0)
        delta = tl.load(delta_base + rows, mask=row_ok, other=0.0)
        sT = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M)
        pT = tl.math.exp2(sT - lse[None, :])
        if MASKED:
            pT = tl.where(offs_n[:, None] <= rows[None, :] + causal_shift, pT, 0.0)
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=PRECISION)
        dpT = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        dsT = pT * (dpT - delta[None, :])
        if MASK_KEYS:
            dsT = tl.where(offs_n[:, None] < seq_k, dsT, 0.0)
        dsT = dsT.to(q.dtype)
        dk = tl.dot(dsT, q, dk, input_precision=PRECISION)
        if ATOMIC_DQ:
            dq = tl.dot(tl.trans(dsT), k, input_precision=PRECISION)  # (BLOCK_M, HEAD_DIM)
            if DQ_BULK:
                # the whole tile from shared memory in one TMA reduction (rows past seq_q lie outside the
                # descriptor's bounds: dropped)
                dq_base.atomic_add([start_m, 0], dq)
            else:
                # relaxed: the adds only need to be atomic, not ordered against other memory operations
                tl.atomic_add(dq_base + rows[:, None] * stride_dqt + offs_d[None, :], dq,
                              mask=row_ok[:, None], sem="relaxed")
    return dk, dv


@triton.autotune(configs=_BWD_KV_CONFIGS, key=_TUNE_KEY, prune_configs_by=_PRUNE)
@triton.jit(do_not_specialize=_NO_SPECIALIZE + ["n_kv_head"])
def _bwd_kv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, DQ, qk_scale, sm_scale,
                   stride_qb, stride_qh, stride_qt,
                   stride_kb, stride_kh, stride_kt,
                   stride_vb, stride_vh, stride_vt,
                   stride_dob, stride_doh, stride_dot,
                   stride_dkb, stride_dkh, stride_dkt,
                   stride_dvb, stride_dvh, stride_dvt,
                   stride_dqb, stride_dqh, stride_dqt,
                   n_head, n_kv_head, group, seq_q, seq_k,
                   HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
                   HEAVY_FIRST: tl.constexpr, ATOMIC_DQ: tl.constexpr, DQ_BULK: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # GQA: one program owns a key block of one kv head and loops over every query head of its group, so
    # dk/dv sum the group's contributions in fp32 registers: no atomics, no (batch, n_head, seq_k, head_dim)
    # temporaries to reduce with torch afterwards, and the fp32 sum is rounded to the input dtype only once.
    # ATOMIC_DQ (see BWD_DQ): DQ is a zeroed fp32 (batch, n_head, seq_q, HEAD_DIM) accumulator (strides
    # stride_dq*) that every key block adds its share of dq to; else DQ is not read (the dq kernel computes
    # dq). DQ_BULK (BWD_DQ "bulk"): the adds are whole tiles, each a TMA bulk reduction through a tensor
    # descriptor of the head's (seq_q, HEAD_DIM) rows, made here (needs Triton's scratch allocator, see
    # _scratch_allocator; DQ 16-byte aligned with a row stride of a multiple of 16 bytes, which the
    # accumulator _backward_with allocates has).
    # Keys past seq_k load k = v = 0, so their score is 0 and P = exp2(-lse), which overflows to inf when a
    # row's real scores are all far below 0. dk/dv never store those rows, but dS K sums over keys: inf * 0
    # would put NaN into dq. Causal calls mask those keys already (they lie past every row's diagonal);
    # non-causal ones zero dS there (MASK_KEYS, atomic dq only).
    pid_n, pid_bkv = _block_and_head(HEAVY_FIRST, False)  # the first key blocks see the most queries
    off_b = (pid_bkv // n_kv_head).to(tl.int64)
    off_kvh = (pid_bkv % n_kv_head).to(tl.int64)

    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    col_ok = offs_n < seq_k
    k = tl.load(K + off_b * stride_kb + off_kvh * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :],
                mask=col_ok[:, None], other=0.0)
    v = tl.load(V + off_b * stride_vb + off_kvh * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :],
                mask=col_ok[:, None], other=0.0)

    # Query range: causal query i sees key j iff i >= j - shift. Query blocks before m_lo see none of this
    # block's keys and are skipped; blocks from m_full on see all of them and need no mask.
    causal_shift = seq_k - seq_q
    if CAUSAL:
        m_lo = tl.maximum(0, start_n - causal_shift) // BLOCK_M * BLOCK_M
        first_full_row = tl.maximum(0, start_n + BLOCK_N - 1 - causal_shift)
        m_full = tl.minimum((first_full_row + BLOCK_M - 1) // BLOCK_M * BLOCK_M, seq_q)
        m_full = tl.maximum(m_full, m_lo)
    else:
        m_lo = 0
        m_full = 0

    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    for g in range(0, group):
        off_h = off_kvh * group + g
        bh = off_b * n_head + off_h
        q_base = Q + off_b * stride_qb + off_h * stride_qh
        do_base = DO + off_b * stride_dob + off_h * stride_doh
        lse_base = LSE + bh * seq_q
        delta_base = DELTA + bh * seq_q
        dq_base = DQ + off_b * stride_dqb + off_h * stride_dqh
        if DQ_BULK:
            dq_base = tl.make_tensor_descriptor(dq_base, shape=[seq_q, HEAD_DIM], strides=[stride_dqt, 1],
                                                block_shape=[BLOCK_M, HEAD_DIM])
        dk, dv = _bwd_kv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, dq_base, stride_qt,
                               stride_dot, stride_dqt, m_lo, m_full, offs_n, offs_m0, offs_d, seq_q, seq_k,
                               causal_shift, qk_scale, True, PRECISION, BLOCK_M, HEAD_DIM, ATOMIC_DQ, DQ_BULK,
                               False)
        dk, dv = _bwd_kv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, dq_base, stride_qt,
                               stride_dot, stride_dqt, m_full, seq_q, offs_n, offs_m0, offs_d, seq_q, seq_k,
                               causal_shift, qk_scale, False, PRECISION, BLOCK_M, HEAD_DIM, ATOMIC_DQ,
                               DQ_BULK, ATOMIC_DQ and not CAUSAL)

    dk = dk * sm_scale  # scores are sm_scale * q k^T
    dk_ptrs = DK + off_b * stride_dkb + off_kvh * stride_dkh + offs_n[:, None] * stride_dkt + offs_d[None, :]
    dv_ptrs = DV + off_b * stride_dvb + off_kvh * stride_dvh + offs_n[:, None] * stride_dvt + offs_d[None, :]
    tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=col_ok[:, None])
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=col_ok[:, None])


@triton.jit(do_not_specialize=["n_head"])
def _bwd_prep_kernel(O, DO, DELTA, DQ,
                     stride_ob, stride_oh, stride_ot, stride_dob, stride_doh, stride_dot,
                     stride_dqb, stride_dqh, stride_dqt,
                     n_head, seq_q, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """Atomic dq's first pass, grid (batch * n_head, query blocks): delta_i = sum_d dO_id * O_id for the
    dk/dv kernel (the separate dq kernel computes it itself), and the fp32 dq accumulator's rows zeroed."""
    pid_bh = tl.program_id(0)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < seq_q
    off_b = (pid_bh // n_head).to(tl.int64)
    off_h = (pid_bh % n_head).to(tl.int64)
    o_ptrs = O + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :]
    do_ptrs = DO + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :]
    o = tl.load(o_ptrs, mask=row_ok[:, None], other=0.0)
    do = tl.load(do_ptrs, mask=row_ok[:, None], other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + pid_bh.to(tl.int64) * seq_q + offs_m, delta, mask=row_ok)
    dq_ptrs = DQ + off_b * stride_dqb + off_h * stride_dqh + offs_m[:, None] * stride_dqt + offs_d[None, :]
    tl.store(dq_ptrs, tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32), mask=row_ok[:, None])


@triton.jit(do_not_specialize=["n_head"])
def _scale_cast_kernel(X, Y, scale, stride_xb, stride_xh, stride_xt, stride_yb, stride_yh, stride_yt,
                       n_head, seq, n_rows, HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr):
    """Y = (X * scale) in Y's dtype for two (batch, n_head, seq, HEAD_DIM) tensors, each with its own
    strides (X and Y may be one tensor), BLOCK_R of the n_rows = batch * n_head * seq rows per program.
    Atomic dq's last pass: from the fp32 accumulator into dq, which may be a strided view (the q part of a
    packed gradient, flash_attention_qkv), so nothing here assumes dense storage."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    ok = rows < n_rows
    t = rows % seq
    bh = rows // seq
    b = bh // n_head
    h = bh % n_head
    offs_d = tl.arange(0, HEAD_DIM)
    x = tl.load(X + (b * stride_xb + h * stride_xh + t * stride_xt)[:, None] + offs_d[None, :],
                mask=ok[:, None])
    y = (x * scale).to(Y.dtype.element_ty)
    tl.store(Y + (b * stride_yb + h * stride_yh + t * stride_yt)[:, None] + offs_d[None, :], y,
             mask=ok[:, None])


@triton.jit
def _bwd_q_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, lo, hi, offs_m, offs_n, offs_d,
                 seq_k, causal_shift, qk_scale,
                 MASKED: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr):
    """Accumulate dq of one query block over key blocks [lo, hi), the same ranges as the forward."""
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        kT_ptrs = k_base + cols[None, :] * stride_kt + offs_d[:, None]  # (HEAD_DIM, BLOCK_N)
        vT_ptrs = v_base + cols[None, :] * stride_vt + offs_d[:, None]
        if MASKED:
            kT = tl.load(kT_ptrs, mask=cols[None, :] < seq_k, other=0.0)
            vT = tl.load(vT_ptrs, mask=cols[None, :] < seq_k, other=0.0)
        else:
            kT = tl.load(kT_ptrs)
            vT = tl.load(vT_ptrs)
        s = tl.dot(q, kT, input_precision=PRECISION) * qk_scale
        p = tl.math.exp2(s - lse[:, None])
        if MASKED:
            keep = cols[None, :] < seq_k
            if CAUSAL:
                keep = keep & (cols[None, :] <= offs_m[:, None] + causal_shift)
            p = tl.where(keep, p, 0.0)
        dp = tl.dot(do, vT, input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(kT.dtype), tl.trans(kT), dq, input_precision=PRECISION)
    return dq


@triton.autotune(configs=_BWD_Q_CONFIGS, key=_TUNE_KEY, prune_configs_by=_PRUNE)
@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _bwd_q_kernel(Q, K, V, O, DO, LSE, DELTA, DQ, qk_scale, sm_scale,
                  stride_qb, stride_qh, stride_qt,
                  stride_kb, stride_kh, stride_kt,
                  stride_vb, stride_vh, stride_vt,
                  stride_dob, stride_doh, stride_dot,
                  stride_ob, stride_oh, stride_ot,
                  stride_dqb, stride_dqh, stride_dqt,
                  n_head, group, seq_q, seq_k,
                  HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
                  HEAVY_FIRST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m, pid_bh = _block_and_head(HEAVY_FIRST, True)
    off_b = (pid_bh // n_head).to(tl.int64)
    off_h = (pid_bh % n_head).to(tl.int64)
    off_kvh = off_h // group

    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < seq_q
    q = tl.load(Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    do_ptrs = DO + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :]
    do = tl.load(do_ptrs, mask=row_ok[:, None], other=0.0)
    lse = tl.load(LSE + pid_bh.to(tl.int64) * seq_q + offs_m, mask=row_ok, other=0.0)
    # delta_i = sum_d dO_id * O_id, the row term of the softmax gradient dS = P * (dP - delta). This program
    # owns rows offs_m, so it computes their delta here and stores it for the dk/dv kernel, launched after
    # it: one launch fewer than a separate pass.
    o_ptrs = O + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :]
    o = tl.load(o_ptrs, mask=row_ok[:, None], other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + pid_bh.to(tl.int64) * seq_q + offs_m, delta, mask=row_ok)
    k_base = K + off_b * stride_kb + off_kvh * stride_kh
    v_base = V + off_b * stride_vb + off_kvh * stride_vh

    causal_shift = seq_k - seq_q
    n_full, hi = _key_range(start_m, seq_q, seq_k, CAUSAL, BLOCK_M, BLOCK_N)

    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    dq = _bwd_q_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, 0, n_full,
                      offs_m, offs_n, offs_d, seq_k, causal_shift, qk_scale,
                      False, CAUSAL, PRECISION, BLOCK_N)
    dq = _bwd_q_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, n_full, hi,
                      offs_m, offs_n, offs_d, seq_k, causal_shift, qk_scale, True, CAUSAL, PRECISION, BLOCK_N)
    dq = dq * sm_scale
    dq_ptrs = DQ + off_b * stride_dqb + off_h * stride_dqh + offs_m[:, None] * stride_dqt + offs_d[None, :]
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])


# ----------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------


def _check_tensor(fn: str, name: str, t, dims: int, layout: str) -> None:
    """A `dims`-D tensor (its axes: `layout`) of a supported dtype; else an error naming it."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != dims:
        raise ValueError(f"{fn}: {name} must be {dims}-D {layout}, got shape {tuple(t.shape)}")
    if t.dtype not in _DTYPES:
        raise TypeError(f"{fn}: {name} must be float16, bfloat16 or float32, got {t.dtype}")


def _check_device(fn: str, subject: str, device: torch.device) -> None:
    """subject: "q, k, v are", "qkv is"."""
    if device.type == "cpu":
        if not _INTERPRET:
            raise RuntimeError(
                f"{fn}: {subject} on the CPU; the Triton kernels need a CUDA device. CPU runs only under "
                "Triton's interpreter: set TRITON_INTERPRET=1 in the environment before importing "
                "fastlm.kernels (slow; meant for tests)")
    elif device.type != "cuda":
        raise ValueError(f"{fn}: expected CUDA tensors (or CPU under TRITON_INTERPRET=1), "
                         f"got device {device}")


def _check_inputs(q, k, v, causal) -> None:
    """Raise a ValueError/TypeError naming the argument, what was expected and what was found."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor("flash_attention", name, t, 4, "(batch, heads, seq, head_dim)")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"flash_attention: q, k, v must have one dtype, got q {q.dtype}, k {k.dtype}, "
                        f"v {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"flash_attention: q, k, v must be on one device, got q {q.device}, k {k.device}, "
                         f"v {v.device}")
    _check_device("flash_attention", "q, k, v are", q.device)
    if k.shape != v.shape:
        raise ValueError(f"flash_attention: k and v must have the same shape, got k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    batch, n_head, seq_q, head_dim = q.shape
    kv_batch, n_kv_head, seq_k, kv_head_dim = k.shape
    if kv_batch != batch:
        raise ValueError(f"flash_attention: k/v batch must equal q batch {batch}, got {kv_batch}")
    if kv_head_dim != head_dim:
        raise ValueError(f"flash_attention: k/v head_dim must equal q head_dim {head_dim}, got {kv_head_dim}")
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"flash_attention: head_dim must be one of {SUPPORTED_HEAD_DIMS}, got {head_dim}")
    if n_kv_head == 0 or n_head % n_kv_head != 0:
        raise ValueError(f"flash_attention: n_head (q.shape[1] = {n_head}) must be a multiple of n_kv_head "
                         f"(k.shape[1] = {n_kv_head})")
    if seq_q == 0 or seq_k == 0 or batch == 0 or n_head == 0:
        raise ValueError(f"flash_attention: empty input, q {tuple(q.shape)}, k {tuple(k.shape)}")
    if causal and seq_q > seq_k:
        raise ValueError(f"flash_attention: causal attention needs seq_q <= seq_k (the mask is aligned "
                         f"bottom-right), got seq_q {seq_q} > seq_k {seq_k}")


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    # The kernels take the batch/head/seq strides and assume unit stride along head_dim.
    return t if t.stride(-1) == 1 else t.contiguous()


def _bhs_strides(t: torch.Tensor):
    return t.stride()[:3]


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs: IEEE matmuls, else Triton's default TF32 would give ~1e-3 relative error.
    return "ieee" if dtype == torch.float32 else "tf32"


class _Tuned:
    """An autotuned kernel that goes through triton.autotune once per key and is then launched with the
    chosen config directly. Triton's Autotuner.run re-derives its key from every argument on every call
    (~35 us of Python per launch under cProfile on an H200 host); here a lookup in a dict replaces it, and
    the launch itself skips Triton's per-call path once the kernel is compiled (see kernels/launch.py).
    The key holds everything the autotuner's key holds for these kernels: seq lengths, head_dim, causal,
    the program order and the dtype (all tensors share q's; LSE and DELTA are fp32).

    Deterministic runs (torch.use_deterministic_algorithms(True), which fastlm's run.deterministic sets) do
    not autotune: the fastest config of a run depends on timing, and another tiling sums in another order,
    so two runs (an interrupted one and its resume) could differ in the last bits. They take the config
    with the smallest tiles instead, a rule, chosen once: it fits wherever any of the list does.

    When dynamo traces the launches themselves (`_FlashAttention` under torch.compile; the public function
    uses the custom ops below there instead), the kernels are called the way dynamo understands, Triton's
    own launch, so that it captures them as user-defined Triton kernels: the autotuned kernel (inductor tunes
    and launches it), or the fixed config in deterministic runs."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.chosen: dict[tuple, dict] = {}
        smallest = min(kernel.configs,
                       key=lambda c: (c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"], c.num_stages))
        # (the tile sizes and launch options only: torch.compile refuses a num_ctas argument)
        self.fixed = dict(smallest.kwargs, num_warps=smallest.num_warps, num_stages=smallest.num_stages)
        self.launch = CachedLauncher(kernel.fn, direct=not _INTERPRET)

    def __call__(self, key: tuple, grid, *args, recording: Recording | None = None, **constexprs):
        compiling = torch.compiler.is_compiling()
        if torch.are_deterministic_algorithms_enabled():
            options = self.fixed
            if compiling:
                self.kernel.fn[grid](*args, **constexprs, **options)
                options = None
        elif compiling:
            self.kernel[grid](*args, **constexprs)
            options = None
        else:
            options = self.chosen.get(key)
            if options is None:
                self.kernel[grid](*args, **constexprs)
                self.chosen[key] = self.kernel.best_config.all_kwargs()
        if options is not None:
            self.launch(grid, args, {**constexprs, **options}, recording)
        elif recording is not None:
            recording.missed()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)  # triton.cdiv is a constexpr_function: ~3 us per host call


def _grid(blocks: int, heads: int, heavy_first: bool) -> tuple[int, int]:
    # see HEAVY_FIRST; the kernels map program ids back with _block_and_head
    return (heads, blocks) if heavy_first else (blocks, heads)


# A CUDA grid's second axis holds at most 65,535 programs: batch x heads beyond that go on the first axis.
_MAX_GRID_Y = 65535


def _heavy_first(causal: bool, batch_heads: int) -> bool:
    """The program order of a call: HEAVY_FIRST for causal calls; without a causal mask every block does
    the same work and the plain (blocks, heads) order keeps a head's programs together (its keys and values
    stay hot in L2), unless batch x heads would overflow that grid's second axis."""
    return (HEAVY_FIRST and causal) or batch_heads > _MAX_GRID_Y


_FWD = _Tuned(_fwd_kernel)
_BWD_Q = _Tuned(_bwd_q_kernel)
_BWD_KV = _Tuned(_bwd_kv_kernel)
# the same kernel with ATOMIC_DQ, tuned over its own list (the fifth matmul changes what fits)
# reset_to_zero: the autotuner runs every config many times to time it, and each run adds its dq into the
# accumulator; it zeroes DQ around those runs, so that the launch after them adds to zeros, as the prep
# pass left it. (The other kernels overwrite their outputs: repeated runs leave the same values.)
_BWD_KV_ATOMIC = _Tuned(triton.autotune(configs=_BWD_KV_ATOMIC_CONFIGS, key=_TUNE_KEY,
                                        prune_configs_by=_PRUNE, reset_to_zero=["DQ"])(_bwd_kv_kernel.fn))
# and with DQ_BULK ("bulk"): the same tilings (the staging tile in shared memory is what it adds)
_BWD_KV_BULK = _Tuned(triton.autotune(configs=_BWD_KV_ATOMIC_CONFIGS, key=_TUNE_KEY,
                                      prune_configs_by=_PRUNE, reset_to_zero=["DQ"])(_bwd_kv_kernel.fn))
# memory-bound passes of atomic dq: fixed tilings
_PREP = CachedLauncher(_bwd_prep_kernel, direct=not _INTERPRET)
_PREP_BLOCK_M = 64
_SCALE_CAST = CachedLauncher(_scale_cast_kernel, direct=not _INTERPRET)
_SCALE_CAST_ROWS = 32  # rows of head_dim values per program (2,048 values at head_dim 64)
# "auto": the mode chosen per tuning key, and the milliseconds per backward each mode took there
DQ_CHOSEN: dict[tuple, str] = {}
DQ_TIMES: dict[tuple, dict[str, float]] = {}

# Launch plans (kernels/launch.py). Once a forward (a backward) has launched all its kernels directly,
# later calls with the same plan key replay those launches with their own tensors: one call of each
# kernel's launcher, where the path above derives grids, strides, tuning keys, options and launch
# signatures again on every call. A plan key holds everything that path reads: the shapes, strides and
# dtypes of the tensors passed in (the outputs are allocated from them), the data's 16-byte alignment,
# causal, the softmax scale, the program order (`_heavy_first`), deterministic mode (fixed tilings) and,
# for a backward, its dq mode. The tilings autotuning chose never change once chosen (a test that makes a
# kernel tune again empties _PLANS too).
class _Plans(dict):
    """The plans by key; emptying it also empties the C++ host path's copies of them (below)."""

    def clear(self) -> None:
        super().clear()
        if _HOST is not None:
            _HOST.forget()


_PLANS: dict[tuple, LaunchPlan] = _Plans()
MAX_PLANS = 512  # (as launch.MAX_SIGNATURES: varying shapes would grow the dict forever)
_LAST_PLAN: list = [None]  # (plan, tensors) of the last _planned call, see there


def _planned(key: tuple | None, tensors: tuple, launch) -> None:
    """Replay the plan of `key` with `tensors`; else call launch(recording) (recording None without a key:
    no plan applies) and keep the plan it recorded, if its launches were all direct. _LAST_PLAN[0] says
    which plan the call's launches were, with the call's tensors (None where they were no plan's)."""
    _LAST_PLAN[0] = None
    if key is None:
        launch(None)
        return
    plan = _PLANS.get(key)
    if plan is not None and plan(tensors):
        _LAST_PLAN[0] = (plan, tensors)
        return
    recording = Recording(tensors)
    launch(recording)
    plan = recording.plan()
    if plan is not None:
        if len(_PLANS) >= MAX_PLANS:
            _PLANS.clear()
        _PLANS[key] = plan
        _LAST_PLAN[0] = (plan, tensors)


def forget_launches() -> None:
    """Drop the kept direct launches and the plans made of them (the C++ host path's included); the next
    calls go through Triton once and keep them again (after a change of how a kept launch is made:
    launch.RAW_LAUNCH)."""
    _PLANS.clear()
    for launcher in (_FWD.launch, _BWD_Q.launch, _BWD_KV.launch, _BWD_KV_ATOMIC.launch, _BWD_KV_BULK.launch,
                     _PREP, _SCALE_CAST):
        launcher.kernels.clear()


def _plans_apply() -> bool:
    # where launches are direct: not under the interpreter, nor while dynamo traces them
    return _FWD.launch.direct and not torch.compiler.is_compiling()


def _layout(*tensors) -> tuple:
    return tuple((t.shape, t.stride(), t.dtype) for t in tensors)


def _new_outputs(q):
    """The forward's outputs, unwritten: o (batch, n_head, seq_q, head_dim) stored as (batch, seq_q, n_head,
    head_dim), as SDPA's output (merging the heads back into (batch, seq_q, n_head * head_dim), what a
    transformer does next, is then a view, not a copy), and the fp32 lse (batch, n_head, seq_q). Shared
    with the custom op's fake implementation, which must give the same layouts."""
    batch, n_head, seq_q, head_dim = q.shape
    return (q.new_empty_strided(q.shape, (seq_q * n_head * head_dim, head_dim, n_head * head_dim, 1)),
            q.new_empty((batch, n_head, seq_q), dtype=torch.float32))


def _new_grads(q, k, v):
    """dq, dk, dv, unwritten: dense tensors of q's, k's and v's shapes whose axes lie in memory in the
    order of their input's (torch.empty_like: exactly its strides where it is dense). In a transformer q, k
    and v are (batch, seq, heads, head_dim) views of one projection, and the gradient of that projection
    concatenates dq, dk and dv along its last axis: from grads stored (batch, seq, heads, head_dim) that is
    a copy of whole rows, from (batch, heads, seq, head_dim) ones a transpose. A leaf's gradient gets its
    layout, which autograd then keeps without a copy. Shared with the custom op's fake implementation."""
    return tuple(torch.empty_like(t) for t in (q, k, v))


def _split_qkv(qkv: torch.Tensor, n_head: int, n_kv_head: int):
    """q (batch, n_head, seq, head_dim), k and v (batch, n_kv_head, seq, head_dim): views of a packed
    (batch, seq, (n_head + 2 * n_kv_head) * head_dim) tensor whose last axis holds q's heads, then k's, then
    v's, as a fused projection writes them."""
    batch, seq, width = qkv.shape
    head_dim = width // (n_head + 2 * n_kv_head)
    stride_b, stride_t, stride_w = qkv.stride()
    strides = (stride_b, head_dim * stride_w, stride_t, stride_w)
    start, head = qkv.storage_offset(), head_dim * stride_w
    kv_shape = (batch, n_kv_head, seq, head_dim)
    # (one as_strided a view: a quarter of the host time of view, split and three transposes; each call of
    # an op on the packed projection takes these views, the backward twice)
    return (qkv.as_strided((batch, n_head, seq, head_dim), strides, start),
            qkv.as_strided(kv_shape, strides, start + n_head * head),
            qkv.as_strided(kv_shape, strides, start + (n_head + n_kv_head) * head))


def _new_packed_grad(qkv: torch.Tensor) -> torch.Tensor:
    """The gradient of a packed qkv, unwritten: dense, qkv's shape; dq, dk and dv are written into its
    _split_qkv views. The projection that made qkv reads it as it is: no concatenation of three gradients,
    which is what autograd does for a split. Shared with the custom op's fake implementation."""
    return qkv.new_empty(qkv.shape)


def _forward(q, k, v, causal: bool, sm_scale: float):
    o, lse = _new_outputs(q)
    tensors = (q, k, v, o, lse)
    plan_key = (("forward", _layout(q, k, v), aligned(tensors), causal, sm_scale,
                 _heavy_first(causal, q.shape[0] * q.shape[1]), torch.are_deterministic_algorithms_enabled())
                if _plans_apply() else None)
    _planned(plan_key, tensors,
             lambda recording: _launch_forward(q, k, v, o, lse, causal, sm_scale, recording))
    return o, lse


def _check_row_offsets(**tensors: torch.Tensor | None) -> None:
    """The kernels add a batch's and a head's offset in 64 bits, and a row's within a head (row x row stride)
    in 32: int32 products are the fast ones, and every shape a model of fastlm's size trains at keeps them
    far below 2**31 (gpt124m's packed projection, 2,304 values a row, reaches it at ~930K tokens). Past
    that they would wrap around and read or write another head's memory: refused, naming the tensor. Run
    where a launch is planned (plan keys hold the layouts: a replayed plan's were checked). None: skipped."""
    for name, t in tensors.items():
        if t is None:
            continue
        seq, head_dim = t.shape[2], t.shape[3]
        reach = (seq - 1) * t.stride(2) + (head_dim - 1) * t.stride(3)
        if reach >= 2**31:
            raise ValueError(
                f"flash_attention: {name}'s rows reach element {reach:,} of a head ({seq:,} rows x row "
                f"stride {t.stride(2):,}), past the kernels' 32-bit offsets within a head (2**31 - 1 = "
                f"2,147,483,647); split the sequence, or lay {name} out with a smaller row stride")


def _launch_forward(q, k, v, o, lse, causal: bool, sm_scale: float, recording: Recording | None) -> None:
    _check_row_offsets(q=q, k=k, v=v, o=o)
    batch, n_head, seq_q, head_dim = q.shape
    n_kv_head, seq_k = k.shape[1], k.shape[2]
    heavy_first = _heavy_first(causal, batch * n_head)

    def grid(meta):
        return _grid(_cdiv(seq_q, meta["BLOCK_M"]), batch * n_head, heavy_first)

    _FWD((seq_q, seq_k, head_dim, causal, q.dtype, heavy_first), grid,
         q, k, v, o, lse, sm_scale * _LOG2E,
         *_bhs_strides(q), *_bhs_strides(k), *_bhs_strides(v), *_bhs_strides(o),
         n_head, n_head // n_kv_head, seq_q, seq_k, recording=recording,
         HEAD_DIM=head_dim, CAUSAL=causal, PRECISION=_precision(q.dtype), HEAVY_FIRST=heavy_first)


def _dq_mode(key: tuple, device: torch.device) -> str | None:
    """The BWD_DQ mode of this backward, or None when "auto" has yet to time the two on this key."""
    if torch.are_deterministic_algorithms_enabled():
        return "separate"
    if BWD_DQ != "auto":
        if BWD_DQ not in _DQ_MODES:
            raise ValueError(f"flash_attention: BWD_DQ must be 'auto' or one of {_DQ_MODES}, got {BWD_DQ!r}")
        return BWD_DQ
    chosen = DQ_CHOSEN.get(key)
    if chosen is None and (device.type != "cuda" or torch.compiler.is_compiling()
                           or torch.cuda.is_current_stream_capturing()):
        return "separate"
    return chosen


def _timing_event():
    return torch.cuda.Event(enable_timing=True)


def _has_tma(device: torch.device) -> bool:
    # the bulk tensor reductions of BWD_DQ "bulk" (elsewhere Triton lowers them to plain atomics)
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def _scratch(size: int, alignment: int, stream) -> torch.Tensor:
    return torch.empty(size, dtype=torch.int8, device="cuda")  # (the caching allocator aligns to 512 B)


def _scratch_allocator() -> None:
    """A kernel that makes a tensor descriptor on the device (BWD_DQ "bulk") writes it to global scratch
    memory, which Triton's launcher asks triton.set_allocator's allocator for at each launch. That setting
    is a context variable: it holds in the thread that set it, and a backward on a CUDA tensor runs on
    autograd's device thread. So it is set here, in the thread about to launch, unless set already (by the
    user, or here before); torch's caching allocator serves it."""
    if _allocation._allocator.get() is _allocation._NULL_ALLOCATOR:
        triton.set_allocator(_scratch)


# How far atomic dq may be from the dq kernel's before "auto" refuses it: the two differ in the order of
# fp32 sums (a few units in the last place of the output dtype); this catches gross faults only (a
# miscompiled kernel on some GPU, a lost reset of the accumulator), relative to dq's largest value.
DQ_AGREEMENT = 0.05


def _dq_agrees(atomic: torch.Tensor, reference: torch.Tensor, key: tuple) -> bool:
    """Whether atomic dq matches the dq kernel's on the call that times them (warns when it does not)."""
    diff = (atomic.float() - reference.float()).abs().max()
    scale = reference.float().abs().max()
    if bool(diff <= DQ_AGREEMENT * scale + torch.finfo(reference.dtype).tiny):  # NaN compares False
        return True
    warnings.warn(f"flash_attention: dq added atomically differs from the dq kernel's by {diff.item():.3g} "
                  f"(largest |dq| {scale.item():.3g}) for (seq_q, seq_k, head_dim, causal, dtype, "
                  f"heavy_first) = {key} on this GPU; the dq kernel is used", RuntimeWarning, stacklevel=3)
    return False


def backward_key(q_shape, seq_k: int, causal: bool, dtype: torch.dtype) -> tuple:
    """The key a backward's choices are kept under (DQ_CHOSEN, DQ_TIMES, the tilings): (seq_q, seq_k,
    head_dim, causal, dtype, heavy_first) for q of shape (batch, heads, seq_q, head_dim)."""
    batch, n_head, seq_q, head_dim = q_shape
    # (k, v have as many heads or fewer: the program order depends on q's)
    return (seq_q, seq_k, head_dim, causal, dtype, _heavy_first(causal, batch * n_head))


def _backward(do, q, k, v, o, lse, causal: bool, sm_scale: float, qkv: torch.Tensor | None = None):
    """dq, dk, dv, with dq computed as BWD_DQ says (on its first use, "auto" times both ways here). With
    `qkv`, the packed input q, k and v are views of (flash_attention_qkv), the gradients are written into
    one tensor of its shape and that tensor is returned instead."""
    key = backward_key(q.shape, k.shape[2], causal, q.dtype)
    args = (do, q, k, v, o, lse, causal, sm_scale, key, qkv)
    mode = _dq_mode(key, q.device)
    if mode is not None:
        return _backward_with(mode, *args)[0]
    times = {}
    for mode in AUTO_DQ_MODES:
        if mode == "bulk" and not _has_tma(q.device):
            continue
        try:
            grads, dq = _backward_with(mode, *args)  # tunes and compiles this mode's kernels
        except (OutOfResources, PTXASError):
            # e.g. no atomic tiling fits a GPU with less shared memory per block (99 KB on an RTX 4090 at
            # head_dim 128): that mode is out for this shape; "separate" (timed first) stays
            if mode == "separate":
                raise
            continue
        if mode == "separate":
            kernel_grads, kernel_dq = grads, dq
        elif not _dq_agrees(dq, kernel_dq, key):
            grads = kernel_grads
            continue
        start, end = _timing_event(), _timing_event()
        start.record()
        for _ in range(DQ_TIMING_REPS):
            _backward_with(mode, *args)
        end.record()
        end.synchronize()
        times[mode] = start.elapsed_time(end) / DQ_TIMING_REPS
    DQ_TIMES[key] = times
    DQ_CHOSEN[key] = min(times, key=times.get)
    return grads  # the last mode that ran (either mode's gradients are right)


def _backward_with(mode: str, do, q, k, v, o, lse, causal: bool, sm_scale: float, key: tuple,
                   qkv: torch.Tensor | None):
    """(the gradients _backward returns, dq): new tensors on every call, the timed calls' included."""
    delta = torch.empty_like(lse)
    if qkv is None:
        dq, dk, dv = grads = _new_grads(q, k, v)
    else:
        grads = _new_packed_grad(qkv)
        dq, dk, dv = _split_qkv(grads, q.shape[1], k.shape[1])
    # atomic dq: fp32 inputs accumulate in dq itself; else (and always in bulk mode, whose descriptor needs
    # rows at 16-byte strides) in a dense fp32 buffer whose axes lie in memory in q's order (the last pass
    # scales and rounds it into dq, each through its own strides)
    acc = None
    if mode == "atomic" and q.dtype == torch.float32:
        acc = dq
    elif mode != "separate":
        acc = torch.empty_like(q, dtype=torch.float32)
    if mode == "bulk":
        _scratch_allocator()
    # (fp32's accumulator is dq itself: each tensor once, or the recording could make no plan)
    tensors = (q, k, v, o, do, lse, delta, dq, dk, dv) + ((acc,) if acc is not None and acc is not dq else ())
    # (the gradients' layout follows from the inputs' and whether they are packed)
    plan_key = (("backward", mode, key, _layout(q, k, v, o, lse, do), qkv is None, aligned(tensors),
                 sm_scale, torch.are_deterministic_algorithms_enabled()) if _plans_apply() else None)
    _planned(plan_key, tensors, lambda recording: _launch_backward(
        mode, do, q, k, v, o, lse, delta, dq, dk, dv, acc, causal, sm_scale, key, recording))
    return grads, dq


def _launch_backward(mode: str, do, q, k, v, o, lse, delta, dq, dk, dv, acc, causal: bool, sm_scale: float,
                     key: tuple, recording: Recording | None) -> None:
    _check_row_offsets(q=q, k=k, v=v, o=o, do=do, dq=dq, dk=dk, dv=dv, acc=acc)
    batch, n_head, seq_q, head_dim = q.shape
    n_kv_head, seq_k = k.shape[1], k.shape[2]
    heavy_first = key[-1]
    group = n_head // n_kv_head
    precision = _precision(q.dtype)
    strides = (*_bhs_strides(q), *_bhs_strides(k), *_bhs_strides(v), *_bhs_strides(do))  # both kernels'
    # the gradients' strides; atomic dq is summed into its fp32 accumulator (acc, its own strides)
    dq_strides = _bhs_strides(dq)
    sum_strides = dq_strides if acc is None else _bhs_strides(acc)
    grad_strides = (*_bhs_strides(dk), *_bhs_strides(dv), *sum_strides)  # the dk/dv kernel's

    def kv_grid(meta):
        return _grid(_cdiv(seq_k, meta["BLOCK_N"]), batch * n_kv_head, heavy_first)

    if mode != "separate":
        _PREP((batch * n_head, _cdiv(seq_q, _PREP_BLOCK_M)),
              (o, do, delta, acc, *_bhs_strides(o), *_bhs_strides(do), *sum_strides, n_head, seq_q),
              {"HEAD_DIM": head_dim, "BLOCK_M": _PREP_BLOCK_M, "num_warps": 4}, recording)
        bulk = mode == "bulk"
        (_BWD_KV_BULK if bulk else _BWD_KV_ATOMIC)(
            key, kv_grid, q, k, v, do, lse, delta, dk, dv, acc, sm_scale * _LOG2E, sm_scale, *strides,
            *grad_strides, n_head, n_kv_head, group, seq_q, seq_k, recording=recording,
            HEAD_DIM=head_dim, CAUSAL=causal, PRECISION=precision, HEAVY_FIRST=heavy_first,
            ATOMIC_DQ=True, DQ_BULK=bulk)
        rows = batch * n_head * seq_q
        _SCALE_CAST((_cdiv(rows, _SCALE_CAST_ROWS),),
                    (acc, dq, sm_scale, *sum_strides, *dq_strides, n_head, seq_q, rows),
                    {"HEAD_DIM": head_dim, "BLOCK_R": _SCALE_CAST_ROWS, "num_warps": 4}, recording)
        return

    def q_grid(meta):
        return _grid(_cdiv(seq_q, meta["BLOCK_M"]), batch * n_head, heavy_first)

    # dq first: it also computes delta, which the dk/dv kernel reads
    _BWD_Q(key, q_grid,
           q, k, v, o, do, lse, delta, dq, sm_scale * _LOG2E, sm_scale, *strides, *_bhs_strides(o),
           *dq_strides, n_head, group, seq_q, seq_k, recording=recording,
           HEAD_DIM=head_dim, CAUSAL=causal, PRECISION=precision, HEAVY_FIRST=heavy_first)
    _BWD_KV(key, kv_grid,
            q, k, v, do, lse, delta, dk, dv, dq, sm_scale * _LOG2E, sm_scale, *strides,
            *grad_strides, n_head, n_kv_head, group, seq_q, seq_k, recording=recording,
            HEAD_DIM=head_dim, CAUSAL=causal, PRECISION=precision, HEAVY_FIRST=heavy_first,
            ATOMIC_DQ=False, DQ_BULK=False)


# ----------------------------------------------------------------------------------------------------------
# Autograd and public API
# ----------------------------------------------------------------------------------------------------------


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, sm_scale):
        o, lse = _forward(q, k, v, causal, sm_scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.causal = causal
        ctx.sm_scale = sm_scale
        return o

    @staticmethod
    def backward(ctx, do):
        refuse_create_graph("flash_attention", "torch.nn.functional.scaled_dot_product_attention")
        q, k, v, o, lse = ctx.saved_tensors
        do = _last_dim_contiguous(do)
        dq, dk, dv = _backward(do, q, k, v, o, lse, ctx.causal, ctx.sm_scale)
        return dq, dk, dv, None, None


def _packed_forward(qkv, n_head, n_kv_head, causal, sm_scale):
    """(o, lse) of attention over the head views of a packed qkv."""
    return _forward(*_split_qkv(qkv, n_head, n_kv_head), causal, sm_scale)


def _packed_backward(do, qkv, o, lse, n_head, n_kv_head, causal, sm_scale):
    """The gradient of a packed qkv: one tensor of its shape (_backward with qkv)."""
    q, k, v = _split_qkv(qkv, n_head, n_kv_head)
    return _backward(_last_dim_contiguous(do), q, k, v, o, lse, causal, sm_scale, qkv=qkv)


class _FlashAttentionQKV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, n_head, n_kv_head, causal, sm_scale):
        o, lse = _packed_forward(qkv, n_head, n_kv_head, causal, sm_scale)
        ctx.save_for_backward(qkv, o, lse)
        ctx.heads, ctx.causal, ctx.sm_scale = (n_head, n_kv_head), causal, sm_scale
        return o

    @staticmethod
    def backward(ctx, do):
        refuse_create_graph("flash_attention_qkv", "torch.nn.functional.scaled_dot_product_attention")
        qkv, o, lse = ctx.saved_tensors
        return _packed_backward(do, qkv, o, lse, *ctx.heads, ctx.causal, ctx.sm_scale), None, None, None, None


# Under torch.compile the same forward and backward run as two custom ops: opaque to dynamo and inductor
# (fake implementations give the output shapes), so a compiled transformer block stays one graph around
# the attention and its backward, where a torch.compiler.disable'd call would split it into several, each
# with its own guards and wrappers and no fusion across the breaks. The kernels themselves launch eagerly
# inside the ops, through the same autotuned, directly launched path as outside torch.compile.


# Compiled graphs are cached on disk (AOTAutograd, inductor), keyed by what dynamo traces: the forward op's
# name and inputs. The backward op's name and both ops' fake layouts do not enter the key (before
# pytorch/pytorch#185323 the fakes did not at all; pytorch/pytorch#144344), so a cached graph would go on
# calling the old backward op, or reading its outputs with the old layout. The ops' names carry
# _OP_VERSION, raised with any change of a fake's layout or of the backward op: a new forward name makes
# those caches miss.
_OP_VERSION = 2  # 2: dq, dk, dv follow their inputs' layout


# The ops are declared with torch.library's lower-level API rather than torch.library.custom_op, whose
# runtime wrappers (an autograd kernel in Python on both ops, an aliasing check of the outputs) cost more
# host time than the launches themselves: with the kernels stubbed out on a 2-core CPU, a call of the
# backward op (which needs no autograd: nothing differentiates it) went from ~55 to ~28 us and one of the
# forward op from ~42 to ~34 us (benchmarks/test_attention_host_path.py). The forward keeps its autograd
# formula (register_autograd), which AOTAutograd traces into the backward graph.
_LIB = torch.library.Library("fastlm", "FRAGMENT")  # (kept alive with the module: it holds the ops)
_FORWARD_NAME = f"flash_attention_forward_v{_OP_VERSION}"
_BACKWARD_NAME = f"flash_attention_backward_v{_OP_VERSION}"
_LIB.define(f"{_FORWARD_NAME}(Tensor q, Tensor k, Tensor v, bool causal, float sm_scale) -> (Tensor, Tensor)")
_LIB.define(f"{_BACKWARD_NAME}(Tensor do, Tensor q, Tensor k, Tensor v, Tensor o, Tensor lse, bool causal, "
            "float sm_scale) -> (Tensor, Tensor, Tensor)")
# the same for a packed qkv (flash_attention_qkv): its backward returns one gradient, laid out as qkv
_QKV_FORWARD_NAME = f"flash_attention_qkv_forward_v{_OP_VERSION}"
_QKV_BACKWARD_NAME = f"flash_attention_qkv_backward_v{_OP_VERSION}"
_LIB.define(f"{_QKV_FORWARD_NAME}(Tensor qkv, int n_head, int n_kv_head, bool causal, float sm_scale) "
            "-> (Tensor, Tensor)")
_LIB.define(f"{_QKV_BACKWARD_NAME}(Tensor do, Tensor qkv, Tensor o, Tensor lse, int n_head, int n_kv_head, "
            "bool causal, float sm_scale) -> Tensor")


# torch.compiler.disable: a compiled graph calls these at run time, and dynamo must not trace the launches
@torch.compiler.disable
def _forward_impl(q, k, v, causal, sm_scale):
    return _forward(q, k, v, causal, sm_scale)


@torch.compiler.disable
def _backward_impl(do, q, k, v, o, lse, causal, sm_scale):
    return _backward(_last_dim_contiguous(do), q, k, v, o, lse, causal, sm_scale)


_qkv_forward_impl = torch.compiler.disable(_packed_forward)
_qkv_backward_impl = torch.compiler.disable(_packed_backward)


for _device in ("CUDA", "CPU"):  # (CPU tensors pass the device check only under Triton's interpreter)
    _LIB.impl(_FORWARD_NAME, _forward_impl, _device)
    _LIB.impl(_BACKWARD_NAME, _backward_impl, _device)
    _LIB.impl(_QKV_FORWARD_NAME, _qkv_forward_impl, _device)
    _LIB.impl(_QKV_BACKWARD_NAME, _qkv_backward_impl, _device)
_forward_op = getattr(torch.ops.fastlm, _FORWARD_NAME).default
_backward_op = getattr(torch.ops.fastlm, _BACKWARD_NAME).default
_qkv_forward_op = getattr(torch.ops.fastlm, _QKV_FORWARD_NAME).default
_qkv_backward_op = getattr(torch.ops.fastlm, _QKV_BACKWARD_NAME).default


# The fakes must give the real outputs' layouts (tests: opcheck), and a change of layout raises _OP_VERSION.
@torch.library.register_fake(f"fastlm::{_FORWARD_NAME}", lib=_LIB)
def _forward_fake(q, k, v, causal, sm_scale):
    return _new_outputs(q)


@torch.library.register_fake(f"fastlm::{_BACKWARD_NAME}", lib=_LIB)
def _backward_fake(do, q, k, v, o, lse, causal, sm_scale):
    return _new_grads(q, k, v)


def _setup_context(ctx, inputs, output):
    q, k, v, causal, sm_scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.causal, ctx.sm_scale = causal, sm_scale
    ctx.mark_non_differentiable(lse)


def _backward_rule(ctx, do, _dlse):
    q, k, v, o, lse = ctx.saved_tensors
    dq, dk, dv = _backward_op(do, q, k, v, o, lse, ctx.causal, ctx.sm_scale)
    return dq, dk, dv, None, None


torch.library.register_autograd(f"fastlm::{_FORWARD_NAME}", _backward_rule, setup_context=_setup_context,
                                lib=_LIB)


@torch.library.register_fake(f"fastlm::{_QKV_FORWARD_NAME}", lib=_LIB)
def _qkv_forward_fake(qkv, n_head, n_kv_head, causal, sm_scale):
    return _new_outputs(_split_qkv(qkv, n_head, n_kv_head)[0])


@torch.library.register_fake(f"fastlm::{_QKV_BACKWARD_NAME}", lib=_LIB)
def _qkv_backward_fake(do, qkv, o, lse, n_head, n_kv_head, causal, sm_scale):
    return _new_packed_grad(qkv)


def _qkv_setup_context(ctx, inputs, output):
    qkv, n_head, n_kv_head, causal, sm_scale = inputs
    o, lse = output
    ctx.save_for_backward(qkv, o, lse)
    ctx.heads, ctx.causal, ctx.sm_scale = (n_head, n_kv_head), causal, sm_scale
    ctx.mark_non_differentiable(lse)


def _qkv_backward_rule(ctx, do, _dlse):
    qkv, o, lse = ctx.saved_tensors
    return _qkv_backward_op(do, qkv, o, lse, *ctx.heads, ctx.causal, ctx.sm_scale), None, None, None, None


torch.library.register_autograd(f"fastlm::{_QKV_FORWARD_NAME}", _qkv_backward_rule,
                                setup_context=_qkv_setup_context, lib=_LIB)


# The eager host path in C++ (kernels/attention_host.cpp, built as fastlm._attention_host where the
# environment had torch at install time): an autograd node, allocations, plan keys and plan replays without
# Python, for eager calls on CUDA tensors. A call it has no plan for runs the Python path above once
# (the callbacks below) and hands it the plan that call made. Off until a GPU has measured it
# (benchmarks/test_attention_host_path.py, benchmarks/test_attention_speed.py).
HOST_PATH = False
_HOST_ON_CPU = False  # (tests: CPU tensors through the host path, with stand-in launchers)
try:
    from fastlm import _attention_host as _HOST
except ImportError:  # not built (no torch at install time), or built against another torch
    _HOST = None


def _host_spec() -> tuple | None:
    """What the C++ path keeps of the plan the last call ran: (tensors, own_acc, launches), each launch
    (launcher, the arguments between stream and tensors, grid, tensor slots, the arguments after them);
    None where that call's launches were no plan's, not all given addresses (launch.kernel_launcher), or
    any of its tensors not 16-byte aligned (the C++ path serves aligned calls only)."""
    last = _LAST_PLAN[0]
    if last is None:
        return None
    plan, tensors = last
    if not all(aligned(tensors)):
        return None
    launches = []
    for (launch, head, addresses), function, metadata, grid, slots, scalars in plan.launches:
        if not addresses:
            return None
        launches.append((launch, (function, *head, metadata, None, None, None), grid, slots, scalars))
    # (a backward with atomic dq in bf16/fp16 has an fp32 accumulator as its eleventh tensor)
    return tensors, len(tensors) == 11, tuple(launches)


def _host_forward(q, k, v, causal, sm_scale):
    o, lse = _forward(q, k, v, causal, sm_scale)
    return o, lse, _host_spec()


def _settled(q_shape, seq_k, causal, dtype, device) -> bool:
    # whether a backward of this key runs one way: "auto" has timed its dq modes (else it runs several)
    return _dq_mode(backward_key(q_shape, seq_k, causal, dtype), device) is not None


def _host_backward(do, q, k, v, o, lse, causal, sm_scale):
    settled = _settled(q.shape, k.shape[2], causal, q.dtype, q.device)
    dq, dk, dv = _backward(do, q, k, v, o, lse, causal, sm_scale)
    return dq, dk, dv, _host_spec() if settled else None


def _host_packed_forward(qkv, n_head, n_kv_head, causal, sm_scale):
    o, lse = _packed_forward(qkv, n_head, n_kv_head, causal, sm_scale)
    return o, lse, _host_spec()


def _host_packed_backward(do, qkv, o, lse, n_head, n_kv_head, causal, sm_scale):
    settled = _settled(o.shape, o.shape[2], causal, qkv.dtype, qkv.device)
    grad = _packed_backward(do, qkv, o, lse, n_head, n_kv_head, causal, sm_scale)
    return grad, _host_spec() if settled else None


_KERNEL_FNS = (_fwd_kernel.fn, _bwd_q_kernel.fn, _bwd_kv_kernel.fn, _bwd_prep_kernel, _scale_cast_kernel)
if _HOST is not None:
    _HOST.install(_host_forward, _host_backward, _host_packed_forward, _host_packed_backward,
                  lambda: direct_launches_allowed(*_KERNEL_FNS))


def _host_applies(t: torch.Tensor) -> bool:
    return HOST_PATH and _HOST is not None and (t.is_cuda or _HOST_ON_CPU)


def _knobs() -> int:
    """The module settings a plan depends on beyond its call (part of the C++ path's plan keys)."""
    return hash((HEAVY_FIRST, BWD_DQ, _MAX_GRID_Y, launch_module.RAW_LAUNCH))


def _causal(causal, fn: str) -> bool:
    if not isinstance(causal, bool):  # ("no" would be truthy: causal attention, silently)
        raise TypeError(f"{fn}: causal must be True or False, got {causal!r}")
    return causal


def _scale(softmax_scale, head_dim: int, fn: str) -> float:
    if softmax_scale is None:
        return 1.0 / math.sqrt(head_dim)
    if (isinstance(softmax_scale, bool) or not isinstance(softmax_scale, numbers.Real)
            or not 0 < softmax_scale < math.inf):
        # the forward scales each row's max instead of every score, which needs a positive scale
        raise ValueError(f"{fn}: softmax_scale must be a positive finite number (or None for "
                         f"1/sqrt(head_dim)), got {softmax_scale!r}")
    return float(softmax_scale)


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                    softmax_scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * softmax_scale [+ causal mask]) v with FlashAttention-2 tiling; differentiable.

    q: (batch, n_head, seq_q, head_dim); k, v: (batch, n_kv_head, seq_k, head_dim), n_head % n_kv_head == 0.
    softmax_scale defaults to 1/sqrt(head_dim). Returns (batch, n_head, seq_q, head_dim) in q's dtype, stored
    as (batch, seq_q, n_head, head_dim) (heads merge back without a copy).
    """
    if HOST_PATH and _HOST is not None and not torch.compiler.is_compiling():
        # The C++ path serves a call whose plan key it has a plan for without the checks below: each is a
        # function of that key (layouts, dtypes, q's device, causal, scale), and the call that made the plan
        # passed them. Any other call answers None and is checked here (kernels/attention_host.cpp).
        out = _HOST.planned_attention(q, k, v, causal, softmax_scale, _knobs(), _HOST_ON_CPU)
        if out is not None:
            return out
    _check_inputs(q, k, v, causal)
    causal = _causal(causal, "flash_attention")
    softmax_scale = _scale(softmax_scale, q.shape[-1], "flash_attention")
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    if torch.compiler.is_compiling():
        return _forward_op(q, k, v, causal, softmax_scale)[0]
    if _host_applies(q):
        return _HOST.attention(q, k, v, causal, softmax_scale, _knobs())
    return _FlashAttention.apply(q, k, v, causal, softmax_scale)  # less host time per call


def flash_attention_qkv(qkv: torch.Tensor, n_head: int, n_kv_head: int | None = None, causal: bool = True,
                        softmax_scale: float | None = None) -> torch.Tensor:
    """flash_attention of q, k, v packed in one tensor, as a transformer's fused projection makes them.

    qkv: (batch, seq, (n_head + 2 * n_kv_head) * head_dim), its last axis holding q's heads, then k's, then
    v's (n_kv_head defaults to n_head). Returns what flash_attention(q, k, v) returns, (batch, n_head, seq,
    head_dim). The difference is in the backward: dq, dk and dv are written into one gradient of qkv's
    shape, which the projection's backward reads as it is, where attention over the three views of a split
    gets three gradients that autograd concatenates (a copy of the whole projection output per layer).
    """
    fn = "flash_attention_qkv"
    if HOST_PATH and _HOST is not None and not torch.compiler.is_compiling():  # (as flash_attention's)
        out = _HOST.planned_attention_qkv(qkv, n_head, n_kv_head, causal, softmax_scale, _knobs(),
                                          _HOST_ON_CPU)
        if out is not None:
            return out
    _check_tensor(fn, "qkv", qkv, 3, "(batch, seq, (n_head + 2 * n_kv_head) * head_dim)")
    _check_device(fn, "qkv is", qkv.device)
    if n_kv_head is None:
        n_kv_head = n_head
    for name, n in (("n_head", n_head), ("n_kv_head", n_kv_head)):
        if isinstance(n, bool) or not (isinstance(n, numbers.Integral) and n > 0):
            raise ValueError(f"{fn}: {name} must be a positive int, got {n!r}")
    heads = n_head + 2 * n_kv_head
    batch, seq, width = qkv.shape
    if width % heads:
        raise ValueError(f"{fn}: qkv's last axis ({width}) must hold n_head + 2 * n_kv_head = {heads} heads "
                         f"of one head_dim; it is not a multiple of {heads}")
    head_dim = width // heads
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"{fn}: head_dim must be one of {SUPPORTED_HEAD_DIMS}, got {head_dim} "
                         f"(qkv's last axis {width} / {heads} heads)")
    if n_head % n_kv_head:
        raise ValueError(f"{fn}: n_head ({n_head}) must be a multiple of n_kv_head ({n_kv_head})")
    if batch == 0 or seq == 0:
        raise ValueError(f"{fn}: empty input, qkv {tuple(qkv.shape)}")
    softmax_scale = _scale(softmax_scale, head_dim, fn)
    qkv = qkv.contiguous()  # (a projection's output already is; the kernels need a unit last stride)
    args = (qkv, int(n_head), int(n_kv_head), _causal(causal, fn), softmax_scale)
    if torch.compiler.is_compiling():
        return _qkv_forward_op(*args)[0]
    if _host_applies(qkv):
        return _HOST.attention_qkv(*args, _knobs())
    return _FlashAttentionQKV.apply(*args)


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                        softmax_scale: float | None = None) -> torch.Tensor:
    """Plain attention in fp32 (GQA by repeating kv heads, bottom-right causal mask); returns q's dtype."""
    n_head, seq_q, head_dim = q.shape[1], q.shape[2], q.shape[3]
    n_kv_head, seq_k = k.shape[1], k.shape[2]
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(head_dim)
    group = n_head // n_kv_head
    qf = q.float()
    kf = k.float().repeat_interleave(group, dim=1)  # (B, n_head, seq_k, hd)
    vf = v.float().repeat_interleave(group, dim=1)
    scores = (qf @ kf.transpose(-2, -1)) * softmax_scale  # (B, n_head, seq_q, seq_k)
    if causal:
        rows = torch.arange(seq_q, device=q.device)[:, None]
        cols = torch.arange(seq_k, device=q.device)[None, :]
        scores = scores.masked_fill(cols > rows + (seq_k - seq_q), float("-inf"))
    return (torch.softmax(scores, dim=-1) @ vf).to(q.dtype)
