"""The LM head and the cross-entropy loss fused, so that the (N, V) logits never exist at once.

    loss = fused_linear_cross_entropy(hidden, weight, targets, ignore_index=-100, reduction="mean",
                                      bias=None, chunk_rows=None)

Same meaning as `F.cross_entropy(F.linear(hidden, weight, bias).float(), targets, ...)` for hidden (..., D),
weight (V, D) (an nn.Linear's or a tied embedding's weight), targets (...). For each chunk of rows:

    logits = hidden[chunk] @ weight.T (+ bias)       torch matmul in the input dtype (fp32 accumulation)
    loss[chunk], logits <- d loss / d logits          cross_entropy's kernel, gradient written in place
    grad_hidden[chunk] = logits @ weight
    grad_weight += logits.T @ hidden[chunk]           fp32 accumulator
    grad_bias += logits.sum(0)                        fp32 accumulator

all in the forward, so memory peaks at one chunk of logits plus the gradients the backward must return
anyway; the backward only multiplies the stored gradients by grad_output (for "mean"/"sum").
"mean" divides by the number of non-ignored targets of the whole batch, counted before the first chunk.

Limits and choices:
- reduction="none" cannot be done that way: grad_weight sums per-row terms weighted by a per-row
  grad_output that is only known in the backward. Its forward computes the losses only and its backward
  recomputes the chunks (one more logits matmul per chunk) with the kernel scaling row i by grad_output[i].
- Nothing is computed beyond the loss when no input requires grad or grad mode is off (evaluation).
- The default chunk (`default_chunk_rows`) makes a chunk of logits about as large as hidden (Liger-Kernel's
  rule), but at least min(4096, 8 D) rows (bf16; 4 D fp32) when grad_weight is needed: with fewer rows the
  per-chunk grad_weight matmul re-reads and re-writes the (V, D) fp32 accumulator for little work and
  becomes memory bound. A chunk's logits then take at most 4x that accumulator's memory (GPT-2's head at
  4096 rows: 412 MB of bf16 logits; torch's loss holds all of them, and their fp32 copy).
- Where torch can (CUDA), a chunk's bf16/fp16 grad_weight product is added to the fp32 accumulator by the
  matmul itself (addmm with an fp32 output, cuBLAS's beta = 1); elsewhere it is written in the input dtype
  and then added, one more pass over (V, D) per chunk and a rounding of each chunk's product.
- The stored grad_weight is cast to the weight's dtype at the end of the forward (the fp32 accumulator
  is freed there): it is held across the rest of the model's backward.
- Under torch.autocast, hidden, weight and bias are cast to the autocast dtype first, as F.linear would be.
  The weight is cast inside the autograd Function, so that its gradient goes back in the weight's own
  dtype straight from the fp32 accumulator: an fp32 weight (autocast's master weights) gets an fp32
  gradient not rounded to the autocast dtype, and no cast of (V, D) each way.
- The backward runs once (stored gradients are scaled in place); see cross_entropy's other notes
  (all-ignored "mean" is 0, out-of-range targets give NaN, fp16 underflow of tiny gradients).

Layers: `fused_linear_cross_entropy_forward` (validates, chunks, launches cross_entropy's kernel) ->
`_FusedLinearCrossEntropyFunction` (autograd) -> `fused_linear_cross_entropy` (public).
"""

from __future__ import annotations

import math

import torch

from .cross_entropy import (LOGIT_DTYPES, check_device, check_ignore_index, check_reduction, check_targets,
                            grad_scale, launch, next_power_of_2)
from .launch import refuse_create_graph

OP = "fused_linear_cross_entropy"
# A chunk's grad_weight update (K = rows) makes 2 * rows flops per (V, D) element and moves ~12 bytes for it
# (the fp32 accumulator read and written, the chunk's bf16 product written and read): ~rows / 6 flop per
# byte, where an H100 needs ~300 to be compute bound. 1024 rows (16 chunks for 16K tokens) is memory bound;
# 4096 rows is not, and re-reads the accumulator 4 times per step instead of 16.
MIN_CHUNK_ROWS_WITH_WEIGHT_GRAD = 4096


def default_chunk_rows(n_rows: int, vocab: int, dim: int, elem_size: int, weight_grad: bool) -> int:
    """Rows per chunk: a chunk of logits about the size of hidden, raised for the grad_weight matmul."""
    rows = next_power_of_2(max(1, math.ceil(n_rows / max(1, math.ceil(vocab / max(1, dim))))))
    if weight_grad:
        # At most as many rows as make the chunk 4x the size of the fp32 grad_weight accumulator (V*D*4 B).
        accumulator_rows = 1 << max(0, (dim * 4 * 4 // elem_size).bit_length() - 1)
        rows = max(rows, min(MIN_CHUNK_ROWS_WITH_WEIGHT_GRAD, accumulator_rows))
    return max(1, min(rows, n_rows))


_FP32_ADDMM: dict[tuple[torch.device, torch.dtype], bool] = {}


def adds_products_in_fp32(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)` works for `dtype` matrices a, b
    and an fp32 acc on `device` (aten::addmm.dtype_out: CUDA builds of recent torch; not on CPU). Probed
    once per device and dtype, the answer checked on numbers, not only on the absence of an error."""
    key = (device, dtype)
    if key not in _FP32_ADDMM:
        try:  # the layouts of the real call: a chunk's logits transposed, times its rows of hidden
            acc = torch.full((2, 4), 2.0, dtype=torch.float32, device=device)
            logits = torch.full((3, 2), 1.5, dtype=dtype, device=device)
            hidden = torch.full((3, 4), 0.5, dtype=dtype, device=device)
            torch.addmm(acc, logits.t(), hidden, out_dtype=torch.float32, out=acc)
            _FP32_ADDMM[key] = bool((acc == 2.0 + 3 * 1.5 * 0.5).all())
        except (RuntimeError, NotImplementedError, TypeError):  # no such overload here
            _FP32_ADDMM[key] = False
    return _FP32_ADDMM[key]


def _validate(hidden, weight, targets, bias, reduction, chunk_rows, weight_dtype=None, ignore_index=-100):
    """weight_dtype: the dtype the weight will be cast to (autocast), in place of its own."""
    for name, t in (("hidden", hidden), ("weight", weight), ("targets", targets)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{OP}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if hidden.dim() != 2:
        raise ValueError(f"{OP}: hidden must be 2-D (N, D), got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"{OP}: weight must be (V, D) with D = hidden's last dimension {hidden.shape[1]}, "
                         f"got shape {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError(f"{OP}: weight has an empty vocabulary dimension, shape {tuple(weight.shape)}")
    if hidden.dtype not in LOGIT_DTYPES:
        raise TypeError(f"{OP}: hidden must be float32, float16 or bfloat16, got {hidden.dtype}")
    if (weight_dtype or weight.dtype) != hidden.dtype:
        raise TypeError(f"{OP}: weight and hidden must have one dtype (the matmul runs in it), got weight "
                        f"{weight.dtype} and hidden {hidden.dtype}. HINT: cast hidden, or run under autocast "
                        "outside this call")
    if bias is not None:
        if (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (weight.shape[0],)
                or bias.dtype != (weight_dtype or weight.dtype)):
            raise ValueError(f"{OP}: bias must be a ({weight.shape[0]},) tensor of dtype "
                             f"{weight_dtype or weight.dtype}, got "
                             f"{tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__}"
                             f"{' ' + str(bias.dtype) if isinstance(bias, torch.Tensor) else ''}")
    check_targets(targets, hidden.shape[0], OP)
    check_reduction(reduction, OP)
    check_ignore_index(ignore_index, OP)
    check_device(hidden, weight, targets, *(() if bias is None else (bias,)), op=OP)
    if chunk_rows is not None and (not isinstance(chunk_rows, int) or isinstance(chunk_rows, bool)
                                   or chunk_rows < 1):
        raise ValueError(f"{OP}: chunk_rows must be a positive int, got {chunk_rows!r}")


def fused_linear_cross_entropy_forward(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, bias: torch.Tensor | None = None,
    ignore_index: int = -100, *, scale: torch.Tensor | None = None, scale_per_row: bool = False,
    grad_hidden: bool = False, grad_weight: bool = False, grad_bias: bool = False,
    chunk_rows: int | None = None, block: int | None = None, weight_grad_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Chunked loop over 2-D, validated inputs. Returns (loss per row fp32 (N,), grad_hidden, grad_weight,
    grad_bias), each gradient d(sum_i scale_i * loss_i)/d(input) in its input's dtype (grad_weight: in
    weight_grad_dtype when given), or None when not asked for. scale: fp32, one value or one per row
    (scale_per_row); None computes no gradient."""
    n_rows, dim = hidden.shape
    vocab = weight.shape[0]
    compute_grad = scale is not None and (grad_hidden or grad_weight or grad_bias)
    hidden = hidden.contiguous()
    targets = targets.contiguous()
    loss_rows = torch.empty(n_rows, dtype=torch.float32, device=hidden.device)
    d_hidden = torch.empty_like(hidden) if compute_grad and grad_hidden else None
    # fp32 accumulators across chunks: summing many chunks' bf16 products in bf16 would lose low bits.
    fp32 = dict(dtype=torch.float32, device=hidden.device)
    d_weight = torch.zeros(vocab, dim, **fp32) if compute_grad and grad_weight else None
    d_bias = torch.zeros(vocab, **fp32) if compute_grad and grad_bias and bias is not None else None
    # A chunk's product is added to d_weight by the matmul (fp32 inputs, or an fp32 output where torch has
    # one); otherwise it is written in the input dtype (fp32 accumulation inside the matmul), then added.
    fp32_out = (d_weight is not None and hidden.dtype != torch.float32
                and adds_products_in_fp32(hidden.device, hidden.dtype))
    partial = (torch.empty(vocab, dim, dtype=hidden.dtype, device=hidden.device)
               if d_weight is not None and hidden.dtype != torch.float32 and not fp32_out else None)
    if scale is None:
        scale = torch.ones(1, dtype=torch.float32, device=hidden.device)  # unused without gradient
    rows = chunk_rows or default_chunk_rows(n_rows, vocab, dim, hidden.element_size(), d_weight is not None)

    weight_t = weight.t()
    for start in range(0, n_rows, rows):
        end = min(start + rows, n_rows)
        h = hidden[start:end]  # (R, D)
        logits = torch.mm(h, weight_t) if bias is None else torch.addmm(bias, h, weight_t)  # (R, V)
        launch(logits, targets[start:end], loss_rows[start:end], logits if compute_grad else None,
               scale[start:end] if scale_per_row else scale, ignore_index,
               scale_per_row=scale_per_row, block=block)
        if not compute_grad:
            continue
        # logits now holds d loss / d logits for the chunk.
        if d_hidden is not None:
            torch.mm(logits, weight, out=d_hidden[start:end])
        if d_weight is not None:
            if fp32_out:
                torch.addmm(d_weight, logits.t(), h, out_dtype=torch.float32, out=d_weight)
            elif partial is None:
                d_weight.addmm_(logits.t(), h)
            else:
                d_weight.add_(torch.mm(logits.t(), h, out=partial))
        if d_bias is not None:
            d_bias.add_(logits.sum(0, dtype=torch.float32))
        del logits

    if d_weight is not None:
        d_weight = d_weight.to(weight_grad_dtype or weight.dtype)
    if d_bias is not None:
        d_bias = d_bias.to(bias.dtype)
    return loss_rows, d_hidden, d_weight, d_bias


class _FusedLinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, ignore_index, reduction, chunk_rows, grad_enabled):
        # needs_input_grad says yes under no_grad too (evaluation): then the loss only
        need_h, need_w, need_b = (need and grad_enabled for need in ctx.needs_input_grad[:3])
        ctx.reduction = reduction
        ctx.ignore_index = ignore_index
        ctx.chunk_rows = chunk_rows
        ctx.used = False
        scale, n_valid = grad_scale(targets, ignore_index, reduction)
        weight_dtype = weight.dtype  # (an autocast run's fp32 weight: the matmuls run in hidden's dtype)
        if reduction == "none":
            # Losses only; the backward recomputes the chunks once grad_output (per row) is known.
            loss_rows, _, _, _ = fused_linear_cross_entropy_forward(hidden, weight.to(hidden.dtype), targets,
                                                                    bias, ignore_index, chunk_rows=chunk_rows)
            ctx.save_for_backward(hidden, weight, bias, targets)
            return loss_rows
        loss_rows, d_hidden, d_weight, d_bias = fused_linear_cross_entropy_forward(
            hidden, weight.to(hidden.dtype), targets, bias, ignore_index,
            scale=scale if need_h or need_w or need_b else None, grad_hidden=need_h, grad_weight=need_w,
            grad_bias=need_b, chunk_rows=chunk_rows, weight_grad_dtype=weight_dtype)
        ctx.save_for_backward(d_hidden, d_weight, d_bias)
        loss = loss_rows.sum()
        return loss / n_valid[0] if reduction == "mean" else loss

    @staticmethod
    def backward(ctx, grad_output):
        refuse_create_graph(OP, "torch.nn.functional.cross_entropy on F.linear")
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        if ctx.reduction == "none":
            hidden, weight, bias, targets = ctx.saved_tensors
            _, d_hidden, d_weight, d_bias = fused_linear_cross_entropy_forward(
                hidden, weight.to(hidden.dtype), targets, bias, ctx.ignore_index,
                scale=grad_output.detach().to(torch.float32).contiguous(), scale_per_row=True,
                grad_hidden=need_h, grad_weight=need_w, grad_bias=need_b, chunk_rows=ctx.chunk_rows,
                weight_grad_dtype=weight.dtype)
            return d_hidden, d_weight, d_bias, None, None, None, None, None
        if ctx.used:
            raise RuntimeError(f"{OP}: backward ran twice through the same graph; the stored gradients are "
                               "scaled in place to save memory. HINT: recompute the loss instead of "
                               "retain_graph=True")
        ctx.used = True
        grads = ctx.saved_tensors
        for g in grads:
            if g is not None:
                g.mul_(grad_output)
        return (*grads, None, None, None, None, None)


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                               ignore_index: int = -100, reduction: str = "mean",
                               bias: torch.Tensor | None = None,
                               chunk_rows: int | None = None) -> torch.Tensor:
    """Cross-entropy of F.linear(hidden, weight, bias) against targets, as fp32, without materialising the
    logits: hidden (..., D), weight (V, D), bias (V,) or None, targets (...) int64/int32 class indices.

    reduction: "mean" (over non-ignored targets; 0 when there are none), "sum", or "none" (shaped like
    targets). chunk_rows: rows of logits computed at once (default: `default_chunk_rows`)."""
    if not isinstance(hidden, torch.Tensor) or not isinstance(targets, torch.Tensor):
        raise TypeError(f"{OP}: hidden and targets must be torch.Tensors, got {type(hidden).__name__} and "
                        f"{type(targets).__name__}")
    if hidden.dim() < 1 or tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"{OP}: targets must have hidden's shape without the last (feature) dimension, got "
                         f"hidden {tuple(hidden.shape)} and targets {tuple(targets.shape)}")
    out_shape = targets.shape
    weight_dtype = None
    if isinstance(weight, torch.Tensor) and torch.is_autocast_enabled(hidden.device.type):
        # Do what F.linear would do under autocast: the matmul in the autocast dtype. (The weight is cast
        # inside the Function, which returns its gradient in the weight's dtype; see the notes above.)
        weight_dtype = torch.get_autocast_dtype(hidden.device.type)
        hidden = hidden.to(weight_dtype)
        bias = bias.to(weight_dtype) if isinstance(bias, torch.Tensor) else bias
    n_rows = targets.numel()  # not reshape(-1, D): ambiguous when there are no elements
    hidden2d = hidden.reshape(n_rows, hidden.shape[-1])
    targets1d = targets.reshape(n_rows)
    _validate(hidden2d, weight, targets1d, bias, reduction, chunk_rows, weight_dtype, ignore_index)
    loss = _FusedLinearCrossEntropyFunction.apply(hidden2d, weight, bias, targets1d, ignore_index, reduction,
                                                  chunk_rows, torch.is_grad_enabled())
    return loss.reshape(out_shape) if reduction == "none" else loss
