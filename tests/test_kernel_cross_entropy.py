"""Cross-entropy and fused linear cross-entropy kernels against torch.

Without a GPU the Triton kernels run on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1, set
before fastlm.kernels is imported). Rows are few to keep this file fast; vocabularies are real (50257,
65,600 > 64K, neither a power of two) plus small odd ones, so the kernels' vocabulary loops see one and
several blocks with a ragged last one.

Accuracy rule (the project's, after flash-attention's): against a float64 reference on the same input
values, the kernel's error is at most ACCURACY_FACTOR x the error of torch's own computation at the
input's precision, plus a small floor.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

if not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")  # chosen when a kernel is defined: before the import

from fastlm.kernels import cross_entropy, fused_linear_cross_entropy  # noqa: E402
from fastlm.kernels.cross_entropy import INTERPRETED, cross_entropy_forward  # noqa: E402
from fastlm.kernels.fused_linear_cross_entropy import default_chunk_rows  # noqa: E402
from conftest import assert_lowers_to_sm90  # noqa: E402

DEVICE = "cpu" if INTERPRETED or not torch.cuda.is_available() else "cuda"
# Triton 3.6's interpreter turns 1-element arrays into Python ints in a way numpy >= 1.25 deprecates.
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")
IGNORE = -100

# Tolerances, written once.
# The project's kernel accuracy rule: at most 2x torch's own error at the same precision (both measured
# against float64). Summation orders differ (blocks of the vocabulary vs torch's), so equal is too strict.
ACCURACY_FACTOR = 2.0
# Added to the bound, relative to the reference's largest magnitude, for the case where torch happens to
# be (nearly) exact: fp32, a few ulps (eps 1.2e-7) of fp32 summation over up to 65K terms; fp16/bf16, about
# one ulp of the dtype, because the stored gradient is rounded once to it (eps 9.8e-4 / 7.8e-3).
FLOOR_REL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}

# (rows, vocab): small odd vocabularies (one block), GPT-2's 50257 (2 blocks of 32K, ragged), 65,600 > 64K
# (3 blocks, the last 64 wide).
CE_SHAPES = [(8, 97), (16, 1000), (4, 50257), (3, 65600)]
# (rows, hidden, vocab, chunk_rows): chunk sizes that do not divide the rows, and the default.
FLCE_SHAPES = [(10, 16, 97, 3), (16, 32, 1000, None), (8, 32, 50257, 3), (5, 16, 65600, 2)]
REDUCTIONS = ["mean", "sum", "none"]
DTYPES = [torch.float32, torch.float16]  # bf16 only on a GPU: the interpreter gets some bf16 ops wrong


def max_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return (x.double() - ref.double()).abs().max().item() if x.numel() else 0.0


def check(name: str, ours: torch.Tensor, torch_same, ref: torch.Tensor, dtype: torch.dtype) -> None:
    """ours within ACCURACY_FACTOR x torch's error (the worst of torch_same: a tensor or several) + floor."""
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    torch_same = torch_same if isinstance(torch_same, (list, tuple)) else [torch_same]
    torch_err = max(max_err(t, ref) for t in torch_same)
    bound = ACCURACY_FACTOR * torch_err + FLOOR_REL[dtype] * ref.abs().max().item()
    err = max_err(ours, ref)
    assert err <= bound, f"{name}: max error {err:.3g} vs float64 > bound {bound:.3g} (torch {torch_err:.3g})"


def make_targets(n: int, vocab: int, gen: torch.Generator, ignore_every: int = 3) -> torch.Tensor:
    targets = torch.randint(0, vocab, (n,), generator=gen)
    targets[1::ignore_every] = IGNORE  # some ignored rows, in every chunk
    return targets.to(DEVICE)


def grad_out_for(loss: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """grad_output other than 1: a scalar for mean/sum, a random vector for "none"."""
    if loss.dim() == 0:
        return torch.tensor(2.5, device=loss.device)
    return torch.randn(loss.shape, generator=gen).to(loss.device)


def leaf(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A fresh leaf copy on DEVICE (to() alone may return t itself)."""
    return t.detach().to(DEVICE, dtype).clone().requires_grad_()


# --------------------------------------------------------------------------------------------------
# cross_entropy


def run_ce_case(n, vocab, reduction, dtype, gen, targets=None, scale=3.0):
    logits = torch.randn(n, vocab, generator=gen) * scale
    targets = make_targets(n, vocab, gen) if targets is None else targets
    ours_x, same_x, ref_x = leaf(logits, dtype), leaf(logits, dtype), leaf(logits.to(dtype), torch.float64)
    ours = cross_entropy(ours_x, targets, ignore_index=IGNORE, reduction=reduction)
    same = F.cross_entropy(same_x, targets, ignore_index=IGNORE, reduction=reduction)
    ref = F.cross_entropy(ref_x, targets, ignore_index=IGNORE, reduction=reduction)
    assert ours.dtype == torch.float32
    go = grad_out_for(ours, gen)
    ours.backward(go)
    same.backward(go.to(same.dtype))
    ref.backward(go.double())
    return ours, same, ref, ours_x.grad, same_x.grad, ref_x.grad, targets


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("n,vocab", CE_SHAPES)
def test_cross_entropy_matches_torch(n, vocab, reduction, dtype):
    gen = torch.Generator().manual_seed(vocab + n)
    ours, same, ref, g_ours, g_same, g_ref, targets = run_ce_case(n, vocab, reduction, dtype, gen)
    check("loss", ours, same, ref, dtype)
    check("grad logits", g_ours, g_same, g_ref, dtype)
    assert g_ours.dtype == dtype
    ignored = targets == IGNORE
    assert (g_ours[ignored] == 0).all(), "ignored rows must get exactly zero gradient"
    if reduction == "none":
        assert (ours[ignored] == 0).all()


@pytest.mark.parametrize("vocab,block", [(1000, 128), (257, 128), (1, 16)])
def test_cross_entropy_several_blocks_per_row(vocab, block):
    # A narrow block makes the vocabulary loop run several times: a ragged last block (1000 = 7*128 + 104),
    # a last block of one column (257 = 2*128 + 1), and a vocabulary of one (loss 0).
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(6, vocab, generator=gen) * 4).to(DEVICE)
    targets = make_targets(6, vocab, gen)
    loss, grad = cross_entropy_forward(logits, targets, IGNORE, "sum", block=block)
    x = logits.double().requires_grad_()
    ref = F.cross_entropy(x, targets, ignore_index=IGNORE, reduction="sum")
    ref.backward()
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-6, atol=0)
    torch.testing.assert_close(grad.double(), x.grad, rtol=0, atol=1e-6)


@pytest.mark.parametrize("layout", ["row_slice", "transposed"])
def test_cross_entropy_strided_logits(layout):
    # A padded vocabulary sliced back (row stride > V, no copy), and a transposed view (copied first).
    gen = torch.Generator().manual_seed(4)
    base = (torch.randn(6, 1024, generator=gen) if layout == "row_slice"
            else torch.randn(1000, 6, generator=gen))
    base = base.to(DEVICE).requires_grad_()
    logits = base[:, :1000] if layout == "row_slice" else base.t()
    targets = make_targets(6, 1000, gen)
    cross_entropy(logits, targets).backward()
    ref_base = base.detach().double().requires_grad_()
    ref_logits = ref_base[:, :1000] if layout == "row_slice" else ref_base.t()
    F.cross_entropy(ref_logits, targets, ignore_index=IGNORE).backward()
    torch.testing.assert_close(base.grad.double(), ref_base.grad, rtol=0, atol=1e-7)


def test_cross_entropy_extreme_logits():
    # Large positive and negative logits: the online max keeps exp() in range.
    logits = torch.tensor([[1e4, -1e4, 0.0, 3.0], [-5e3, -5e3, -5e3, -4e3]], device=DEVICE).requires_grad_()
    targets = torch.tensor([2, 3], device=DEVICE)
    loss = cross_entropy(logits, targets, reduction="none")
    loss.sum().backward()
    x = logits.detach().double().requires_grad_()
    ref = F.cross_entropy(x, targets, reduction="none")
    ref.sum().backward()
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-6, atol=0)
    torch.testing.assert_close(logits.grad.double(), x.grad, rtol=0, atol=1e-6)


def test_cross_entropy_masked_vocabulary_blocks():
    # -inf logits (a masked vocabulary) over a whole block, the row's first and a middle one: their terms
    # are 0, not NaN (exp(-inf - -inf) while the running max is still -inf)
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(3, 40, generator=gen)
    logits[0, :16] = float("-inf")
    logits[1, 16:32] = float("-inf")
    logits[2, 5:] = float("-inf")
    logits = logits.to(DEVICE).requires_grad_()
    targets = torch.tensor([20, 3, 2], device=DEVICE)
    loss, grad = cross_entropy_forward(logits.detach(), targets, IGNORE, "none", block=16)
    x = logits.detach().double().requires_grad_()
    ref = F.cross_entropy(x, targets, reduction="none")
    ref.sum().backward()
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad.double(), x.grad, rtol=0, atol=1e-6)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cross_entropy_all_ignored(reduction):
    # "mean" over no valid rows is 0, not torch's NaN: a fully padded micro-batch must not poison a step.
    logits = torch.randn(5, 300, device=DEVICE, requires_grad=True)
    targets = torch.full((5,), IGNORE, device=DEVICE)
    loss = cross_entropy(logits, targets, reduction=reduction)
    assert torch.equal(loss, torch.zeros_like(loss))
    loss.sum().backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_cross_entropy_other_ignore_index_and_int32_targets():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(7, 257, generator=gen).to(DEVICE).requires_grad_()
    targets = torch.randint(0, 257, (7,), generator=gen).to(DEVICE)
    targets[2] = 5  # ignore_index=5: rows whose target is 5 are ignored
    ours = cross_entropy(logits, targets.to(torch.int32), ignore_index=5)
    ours.backward()
    x = logits.detach().double().requires_grad_()
    ref = F.cross_entropy(x, targets, ignore_index=5)
    ref.backward()
    torch.testing.assert_close(ours.double(), ref.detach(), rtol=1e-6, atol=0)
    torch.testing.assert_close(logits.grad.double(), x.grad, rtol=0, atol=1e-7)


def test_cross_entropy_batched_shape_and_no_grad():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 3, 101, generator=gen).to(DEVICE)  # (B, T, V), no grad: loss only
    targets = torch.randint(0, 101, (2, 3), generator=gen).to(DEVICE)
    loss = cross_entropy(logits, targets, reduction="none")
    assert loss.shape == (2, 3) and not loss.requires_grad
    ref = F.cross_entropy(logits.double().reshape(6, 101), targets.reshape(6), reduction="none").reshape(2, 3)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-6, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(cross_entropy(logits, targets).double(), ref.mean(), rtol=1e-6, atol=0)


def test_no_grad_computes_the_loss_only(monkeypatch):
    """Under no_grad (evaluation) nothing beyond the loss, even for inputs that require grad: autograd's
    needs_input_grad still says yes there. inplace must then leave the logits as they are."""
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(5, 300, generator=gen).to(DEVICE).requires_grad_()
    targets = make_targets(5, 300, gen)
    before = logits.detach().clone()
    with torch.no_grad():
        loss = cross_entropy(logits, targets, inplace=True)
    torch.testing.assert_close(logits.detach(), before, rtol=0, atol=0)
    ref = F.cross_entropy(before.double(), targets, ignore_index=IGNORE)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-6, atol=0)

    flce = sys.modules["fastlm.kernels.fused_linear_cross_entropy"]  # the package exports the function
    calls = []
    real = flce.fused_linear_cross_entropy_forward

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(flce, "fused_linear_cross_entropy_forward", spy)
    hidden = torch.randn(7, 16, generator=gen).to(DEVICE).requires_grad_()
    weight = torch.randn(300, 16, generator=gen).to(DEVICE).requires_grad_()
    targets = make_targets(7, 300, gen)
    for reduction in ("mean", "sum", "none"):
        ref = F.cross_entropy(F.linear(hidden.detach().double(), weight.detach().double()), targets,
                              ignore_index=IGNORE, reduction=reduction)
        with torch.no_grad():
            loss = fused_linear_cross_entropy(hidden, weight, targets, ignore_index=IGNORE,
                                              reduction=reduction)
        torch.testing.assert_close(loss.double(), ref, rtol=1e-6, atol=1e-7)
    assert calls and all(c.get("scale") is None and not any(c.get(k) for k in
                         ("grad_hidden", "grad_weight", "grad_bias")) for c in calls), calls


def test_cross_entropy_empty_batch():
    logits = torch.randn(0, 50, device=DEVICE, requires_grad=True)
    targets = torch.zeros(0, dtype=torch.int64, device=DEVICE)
    assert cross_entropy(logits, targets).item() == 0.0
    assert cross_entropy(logits, targets, reduction="none").shape == (0,)


def test_cross_entropy_inplace():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, 1000, generator=gen).to(DEVICE).requires_grad_()
    targets = make_targets(6, 1000, gen)
    logits = x * 2.0  # an intermediate: mul's backward does not need its output
    ptr = logits.data_ptr()
    loss = cross_entropy(logits, targets, reduction="mean", inplace=True)
    loss.backward(torch.tensor(0.5, device=DEVICE))
    xr = x.detach().double().requires_grad_()
    ref = F.cross_entropy(xr * 2.0, targets, ignore_index=IGNORE)
    ref.backward(torch.tensor(0.5, dtype=torch.float64))
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-6, atol=0)
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=0, atol=1e-7)
    # The gradient lives in the logits' storage: that is the point of inplace.
    assert logits.data_ptr() == ptr
    torch.testing.assert_close(logits.detach().double(), xr.grad / 2.0, rtol=0, atol=1e-7)


def test_cross_entropy_inplace_refuses_to_corrupt_saved_logits():
    # exp() saves its output for the backward; overwriting it in place must raise, not give wrong grads.
    x = torch.randn(4, 64, device=DEVICE, requires_grad=True)
    logits = x.exp()
    loss = cross_entropy(logits, torch.arange(4, device=DEVICE), inplace=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_cross_entropy_backward_twice_raises():
    logits = torch.randn(3, 40, device=DEVICE, requires_grad=True)
    loss = cross_entropy(logits, torch.arange(3, device=DEVICE))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def test_cross_entropy_out_of_range_target_is_nan():
    logits = torch.randn(3, 40, device=DEVICE, requires_grad=True)
    loss = cross_entropy(logits, torch.tensor([1, 40, 2], device=DEVICE), reduction="none")
    assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2]]).all()
    loss.sum().backward()
    assert torch.isnan(logits.grad[1]).all() and torch.isfinite(logits.grad[[0, 2]]).all()


@pytest.mark.parametrize("logits,targets,kwargs,error,match", [
    (torch.randn(4, 10, dtype=torch.float64), torch.zeros(4, dtype=torch.int64), {}, TypeError, "float64"),
    (torch.randn(4, 10), torch.zeros(4), {}, TypeError, "int64"),
    (torch.randn(4, 10), torch.zeros(5, dtype=torch.int64), {}, ValueError, "shape"),
    (torch.randn(4, 0), torch.zeros(4, dtype=torch.int64), {}, ValueError, "empty vocabulary"),
    (torch.randn(4, 10), torch.zeros(4, dtype=torch.int64), {"reduction": "avg"}, ValueError, "'avg'"),
    (torch.randn(4, 10, device="meta"), torch.zeros(4, dtype=torch.int64, device="meta"), {}, RuntimeError,
     "unsupported device"),
    (torch.randn(4, 10), torch.zeros(4, dtype=torch.int64, device="meta"), {}, ValueError, "one device"),
    (torch.randn(4, 10), torch.zeros(4, dtype=torch.int64), {"ignore_index": None}, TypeError,
     "ignore_index must be an int"),
    (torch.randn(4, 10), torch.zeros(4, dtype=torch.int64), {"ignore_index": torch.tensor(-100)}, TypeError,
     "ignore_index must be an int"),
])
def test_cross_entropy_input_errors(logits, targets, kwargs, error, match):
    with pytest.raises(error, match=match):
        cross_entropy(logits, targets, **kwargs)


# --------------------------------------------------------------------------------------------------
# fused_linear_cross_entropy


def run_flce(hidden, weight, bias, targets, reduction, chunk_rows, go, how):
    """The loss by `how`, backward with grad_output go. "fused": ours; "torch": what a model does without
    the fused op (logits in the input dtype, the loss in fp32); "torch_chunked": the same, chunked as ours."""
    if how == "fused":
        loss = fused_linear_cross_entropy(hidden, weight, targets, ignore_index=IGNORE, reduction=reduction,
                                          bias=bias, chunk_rows=chunk_rows)
    elif how == "torch":
        loss = F.cross_entropy(F.linear(hidden, weight, bias).float(), targets, ignore_index=IGNORE,
                               reduction=reduction)
    else:
        n = hidden.shape[0]
        vocab, dim = weight.shape
        rows = chunk_rows or default_chunk_rows(n, vocab, dim, hidden.element_size(), weight_grad=True)
        parts = [F.cross_entropy(F.linear(hidden[s:s + rows], weight, bias).float(), targets[s:s + rows],
                                 ignore_index=IGNORE, reduction="none" if reduction == "none" else "sum")
                 for s in range(0, n, rows)]
        loss = torch.cat(parts) if reduction == "none" else sum(parts)
        if reduction == "mean":
            loss = loss / (targets != IGNORE).sum().clamp(min=1)
    loss.backward(go.to(loss.dtype))
    return loss


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("n,dim,vocab,chunk_rows", FLCE_SHAPES)
def test_fused_linear_cross_entropy_matches_torch(n, dim, vocab, chunk_rows, reduction, dtype):
    gen = torch.Generator().manual_seed(vocab + dim)
    hidden = torch.randn(n, dim, generator=gen)
    weight = torch.randn(vocab, dim, generator=gen) * dim ** -0.5 * 2
    bias = torch.randn(vocab, generator=gen) * 0.1 if vocab == 1000 else None  # with and without bias
    targets = make_targets(n, vocab, gen)
    go = grad_out_for(torch.zeros(()) if reduction != "none" else torch.zeros(n), gen).to(DEVICE)

    outs = {}
    for how, leaf_dtype in (("fused", dtype), ("torch", dtype), ("torch_chunked", dtype),
                            ("ref", torch.float64)):
        h = leaf(hidden.to(dtype), leaf_dtype)
        w = leaf(weight.to(dtype), leaf_dtype)
        b = None if bias is None else leaf(bias.to(dtype), leaf_dtype)
        loss = run_flce(h, w, b, targets, reduction, chunk_rows, go, "torch" if how == "ref" else how)
        outs[how] = (loss, h.grad, w.grad, None if b is None else b.grad)

    assert outs["fused"][0].dtype == torch.float32
    for i, what in enumerate(("loss", "grad hidden", "grad weight", "grad bias")):
        if outs["ref"][i] is not None:
            # The yardstick includes torch chunked as ours: a CPU BLAS matmul of a few rows with K = 65,600
            # reduces less accurately than one over all rows (measured 1e-5 vs 5e-7), and the chunk's
            # matmuls are torch's, not the kernel's.
            check(what, outs["fused"][i], (outs["torch"][i], outs["torch_chunked"][i]), outs["ref"][i], dtype)
            if i:
                assert outs["fused"][i].dtype == dtype
    ignored = targets == IGNORE
    assert (outs["fused"][1][ignored] == 0).all(), "ignored rows must get exactly zero grad hidden"


def flce_inputs(seed=0, n=11, dim=8, vocab=300):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, dim, generator=gen).to(DEVICE)
    weight = (torch.randn(vocab, dim, generator=gen) * 0.5).to(DEVICE)
    return hidden, weight, make_targets(n, vocab, gen)


def reference_grads(hidden, weight, targets, reduction="mean"):
    h = hidden.double().requires_grad_()
    w = weight.double().requires_grad_()
    loss = F.cross_entropy(h @ w.T, targets, ignore_index=IGNORE, reduction=reduction)
    loss.backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("grad_hidden,grad_weight", [(True, False), (False, True), (False, False)])
def test_fused_linear_cross_entropy_frozen_inputs(grad_hidden, grad_weight):
    hidden, weight, targets = flce_inputs()
    ref_loss, ref_h, ref_w = reference_grads(hidden, weight, targets)
    h = hidden.clone().requires_grad_(grad_hidden)
    w = weight.clone().requires_grad_(grad_weight)
    loss = fused_linear_cross_entropy(h, w, targets, chunk_rows=4)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-6, atol=0)
    assert loss.requires_grad == (grad_hidden or grad_weight)
    if loss.requires_grad:
        loss.backward()
    assert (h.grad is not None) == grad_hidden and (w.grad is not None) == grad_weight
    if grad_hidden:
        torch.testing.assert_close(h.grad.double(), ref_h, rtol=0, atol=1e-6)
    if grad_weight:
        torch.testing.assert_close(w.grad.double(), ref_w, rtol=0, atol=1e-6)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_fused_linear_cross_entropy_all_ignored(reduction):
    hidden, weight, targets = flce_inputs()
    targets.fill_(IGNORE)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = fused_linear_cross_entropy(h, w, targets, reduction=reduction, chunk_rows=4)
    assert torch.equal(loss, torch.zeros_like(loss))
    loss.sum().backward()
    assert torch.equal(h.grad, torch.zeros_like(h)) and torch.equal(w.grad, torch.zeros_like(w))


def test_fused_linear_cross_entropy_mean_counts_the_whole_batch():
    # The ignored targets all sit in one chunk: "mean" must still divide by the valid count of the batch.
    hidden, weight, targets = flce_inputs(n=12)
    targets[:] = torch.arange(12, device=DEVICE)
    targets[:5] = IGNORE
    ref_loss, ref_h, ref_w = reference_grads(hidden, weight, targets)
    for chunk_rows in (1, 5, 7, 12, 100):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss = fused_linear_cross_entropy(h, w, targets, chunk_rows=chunk_rows)
        loss.backward()
        torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-6, atol=0)
        torch.testing.assert_close(h.grad.double(), ref_h, rtol=0, atol=1e-6)
        torch.testing.assert_close(w.grad.double(), ref_w, rtol=0, atol=1e-6)


def test_fused_linear_cross_entropy_tied_weight_and_batched_shape():
    # A tied embedding: the weight also feeds the input side; autograd adds both contributions.
    hidden, weight, targets = flce_inputs(n=6)
    idx = torch.tensor([[1, 2, 3], [4, 5, 6]], device=DEVICE)
    ours_w, ref_w = weight.clone().requires_grad_(), weight.double().requires_grad_()
    x = F.embedding(idx, ours_w) + hidden.reshape(2, 3, -1)  # (B, T, D)
    fused_linear_cross_entropy(x, ours_w, targets.reshape(2, 3), reduction="sum").backward()
    xr = F.embedding(idx, ref_w) + hidden.double().reshape(2, 3, -1)
    F.cross_entropy((xr @ ref_w.T).reshape(6, -1), targets, ignore_index=IGNORE, reduction="sum").backward()
    torch.testing.assert_close(ours_w.grad.double(), ref_w.grad, rtol=0, atol=1e-5)
    loss = fused_linear_cross_entropy(x.detach(), weight, targets.reshape(2, 3), reduction="none")
    assert loss.shape == (2, 3)


@pytest.mark.parametrize("with_bias", [False, True], ids=["no_bias", "bias"])
def test_fused_linear_cross_entropy_autocast(with_bias):
    # Under autocast the matmul runs in the autocast dtype, as F.linear's would; an fp32 weight gets its
    # gradient in fp32 straight from the fp32 accumulator, not rounded to the autocast dtype on the way.
    hidden, weight, targets = flce_inputs()
    bias = torch.randn(weight.shape[0], generator=torch.Generator().manual_seed(5)) if with_bias else None
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    b = bias.clone().requires_grad_() if with_bias else None
    with torch.autocast(DEVICE, dtype=torch.float16):
        loss = fused_linear_cross_entropy(h, w, targets, bias=b, chunk_rows=4)  # 3 chunks accumulated
    loss.backward()
    h16, w16 = hidden.half().requires_grad_(), weight.half().requires_grad_()
    b16 = bias.half().requires_grad_() if with_bias else None
    ref = fused_linear_cross_entropy(h16, w16, targets, bias=b16, chunk_rows=4)
    ref.backward()
    assert loss.item() == ref.item()
    assert torch.equal(h.grad, h16.grad.float())
    assert w.grad.dtype == torch.float32 and torch.equal(w.grad.half(), w16.grad)  # the same sum, rounded
    assert not torch.equal(w.grad, w16.grad.float())  # ... but not rounded here
    if with_bias:
        assert b.grad.dtype == torch.float32 and torch.equal(b.grad, b16.grad.float())


def test_the_fp32_accumulation_probe_believes_numbers_not_the_absence_of_errors(monkeypatch):
    """adds_products_in_fp32 on stand-ins for torch.addmm: one with the fp32-output overload, one that
    accepts the call but gets the sum wrong, one without the overload (CPU torch: its answer here)."""
    flce = sys.modules["fastlm.kernels.fused_linear_cross_entropy"]
    real_addmm = torch.addmm

    def right(acc, a, b, *, out_dtype, out):
        return out.copy_(acc + (a.float() @ b.float()).to(out_dtype))

    def wrong(acc, a, b, *, out_dtype, out):  # e.g. an overload that ignores beta: drops acc
        return out.copy_((a.float() @ b.float()).to(out_dtype))

    assert not flce.adds_products_in_fp32(torch.device("cpu"), torch.float16)  # no such overload on CPU
    for stand_in, expected in ((right, True), (wrong, False)):
        monkeypatch.setattr(flce, "_FP32_ADDMM", {})
        monkeypatch.setattr(torch, "addmm", stand_in)
        assert flce.adds_products_in_fp32(torch.device("cpu"), torch.float16) is expected
        monkeypatch.setattr(torch, "addmm", real_addmm)


def test_default_chunk_rows():
    # The benchmark's shape, GPT-2 124M at 8 x 1024 tokens in bf16: a chunk about the size of hidden would
    # be 128 rows; with a weight gradient it is raised to 4096 rows (the grad_weight matmul's efficiency).
    assert default_chunk_rows(8192, 50304, 768, 2, weight_grad=False) == 128
    assert default_chunk_rows(8192, 50304, 768, 2, weight_grad=True) == 4096
    assert default_chunk_rows(16384, 50304, 512, 2, weight_grad=True) == 4096  # gpt60m's step: 4 chunks
    # capped at 4x the accumulator's bytes: 4 x 4 D bytes / 4 bytes a logit = 512 rows for D = 128 in fp32
    assert default_chunk_rows(8192, 50304, 128, 4, weight_grad=True) == 512
    assert default_chunk_rows(10, 50304, 768, 2, weight_grad=True) == 10  # never more than the rows
    assert default_chunk_rows(1, 7, 4096, 2, weight_grad=False) == 1


@pytest.mark.parametrize("make,error,match", [
    (lambda h, w, t: (h.double(), w, t, {}), TypeError, "float64"),
    (lambda h, w, t: (h, w.half(), t, {}), TypeError, "one dtype"),
    (lambda h, w, t: (h, w[:, :-1], t, {}), ValueError, r"weight must be \(V, D\)"),
    (lambda h, w, t: (h, w, t[:-1], {}), ValueError, "targets must have"),
    (lambda h, w, t: (h, w, t.float(), {}), TypeError, "int64"),
    (lambda h, w, t: (h, w, t, {"reduction": "max"}), ValueError, "'max'"),
    (lambda h, w, t: (h, w, t, {"bias": torch.zeros(3)}), ValueError, "bias must be"),
    (lambda h, w, t: (h, w, t, {"chunk_rows": 0}), ValueError, "chunk_rows"),
    (lambda h, w, t: (h, w, t, {"ignore_index": None}), TypeError, "ignore_index must be an int"),
])
def test_fused_linear_cross_entropy_input_errors(make, error, match):
    hidden, weight, targets = flce_inputs()
    h, w, t, kwargs = make(hidden, weight, targets)
    with pytest.raises(error, match=match):
        fused_linear_cross_entropy(h, w, t, **kwargs)


def test_cpu_tensors_without_interpreter_say_what_to_do():
    # TRITON_INTERPRET is read when a kernel is defined, so this needs a fresh interpreter without it.
    code = textwrap.dedent("""
        import torch
        from fastlm.kernels import cross_entropy, fused_linear_cross_entropy
        for call in (lambda: cross_entropy(torch.randn(2, 5), torch.zeros(2, dtype=torch.int64)),
                     lambda: fused_linear_cross_entropy(torch.randn(2, 3), torch.randn(5, 3),
                                                        torch.zeros(2, dtype=torch.int64))):
            try:
                call()
            except RuntimeError as e:
                print("ERROR:", e)
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stdout.splitlines() if line.startswith("ERROR:")]
    assert len(lines) == 2, out.stdout + out.stderr
    for line in lines:
        assert "CUDA" in line and "TRITON_INTERPRET=1" in line, line


def test_block_configs_are_timed_once_per_vocabulary(monkeypatch):
    # On a GPU the kernel's (BLOCK_V, num_warps) is the fastest candidate that fits the vocabulary, timed
    # once per (vocabulary, dtype, gradient or not, device), and the rule wherever nothing may be timed.
    # Here with a stand-in device and timer; the GPU test below runs every candidate for real.
    ce = sys.modules["fastlm.kernels.cross_entropy"]
    monkeypatch.setattr(ce, "INTERPRETED", False)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    cuda = SimpleNamespace(type="cuda", index=0)
    timed = []

    def fake_time(n_cols, dtype, grad, device, block, warps):
        timed.append((n_cols, grad, block, warps))
        return 1.0 if (block, warps) == (8192, 8) else 2.0 + block / 1e6 + warps / 1e3

    configs = ce._Configs()
    configs.time = fake_time
    assert configs(50257, torch.bfloat16, True, cuda) == (8192, 8)
    assert sorted(t[2:] for t in timed) == sorted(ce.CANDIDATES)  # all fit a 50257 vocabulary
    assert configs(50257, torch.bfloat16, True, cuda) == (8192, 8) and len(timed) == len(ce.CANDIDATES)
    configs(50257, torch.bfloat16, False, cuda)  # without the gradient: timed on its own
    assert len(timed) == 2 * len(ce.CANDIDATES)
    timed.clear()
    assert configs(3000, torch.float16, True, cuda) == (2048, 4)  # the fastest of the three that fit
    assert sorted(t[2:] for t in timed) == [(2048, 4), (4096, 4), (4096, 8)]
    timed.clear()
    assert configs(1000, torch.float16, True, cuda) == (1024, 1) and timed == []  # only the rule fits
    assert configs(50257, torch.bfloat16, True, SimpleNamespace(type="cpu", index=None)) == (16384, 16)
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert configs(65600, torch.bfloat16, True, cuda) == (16384, 16) and timed == []  # the rule
    finally:
        torch.use_deterministic_algorithms(was)


def test_kernel_lowers_to_h100_code():
    # The interpreter never compiles the kernel; lowering it to PTX and SASS for sm_90 (no GPU needed) catches
    # what only the compiler sees (loop-carried types, constexpr branches), before a GPU run does.
    code = textwrap.dedent("""
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from fastlm.kernels.cross_entropy import CANDIDATES, _cross_entropy_kernel, num_warps
        # timed on GPUs
        variants = [("bf16", "i64", True, False, block, warps) for block, warps in CANDIDATES]
        variants += [("fp32", "i32", True, True, 32768, num_warps(32768)),
                     ("fp16", "i64", False, False, 32768, num_warps(32768))]
        for dtype, targets, grad, per_row, block, warps in variants:
            signature = {"logits_ptr": "*" + dtype, "logits_row_stride": "i64", "grad_ptr": "*" + dtype,
                         "grad_row_stride": "i64", "targets_ptr": "*" + targets, "loss_ptr": "*fp32",
                         "scale_ptr": "*fp32", "n_cols": "i32", "ignore_index": "i32", "BLOCK_V": "constexpr",
                         "COMPUTE_GRAD": "constexpr", "SCALE_PER_ROW": "constexpr"}
            src = ASTSource(fn=_cross_entropy_kernel, signature=signature,
                            constexprs={"BLOCK_V": block, "COMPUTE_GRAD": grad, "SCALE_PER_ROW": per_row})
            compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
            assert compiled.asm["cubin"], (dtype, block, warps)
        print("LOWERED")
    """)
    assert_lowers_to_sm90(code)


# --------------------------------------------------------------------------------------------------
# GPU only: bf16 (the interpreter computes some bf16 ops wrongly) and the compiled kernels at size.

gpu = pytest.mark.skipif(not torch.cuda.is_available() or INTERPRETED, reason="needs a CUDA GPU")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("vocab", [50257, 128256])
def test_cross_entropy_bf16_gpu(vocab, reduction):
    gen = torch.Generator().manual_seed(vocab)
    ours, same, ref, g_ours, g_same, g_ref, _ = run_ce_case(256, vocab, reduction, torch.bfloat16, gen)
    check("loss", ours, same, ref, torch.bfloat16)
    check("grad logits", g_ours, g_same, g_ref, torch.bfloat16)


@pytest.mark.gpu
@gpu
def test_every_timed_block_config_gives_the_same_loss_and_gradient():
    # The configurations the GPU times against each other differ only in how a row is cut into blocks:
    # the fp32 loss sums in another order (a few fp32 ulps apart) and the bf16 gradient may round the other
    # way (one bf16 ulp, eps 7.8e-3). The choice made for this vocabulary is one of them.
    ce = sys.modules["fastlm.kernels.cross_entropy"]
    gen = torch.Generator().manual_seed(3)
    n, vocab = 256, 50257
    logits = (torch.randn(n, vocab, generator=gen) * 3).to("cuda", torch.bfloat16)
    targets = make_targets(n, vocab, gen).cuda()
    scale = torch.ones(1, device="cuda")
    results = {}
    for block, warps in ce.CANDIDATES:
        loss, grad = torch.empty(n, device="cuda"), torch.empty_like(logits)
        ce._launch_rows(logits, targets, loss, grad, scale, IGNORE, False, block, warps)
        results[block, warps] = (loss, grad.float())
    first = results[ce.CANDIDATES[0]]
    for config, (loss, grad) in results.items():
        torch.testing.assert_close(loss, first[0], rtol=1e-5, atol=1e-5, msg=lambda m, c=config: f"{c}: {m}")
        torch.testing.assert_close(grad, first[1], rtol=8e-3, atol=1e-7, msg=lambda m, c=config: f"{c}: {m}")
    cross_entropy(logits.clone().requires_grad_(), targets)
    assert ce._CONFIGS.chosen[(vocab, torch.bfloat16, True, 0)] in ce.CANDIDATES


def flce_bf16_gpu_case(reduction, chunk_rows):
    """fused, torch and fp64 (loss, grad hidden, grad weight) for GPT-2's head on 2048 rows."""
    gen = torch.Generator().manual_seed(7)
    n, dim, vocab = 2048, 768, 50304
    hidden = torch.randn(n, dim, generator=gen)
    weight = torch.randn(vocab, dim, generator=gen) * 0.05
    targets = make_targets(n, vocab, gen)
    go = grad_out_for(torch.zeros(()) if reduction != "none" else torch.zeros(n), gen).to(DEVICE)
    outs = {}
    for how, leaf_dtype in (("fused", torch.bfloat16), ("torch", torch.bfloat16), ("ref", torch.float64)):
        h, w = leaf(hidden.bfloat16(), leaf_dtype), leaf(weight.bfloat16(), leaf_dtype)
        loss = run_flce(h, w, None, targets, reduction, chunk_rows, go, "torch" if how == "ref" else how)
        outs[how] = (loss, h.grad, w.grad)
    return outs


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("chunk_rows", [None, 384], ids=["one_chunk", "six_chunks"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_fused_linear_cross_entropy_bf16_gpu(reduction, chunk_rows):
    outs = flce_bf16_gpu_case(reduction, chunk_rows)
    for i, what in enumerate(("loss", "grad hidden", "grad weight")):
        check(what, outs["fused"][i], outs["torch"][i], outs["ref"][i], torch.bfloat16)


@pytest.mark.gpu
@gpu
def test_grad_weight_products_are_added_in_fp32_on_gpu(monkeypatch):
    """Where torch's addmm has an fp32 output for bf16 inputs, the chunks' grad_weight products go straight
    into the fp32 accumulator: no worse than writing each in bf16 and adding it (the other path, forced)."""
    flce = sys.modules["fastlm.kernels.fused_linear_cross_entropy"]
    if not flce.adds_products_in_fp32(torch.device(DEVICE, torch.cuda.current_device()), torch.bfloat16):
        pytest.skip(f"torch {torch.__version__} has no addmm with an fp32 output for bf16 on this GPU")
    direct = flce_bf16_gpu_case("sum", 384)
    monkeypatch.setattr(flce, "adds_products_in_fp32", lambda device, dtype: False)
    rounded = flce_bf16_gpu_case("sum", 384)
    ref = direct["ref"][2]
    assert torch.equal(direct["fused"][1], rounded["fused"][1])  # grad hidden: the same code either way
    # Both are cast to bf16 at the end, so mostly equal; the direct sum is never further from fp64 by more
    # than one bf16 rounding of the result (relative 2^-8 of the largest magnitude).
    slack = ref.abs().max().item() * 2.0 ** -8
    assert max_err(direct["fused"][2], ref) <= max_err(rounded["fused"][2], ref) + slack


def test_a_double_backward_is_an_error_not_a_silent_zero():
    """The kernels' gradients carry no graph: asked for a second derivative (create_graph=True, e.g. a
    gradient penalty), both losses raise instead of returning a first gradient that does not require grad,
    whose second-order terms autograd would then drop without a word."""
    logits = torch.randn(4, 10, device=DEVICE, requires_grad=True)
    targets = torch.randint(0, 10, (4,), device=DEVICE)
    hidden, weight, flce_targets = flce_inputs()
    hidden.requires_grad_()
    for loss, x in ((cross_entropy(logits, targets), logits),
                    (fused_linear_cross_entropy(hidden, weight, flce_targets), hidden)):
        with pytest.raises(RuntimeError, match=r"backward with create_graph=True \(a second derivative\) is "
                                               r"not supported"):
            torch.autograd.grad(loss, x, create_graph=True)
        torch.autograd.grad(loss, x)  # (the refusal came before the backward used its stored gradient)
