"""Cross-entropy loss and its gradient in one Triton kernel launch: per row, a log-sum-exp loop over the
vocabulary, then a gradient loop over the same row.

    loss = cross_entropy(logits, targets, ignore_index=-100, reduction="mean", inplace=False)

Same meaning as `torch.nn.functional.cross_entropy(logits.float(), targets, ...)` for logits (..., V) in
fp32/fp16/bf16 and integer targets (...), with these differences:

- The forward also computes d(loss)/d(logits) (softmax(x) - onehot(target), times 1/n_valid for "mean")
  and keeps it for the backward, which only multiplies it by grad_output. No second (N, V) tensor is
  made besides that gradient (torch keeps log_softmax and makes two (N, V) gradients). When the logits do
  not require grad (evaluation), no gradient is computed or stored.
- `inplace=True` writes the gradient into the logits tensor itself: the logits are destroyed by the call
  and no (N, V) buffer is allocated at all. Safe when nothing else needs the logits' values afterwards,
  e.g. logits that come straight out of a matmul (its backward needs the matmul's inputs, not its
  output). The logits' autograd version counter is bumped, so if an earlier op did save them for its
  backward (tanh soft-capping, exp, ...) autograd raises "modified by an inplace operation" at backward
  instead of computing wrong gradients. Do not use it on a leaf tensor you read again.
- "mean" over rows whose targets are all `ignore_index` is 0 with zero gradient, not NaN as in torch:
  a fully padded micro-batch must not poison the step.
- A target outside [0, V) that is not `ignore_index` gives a NaN loss (and NaN gradient) for its row,
  where torch raises (a device assert on CUDA): checking on the host would cost a GPU sync per call.
- The backward can run once (the stored gradient is scaled in place to save an (N, V) buffer); a second
  backward through the same graph (`retain_graph=True`) raises.
- The gradient is stored in the logits' dtype after the 1/n_valid scaling. In fp16 with many tokens the
  smallest probabilities underflow (as they do in torch's own fp16 backward); bf16 has fp32's range.

Math is fp32 whatever the input dtype; the loss is returned as fp32. Runs on CUDA, or on CPU under
Triton's interpreter (TRITON_INTERPRET=1 set before this module is imported) for the tests.

Layers: `_cross_entropy_kernel` (Triton) -> `cross_entropy_forward` (validates, launches; also used by the
fused linear cross-entropy) -> `_CrossEntropyFunction` (autograd) -> `cross_entropy` (public).
"""

from __future__ import annotations

import numbers

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from .launch import CachedLauncher, refuse_create_graph

REDUCTIONS = ("mean", "sum", "none")
LOGIT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TARGET_DTYPES = (torch.int64, torch.int32)

# Widest vocabulary chunk the rule (`block_v`) gives one program per loop step: 16K values over 16 warps,
# 32 a thread, so a 50K-128K vocabulary takes 4-8 steps. 32K over 32 warps would halve the steps, but 1,024
# threads leave 64 registers a thread and that kernel spills (40 bytes a thread inside its first loop on an
# H100: `python tools/kernel_report.py ce`); 16K over 16 warps takes 90 and does not. The rule decides
# where nothing is timed (deterministic runs, torch.compile, the interpreter); on a GPU the candidates
# below, the 32K one included, are timed.
MAX_BLOCK_V = 16384
# (BLOCK_V, num_warps) timed for a vocabulary on its first use on a GPU (`_Configs`), the rule's own choice
# (`block_v`, `num_warps`) among them. One wide block per row leaves room for one program per SM, whose
# loads then wait on its own block-wide reductions; narrower blocks with fewer warps let several programs
# share an SM and hide each other's loads. triton.autotune cannot do this timing: its runs would read
# logits that an earlier run overwrote with the gradient (in place), and its `restore_value` would copy the
# whole (N, V) tensor, which is what this kernel exists to avoid. Scratch rows are timed instead.
CANDIDATES = ((32768, 32), (16384, 16), (8192, 8), (8192, 16), (4096, 4), (4096, 8), (2048, 4))
# the candidates allowed to spill registers (timed like the others; a test holds the rest to none)
SPILLING_CANDIDATES = ((32768, 32),)
TUNE_ROWS = 512  # scratch rows timed per candidate: several waves of programs over the SMs


@triton.jit
def _cross_entropy_kernel(
    logits_ptr, logits_row_stride,
    grad_ptr, grad_row_stride,
    targets_ptr, loss_ptr,
    scale_ptr,  # fp32: the gradient's factor, one value or one per row (SCALE_PER_ROW)
    n_cols, ignore_index,
    BLOCK_V: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    SCALE_PER_ROW: tl.constexpr,
):
    """One program per row: online max / log-sum-exp over the row in BLOCK_V chunks, then (COMPUTE_GRAD)
    a second loop over the same row writing (softmax - onehot) * scale. grad_ptr may equal logits_ptr:
    each chunk is read before it is overwritten, and the first loop has read the whole row already."""
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride passes 2**31 at 8K rows x 256K vocab
    logits_row = logits_ptr + row * logits_row_stride
    grad_row = grad_ptr + row * grad_row_stride
    target = tl.load(targets_ptr + row).to(tl.int64)
    cols = tl.arange(0, BLOCK_V)

    if target == ignore_index:
        tl.store(loss_ptr + row, 0.0)
        if COMPUTE_GRAD:
            for start in range(0, n_cols, BLOCK_V):
                offs = start + cols
                tl.store(grad_row + offs, tl.zeros([BLOCK_V], dtype=grad_ptr.dtype.element_ty),
                         mask=offs < n_cols)
    else:
        # Online log-sum-exp: a running max m (one block-wide reduction per step) and per-lane running sums
        # d of exp(x - m), rescaled when m grows and summed across the lanes once, after the loop.
        m = float("-inf")
        d = tl.zeros([BLOCK_V], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK_V):
            offs = start + cols
            x = tl.load(logits_row + offs, mask=offs < n_cols, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            # exponents relative to a finite reference: while every logit so far is -inf (a masked
            # vocabulary), m_new is -inf too and x - m_new would be NaN; the terms are 0 then
            ref = tl.where(m_new == float("-inf"), 0.0, m_new)
            d = d * tl.exp(m - ref) + tl.exp(x - ref)
            m = m_new
        lse = m + tl.log(tl.sum(d, axis=0))

        in_range = (target >= 0) & (target < n_cols)
        safe_target = tl.where(in_range, target, 0)
        x_target = tl.load(logits_row + safe_target).to(tl.float32)
        # A target outside [0, V) poisons its row with NaN rather than reading out of bounds.
        loss = tl.where(in_range, lse - x_target, float("nan"))
        tl.store(loss_ptr + row, loss)

        if COMPUTE_GRAD:
            if SCALE_PER_ROW:
                scale = tl.load(scale_ptr + row)
            else:
                scale = tl.load(scale_ptr)
            scale = tl.where(in_range, scale, float("nan"))
            for start in range(0, n_cols, BLOCK_V):
                offs = start + cols
                mask = offs < n_cols
                x = tl.load(logits_row + offs, mask=mask, other=0.0).to(tl.float32)
                p = tl.exp(x - lse)
                g = tl.where(offs == target, p - 1.0, p) * scale
                tl.store(grad_row + offs, g.to(grad_ptr.dtype.element_ty), mask=mask)


INTERPRETED = isinstance(_cross_entropy_kernel, InterpretedFunction)
_LAUNCH = CachedLauncher(_cross_entropy_kernel, direct=not INTERPRETED)


def check_device(*tensors: torch.Tensor, op: str) -> None:
    """The kernels run on CUDA, or on CPU only under Triton's interpreter; every tensor on one device."""
    device = tensors[0].device
    for t in tensors[1:]:
        if t.device != device:
            raise ValueError(f"{op}: all tensors must be on one device, got {device} and {t.device}")
    if device.type == "cuda":
        return
    if device.type == "cpu":
        if INTERPRETED:
            return
        raise RuntimeError(
            f"{op}: got CPU tensors but Triton kernels need a CUDA device. HINT: move the tensors to CUDA, "
            "or set TRITON_INTERPRET=1 in the environment before importing fastlm.kernels to run them "
            "(slowly) on CPU under Triton's interpreter")
    raise RuntimeError(f"{op}: unsupported device {device}; expected a CUDA device "
                       "(or CPU with TRITON_INTERPRET=1)")


def check_targets(targets: torch.Tensor, n_rows: int, op: str) -> None:
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"{op}: targets must be a torch.Tensor, got {type(targets).__name__}")
    if targets.dtype not in TARGET_DTYPES:
        raise TypeError(f"{op}: targets must be int64 (or int32) class indices, got {targets.dtype}")
    if targets.dim() != 1 or targets.shape[0] != n_rows:
        raise ValueError(f"{op}: targets must have shape ({n_rows},) to match the rows, "
                         f"got {tuple(targets.shape)}")


def check_reduction(reduction: str, op: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"{op}: reduction must be one of {REDUCTIONS}, got {reduction!r}")


def check_ignore_index(ignore_index, op: str) -> None:
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"{op}: ignore_index must be an int (a target value to leave out), got "
                        f"{ignore_index!r}")


def grad_scale(targets: torch.Tensor, ignore_index: int, reduction: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, n_valid) as fp32 one-element tensors on the targets' device, without a host sync.
    scale is 1/n_valid for "mean" and 1 otherwise; n_valid is clamped to 1 so that a batch of only
    ignored rows gives loss 0 (sum of zeros / 1) instead of 0/0."""
    n_valid = (targets != ignore_index).sum(dtype=torch.float32).clamp_(min=1.0).reshape(1)
    if reduction == "mean":
        return n_valid.reciprocal(), n_valid
    return torch.ones(1, dtype=torch.float32, device=targets.device), n_valid


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (n >= 1). triton.next_power_of_2 is a constexpr_function: ~3 us a
    call on the host."""
    return 1 << (n - 1).bit_length()


def block_v(n_cols: int) -> int:
    return min(next_power_of_2(n_cols), MAX_BLOCK_V)


def num_warps(block: int) -> int:
    # About 32 fp32 values a thread; a warp is 32 threads.
    return max(1, min(32, block // 1024))


class _Configs:
    """(BLOCK_V, num_warps) per (vocabulary, dtype, gradient or not, device): the fastest of CANDIDATES
    that fit the vocabulary, timed once on TUNE_ROWS scratch rows (a few seconds of compilation, then
    milliseconds), and the rule (`block_v`, `num_warps`) wherever timing is not possible or not wanted:
    under the interpreter, off CUDA, while torch.compile traces or a CUDA graph is captured, and in
    deterministic runs (another block size sums the row in another order; a timing-based choice could
    differ between a run and its resume)."""

    def __init__(self):
        self.chosen: dict[tuple, tuple[int, int]] = {}
        self.time = _time_on_gpu  # time(n_cols, dtype, compute_grad, device, block, warps) -> ms

    def __call__(self, n_cols: int, dtype: torch.dtype, compute_grad: bool, device: torch.device):
        block = block_v(n_cols)
        rule = (block, num_warps(block))
        if (INTERPRETED or device.type != "cuda" or torch.are_deterministic_algorithms_enabled()
                or torch.compiler.is_compiling() or torch.cuda.is_current_stream_capturing()):
            return rule
        key = (n_cols, dtype, compute_grad, device.index)
        found = self.chosen.get(key)
        if found is None:
            fitting = [c for c in CANDIDATES if c[0] <= next_power_of_2(n_cols)]  # no wider than the row
            options = fitting if rule in fitting else [rule, *fitting]
            if len(options) > 1:
                found = min(options, key=lambda c: self.time(n_cols, dtype, compute_grad, device, *c))
            else:
                found = rule
            self.chosen[key] = found
        return found


def _time_on_gpu(n_cols, dtype, compute_grad, device, block, warps, reps: int = 10) -> float:
    """Milliseconds per launch of the kernel on TUNE_ROWS random rows (compiled and run once first)."""
    gen = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(TUNE_ROWS, n_cols, device=device, dtype=dtype, generator=gen)
    targets = torch.randint(0, n_cols, (TUNE_ROWS,), device=device, generator=gen)
    loss = torch.empty(TUNE_ROWS, dtype=torch.float32, device=device)
    grad = torch.empty_like(logits) if compute_grad else None  # not in place: every run reads the logits
    scale = torch.ones(1, dtype=torch.float32, device=device)
    run = lambda: _launch_rows(logits, targets, loss, grad, scale, -100, False, block, warps)  # noqa: E731
    run()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        run()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


_CONFIGS = _Configs()


def launch(logits: torch.Tensor, targets: torch.Tensor, loss_rows: torch.Tensor, grad: torch.Tensor | None,
           scale: torch.Tensor, ignore_index: int, *, scale_per_row: bool = False,
           block: int | None = None) -> None:
    """Run the kernel over rows of already validated 2-D tensors (logits with unit column stride).
    Writes the per-row loss into loss_rows (fp32) and, when grad is given, the scaled gradient into grad
    (which may be logits itself). Shared with the fused linear cross-entropy, which calls it per chunk."""
    n_rows, n_cols = logits.shape
    if n_rows == 0:
        return
    compute_grad = grad is not None
    if block is None:
        block, warps = _CONFIGS(n_cols, logits.dtype, compute_grad, logits.device)
    else:
        warps = num_warps(block)
    _launch_rows(logits, targets, loss_rows, grad, scale, ignore_index, scale_per_row, block, warps)


def _launch_rows(logits, targets, loss_rows, grad, scale, ignore_index, scale_per_row, block, warps):
    compute_grad = grad is not None
    _LAUNCH((logits.shape[0],),
            (logits, logits.stride(0),
             grad if compute_grad else logits, grad.stride(0) if compute_grad else 0,
             targets, loss_rows, scale, logits.shape[1], ignore_index),
            dict(BLOCK_V=block, COMPUTE_GRAD=compute_grad, SCALE_PER_ROW=scale_per_row, num_warps=warps))


def cross_entropy_forward(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                          reduction: str = "mean", *, compute_grad: bool = True, inplace: bool = False,
                          block: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Validate, launch, reduce. Returns (loss fp32: scalar or (N,), grad (N, V) in logits' dtype or None).
    With inplace, grad is logits itself (its values replaced by the gradient)."""
    op = "cross_entropy"
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{op}: logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() != 2:
        raise ValueError(f"{op}: logits must be 2-D (N, V), got shape {tuple(logits.shape)}")
    if logits.dtype not in LOGIT_DTYPES:
        raise TypeError(f"{op}: logits must be float32, float16 or bfloat16, got {logits.dtype}")
    n_rows, n_cols = logits.shape
    if n_cols == 0:
        raise ValueError(f"{op}: logits have an empty vocabulary dimension, shape {tuple(logits.shape)}")
    check_targets(targets, n_rows, op)
    check_reduction(reduction, op)
    check_ignore_index(ignore_index, op)
    check_device(logits, targets, op=op)
    if block is not None and (block < 16 or block & (block - 1)):
        raise ValueError(f"{op}: block must be a power of two >= 16, got {block}")

    if logits.stride(1) != 1:
        logits = logits.contiguous()  # the kernel walks columns with unit stride (in place fills the copy)
    targets = targets.contiguous()
    scale, n_valid = grad_scale(targets, ignore_index, reduction)
    loss_rows = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    grad = None
    if compute_grad:
        grad = logits if inplace else torch.empty_like(logits, memory_format=torch.contiguous_format)
    launch(logits, targets, loss_rows, grad, scale, ignore_index, block=block)

    if reduction == "none":
        return loss_rows, grad
    loss = loss_rows.sum()
    return (loss / n_valid[0] if reduction == "mean" else loss), grad


class _CrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, ignore_index, reduction, inplace, grad_enabled):
        # needs_input_grad says yes under no_grad too (evaluation): then the loss only, logits untouched
        compute_grad = ctx.needs_input_grad[0] and grad_enabled
        loss, grad = cross_entropy_forward(logits, targets, ignore_index, reduction,
                                           compute_grad=compute_grad, inplace=inplace and compute_grad)
        if inplace and compute_grad:
            # The logits now hold the gradient: let autograd catch any op that saved them for its backward.
            torch.autograd.graph.increment_version(logits)
        ctx.reduction = reduction
        ctx.used = False
        if compute_grad:
            ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        refuse_create_graph("cross_entropy", "torch.nn.functional.cross_entropy")
        if ctx.used:
            raise RuntimeError("cross_entropy: backward ran twice through the same graph; the stored "
                               "gradient is scaled in place to save memory. HINT: recompute the loss "
                               "instead of retain_graph=True")
        ctx.used = True
        (grad,) = ctx.saved_tensors
        if ctx.reduction == "none":
            grad.mul_(grad_output.unsqueeze(1))
        else:
            grad.mul_(grad_output)
        return grad, None, None, None, None, None


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                  reduction: str = "mean", inplace: bool = False) -> torch.Tensor:
    """Cross-entropy of logits (..., V) against class indices targets (...), as fp32.

    reduction: "mean" (over rows whose target is not ignore_index; 0 when there are none), "sum", or
    "none" (a loss per row, shaped like targets, 0 at ignored rows). inplace: write the gradient into the
    logits' storage (see the module docstring for when that is safe)."""
    if not isinstance(logits, torch.Tensor) or not isinstance(targets, torch.Tensor):
        raise TypeError("cross_entropy: logits and targets must be torch.Tensors, got "
                        f"{type(logits).__name__} and {type(targets).__name__}")
    if logits.dim() < 1 or tuple(targets.shape) != tuple(logits.shape[:-1]):
        raise ValueError("cross_entropy: targets must have the logits' shape without the last (vocabulary) "
                         f"dimension, got logits {tuple(logits.shape)} and targets {tuple(targets.shape)}")
    out_shape = targets.shape
    n_rows = targets.numel()  # not reshape(-1, V): ambiguous when there are no elements
    loss = _CrossEntropyFunction.apply(logits.reshape(n_rows, logits.shape[-1]), targets.reshape(n_rows),
                                       ignore_index, reduction, inplace, torch.is_grad_enabled())
    return loss.reshape(out_shape) if reduction == "none" else loss
