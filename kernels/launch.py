"""Launching a compiled Triton kernel again without Triton's per-call launch path.

`kernel[grid](*args, **kwargs)` binds and specializes every argument, builds a cache key string, checks the
kernel's globals, builds launch metadata for profiler hooks and calls the (empty) hook chains, on every
launch. On a GPU server's host this is tens of microseconds per launch, several times the work of the
launch itself, and flash attention's forward + backward makes three of them per layer.

`CachedLauncher` launches through Triton the first time it sees an argument signature and keeps the
compiled kernel Triton returns; later launches with the same signature call that kernel's launcher
directly. The signature is finer than Triton's specialization, so a kept kernel is only reused where Triton
would have picked the same one:

- tensors: dtype, and whether the data pointer is 16-byte aligned (Triton's pointer specialization);
- ints: the exact value (Triton specializes on value 1, divisibility by 16 and the i32/i64 range);
- floats: the type only (Triton never specializes a float argument);
- anything else (bools, None, strings) and every keyword argument (constexprs, num_warps, ...): by value;
- the current CUDA device (a compiled kernel is loaded per device).

Triton's path is kept where the direct one would skip something or not be understood: under the
interpreter, while a launch hook or a pre-run hook of the kernel is registered (profilers such as proton
use them), and while torch.compile traces (dynamo captures `kernel[grid](...)` calls as user-defined Triton
kernels).
"""

from __future__ import annotations

import torch
from triton import knobs

# distinct signatures kept per kernel before the cache is emptied (varying shapes would grow it forever)
MAX_SIGNATURES = 512


def signature(args: tuple, kwargs: dict) -> tuple:
    """What decides which compiled kernel Triton launches for these arguments (see the module doc)."""
    sig = []
    for a in args:
        kind = type(a)
        if kind is int:
            sig.append(a)
        elif kind is float:
            sig.append(float)
        elif isinstance(a, torch.Tensor):
            sig.append((a.dtype, a.data_ptr() % 16 == 0))
        else:
            sig.append((kind, a))
    sig.append(tuple(kwargs.items()))
    return tuple(sig)


class CachedLauncher:
    """`launcher(grid, args, kwargs)` launches `jit_fn` like `jit_fn[grid](*args, **kwargs)`. grid is a
    tuple, or a callable given kwargs (the constexprs and launch options, e.g. BLOCK_M) that returns one."""

    def __init__(self, jit_fn, direct: bool = True):
        self.fn = jit_fn
        self.direct = direct  # False under the interpreter: it has no compiled kernels
        self.kernels: dict[tuple, tuple] = {}
        self.hits = 0  # direct launches (read by tests)
        self.current_device = torch.cuda.current_device
        # the raw stream handle, as Triton reads it (no Stream object per launch)
        self.current_stream = (getattr(torch._C, "_cuda_getCurrentRawStream", None)
                               or (lambda device: torch.cuda.current_stream(device).cuda_stream))

    def __call__(self, grid, args: tuple, kwargs: dict) -> None:
        if (not self.direct or torch.compiler.is_compiling()  # dynamo captures Triton's own launch
                or _registered(knobs.runtime.launch_enter_hook) or _registered(knobs.runtime.launch_exit_hook)
                or getattr(self.fn, "pre_run_hooks", None)):
            self.fn[grid](*args, **kwargs)
            return
        device = self.current_device()
        key = (device, signature(args, kwargs))
        found = self.kernels.get(key)
        if found is None:
            kernel = self.fn[grid](*args, **kwargs)
            # every parameter in order, constexprs included (the launcher skips those); kept only for a
            # CompiledKernel (not a future of one) whose parameters the call named (no defaults used)
            tail = tuple(self.fn.arg_names[len(args):])
            if hasattr(kernel, "packed_metadata") and all(name in kwargs for name in tail):
                if len(self.kernels) >= MAX_SIGNATURES:
                    self.kernels.clear()
                self.kernels[key] = (kernel.run, kernel.function, kernel.packed_metadata, tail)
            return
        run, function, metadata, tail = found
        grid = grid(kwargs) if callable(grid) else grid
        stream = self.current_stream(device)
        grid_y, grid_z = (grid[1] if len(grid) > 1 else 1), (grid[2] if len(grid) > 2 else 1)
        # no launch metadata and no enter/exit hooks: none is registered (checked above)
        run(grid[0], grid_y, grid_z, stream, function, metadata, None, None, None,
            *args, *(kwargs[name] for name in tail))
        self.hits += 1


def _registered(hook) -> bool:
    # Triton 3.6 keeps hooks in a (possibly empty) HookChain; older versions used None or a function
    return hook is not None and getattr(hook, "calls", True) != []
