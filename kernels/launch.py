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

An op that launches several kernels per call goes one step further with a `LaunchPlan`: a `Recording`
passed to the launchers keeps each direct launch (kernel, grid, every non-tensor argument, and which of
the call's tensors went where); later calls with the same key, one the op derives from what its launches
depend on, replay them with their own tensors, one call of each kernel's launcher. The signature, the
grid function, the tuning lookup and the argument lists are then built once per key instead of per launch.

Both kinds of direct launch also go around the Python half of Triton's CUDA launcher and give the C half
addresses instead of tensors (`kernel_launcher`): for every tensor argument of every launch, that C half
calls the tensor's `data_ptr()` method and asks the driver (cuPointerGetAttribute) whether the address is
device memory, a Python call and a driver call per tensor. The tensors of a direct launch are CUDA
tensors of the current device already (the ops check their inputs and allocate their outputs beside them).
"""

from __future__ import annotations

import torch
import triton
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


# The launcher layout `kernel_launcher` knows: Triton 3.6's CudaLauncher (triton/backends/nvidia/driver.py).
_RAW_LAUNCHER_VERSIONS = ("3.6.",)
RAW_LAUNCH = True  # (switched off by the benchmarks, to compare the two paths in one run)


def kernel_launcher(run) -> tuple:
    """(launch, head, addresses) for a compiled kernel's launcher `run` (CompiledKernel.run): a direct
    launch calls `launch(grid_x, grid_y, grid_z, stream, function, *head, packed_metadata, launch_metadata,
    enter_hook, exit_hook, *args)`, with each tensor argument given as its address where `addresses`.

    For Triton 3.6's CUDA launcher, `launch` is its C function, `head` what the launcher's Python
    `__call__` would put before the metadata (the cooperative-grid and PDL flags, no scratch buffers) and
    the tensors go as addresses: a launch skips that Python frame (and the two scratch allocators it asks
    for a kernel that needs none), and the C function's data_ptr() call and driver query per tensor.
    Anything else (a kernel that needs scratch memory, a launcher that unpacks tensor descriptors in
    Python, another Triton version or backend, RAW_LAUNCH off) keeps `run` itself, given tensors: the
    launch Triton makes, less its per-call Python path."""
    fits = (RAW_LAUNCH and triton.__version__.startswith(_RAW_LAUNCHER_VERSIONS)
            and type(run).__name__ == "CudaLauncher"
            and getattr(run, "global_scratch_size", None) == 0
            and getattr(run, "profile_scratch_size", None) == 0
            # (the generated C function, not the Python wrapper that unpacks tensor descriptors)
            and getattr(getattr(run, "launch", None), "__name__", None) == "launch"
            and hasattr(run, "launch_cooperative_grid") and hasattr(run, "launch_pdl"))
    if not fits:
        return run, (), False
    return run.launch, (run.launch_cooperative_grid, run.launch_pdl, None, None), True


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

    def __call__(self, grid, args: tuple, kwargs: dict, recording: Recording | None = None) -> None:
        if not self.direct or not direct_launches_allowed(self.fn):
            self.fn[grid](*args, **kwargs)
            if recording is not None:
                recording.missed()
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
                launch, head, addresses = kernel_launcher(kernel.run)
                pointers = tuple(i for i, a in enumerate(args) if addresses and isinstance(a, torch.Tensor))
                self.kernels[key] = (launch, head, kernel.function, kernel.packed_metadata, tail, pointers)
            if recording is not None:
                recording.missed()
            return
        launch, head, function, metadata, tail, pointers = found
        grid = grid(kwargs) if callable(grid) else grid
        grid = (grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1)
        tail_values = tuple(kwargs[name] for name in tail)
        values = args
        if pointers:
            values = list(args)
            for i in pointers:
                values[i] = args[i].data_ptr()
        # no launch metadata and no enter/exit hooks: none is registered (checked above)
        launch(*grid, self.current_stream(device), function, *head, metadata, None, None, None, *values,
               *tail_values)
        self.hits += 1
        if recording is not None:
            recording.add(self, device, (launch, head, bool(pointers)), function, metadata, grid, args,
                          tail_values)


def direct_launches_allowed(*fns) -> bool:
    """Whether launches of these @triton.jit functions may skip Triton's launch path: not while dynamo
    traces (it captures Triton's own launch), nor while a launch hook or a pre-run hook is registered."""
    return not (torch.compiler.is_compiling() or _registered(knobs.runtime.launch_enter_hook)
                or _registered(knobs.runtime.launch_exit_hook)
                or any(getattr(fn, "pre_run_hooks", None) for fn in fns))


class Recording:
    """The direct launches of one call of an op (several kernels, e.g. attention's backward), kept so that
    later calls with the same key replay them (LaunchPlan). `tensors` are all the call's tensors, inputs
    and outputs; each launch's tensor arguments are found among them by identity, so a replay can pass
    its own call's tensors in their places. A launch that went through Triton (tuning, compiling, a hook),
    or one that takes a tensor not among them, leaves the recording incomplete: no plan is made of it."""

    def __init__(self, tensors: tuple):
        self.tensors = tensors
        self.launches: list[tuple] = []
        self.launchers: list[CachedLauncher] = []
        self.device = None
        # One tensor in two places (attention(x, x, x)) makes the places ambiguous: its launches would be
        # recorded at the first, and a later call with distinct tensors there would be given that one in
        # all of them. Such a call makes no plan (it may replay one made by a call without aliasing).
        self.complete = len({id(t) for t in tensors}) == len(tensors)

    def missed(self) -> None:
        self.complete = False

    def add(self, launcher: CachedLauncher, device, run: tuple, function, metadata, grid: tuple, args: tuple,
            tail_values: tuple) -> None:
        """run: kernel_launcher's (launch, head, addresses) (addresses: whether this launch takes any)."""
        n = 0
        while n < len(args) and isinstance(args[n], torch.Tensor):
            n += 1
        slots = []
        for arg in args[:n]:
            slot = next((i for i, t in enumerate(self.tensors) if t is arg), None)
            if slot is None:
                self.complete = False
                return
            slots.append(slot)
        scalars = args[n:] + tail_values
        if any(isinstance(a, torch.Tensor) for a in scalars) or self.device not in (None, device):
            self.complete = False
            return
        self.device = device
        self.launchers.append(launcher)
        self.launches.append((run, function, metadata, grid, tuple(slots), scalars))

    def plan(self) -> LaunchPlan | None:
        return LaunchPlan(self) if self.complete and self.launches else None


class LaunchPlan:
    """Replays a complete Recording: `plan(tensors)` launches the same kernels with the same grids and
    non-tensor arguments, each tensor argument taken from `tensors` at the place the recorded call had it.
    One call to each kernel's launcher and nothing else per launch (no signature, no dict of options, no
    grid function): the caller's key must fix everything else that the recorded launches depended on (the
    shapes, strides and dtypes of the tensors, the 16-byte alignment of their data, the scalar arguments,
    the tuned configs). Returns False, launching nothing, where a replay would not be the launches Triton
    makes: another current device, a hook registered, or dynamo tracing."""

    def __init__(self, recording: Recording):
        self.launches = tuple(recording.launches)
        self.fns = tuple({id(launcher.fn): launcher.fn for launcher in recording.launchers}.values())
        first = recording.launchers[0]
        self.current_device, self.current_stream = first.current_device, first.current_stream
        self.device = recording.device
        self.replays = 0  # (read by tests)

    def __call__(self, tensors: tuple) -> bool:
        if not direct_launches_allowed(*self.fns) or self.current_device() != self.device:
            return False
        stream = self.current_stream(self.device)
        for (launch, head, addresses), function, metadata, (x, y, z), slots, scalars in self.launches:
            launch(x, y, z, stream, function, *head, metadata, None, None, None,
                   *[tensors[i].data_ptr() if addresses else tensors[i] for i in slots], *scalars)
        self.replays += 1
        return True


def aligned(tensors: tuple) -> tuple[bool, ...]:
    """Whether each tensor's data is 16-byte aligned (Triton specializes pointer arguments on that)."""
    return tuple(t.data_ptr() % 16 == 0 for t in tensors)


def _registered(hook) -> bool:
    # Triton 3.6 keeps hooks in a (possibly empty) HookChain; older versions used None or a function
    return hook is not None and getattr(hook, "calls", True) != []


def refuse_create_graph(op: str, alternative: str) -> None:
    """In a kernel's autograd backward: RuntimeError when asked to build a graph (create_graph=True turns
    grad mode on inside a backward). The kernels' gradients carry none, so a second derivative through them
    would be dropped without a word; `alternative` names the torch function that supports it."""
    if torch.is_grad_enabled():
        raise RuntimeError(f"{op}: backward with create_graph=True (a second derivative) is not supported: "
                           f"the gradient comes from Triton kernels, without a graph. HINT: use "
                           f"{alternative} where second derivatives are needed")
