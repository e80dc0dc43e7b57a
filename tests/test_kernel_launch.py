"""The kernels' launch path (fastlm.kernels.launch): the first launch of an argument signature goes through
Triton, later ones call the compiled kernel's launcher directly, and only where Triton would have launched
the same compiled kernel.

On CPU a stand-in for a @triton.jit function records both kinds of launch, and the replays of launch plans
(a call's direct launches kept and replayed with a later call's tensors); on a GPU the real kernels run
through Triton, directly and replayed, and must give the same results, also for inputs whose alignment
asks Triton for another specialization.
"""

from __future__ import annotations

import os
import sys
import textwrap

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fastlm.kernels  # noqa: E402,F401  (the modules below are reached through sys.modules)
from triton import knobs  # noqa: E402
from conftest import assert_lowers_to_sm90  # noqa: E402

launch_mod = sys.modules["fastlm.kernels.launch"]
CachedLauncher, signature = launch_mod.CachedLauncher, launch_mod.signature
Recording = launch_mod.Recording

STREAM = 1234


class FakeCompiled:
    """What Triton returns from a launch: the launcher (run), the loaded function and the packed metadata."""

    def __init__(self, log, n):
        self.log, self.function, self.packed_metadata = log, f"function {n}", f"metadata {n}"

    @property
    def run(self):
        return lambda *args: self.log.append(("direct", args))


class FakeJit:
    arg_names = ["X", "n", "scale", "BLOCK"]

    def __init__(self):
        self.log = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.log.append(("triton", grid, args, kwargs))
            return FakeCompiled(self.log, len(self.log))
        return launch


def _launcher(direct=True):
    jit = FakeJit()
    launcher = CachedLauncher(jit, direct=direct)
    launcher.current_device = lambda: 0
    launcher.current_stream = lambda device: STREAM + device
    return jit, launcher


def _grid(meta):
    return (meta["BLOCK"] * 2,)


def test_second_launch_is_direct_with_every_parameter_in_order():
    jit, launcher = _launcher()
    x = torch.zeros(64)
    launcher(_grid, (x, 10, 0.5), {"BLOCK": 16, "num_warps": 4})
    launcher(_grid, (x, 10, 0.5), {"BLOCK": 16, "num_warps": 4})
    assert [entry[0] for entry in jit.log] == ["triton", "direct"]
    assert jit.log[0][2:] == ((x, 10, 0.5), {"BLOCK": 16, "num_warps": 4})
    # grid from the constexprs, 1 for missing grid dimensions, the stream, the first launch's kernel, no
    # launch metadata or hooks, then every parameter in order: the constexpr BLOCK too, num_warps not (a
    # launcher other than Triton 3.6's CUDA one is given the tensors themselves, as Triton gives them)
    assert jit.log[1][1] == (32, 1, 1, STREAM, "function 1", "metadata 1", None, None, None, x, 10, 0.5, 16)
    assert launcher.hits == 1


@pytest.mark.parametrize("change",
                         ["int value", "alignment", "dtype", "constexpr", "option", "device", "bool"])
def test_another_specialization_goes_through_triton(change):
    jit, launcher = _launcher()
    x = torch.zeros(64)
    args, kwargs = (x, 16, 0.5), {"BLOCK": 16, "num_warps": 4}
    launcher(_grid, args, kwargs)
    if change == "int value":
        args = (x, 17, 0.5)  # Triton specializes on divisibility by 16
    elif change == "alignment":
        args = (x[1:], 16, 0.5)  # 4 bytes in: not 16-byte aligned
    elif change == "dtype":
        args = (x.to(torch.float16), 16, 0.5)
    elif change == "constexpr":
        kwargs = {"BLOCK": 32, "num_warps": 4}
    elif change == "option":
        kwargs = {"BLOCK": 16, "num_warps": 8}
    elif change == "device":
        launcher.current_device = lambda: 1
    elif change == "bool":
        args = (x, True, 0.5)  # equal to 1 and hashed alike, but another type for Triton
        launcher(_grid, (x, 1, 0.5), kwargs)
    launcher(_grid, args, kwargs)
    assert jit.log[-1][0] == "triton"
    launcher(_grid, args, kwargs)
    assert jit.log[-1][0] == "direct"
    assert jit.log[-1][1][4] == f"function {len(jit.log) - 1}"  # the kernel Triton launched for it


def test_floats_are_not_part_of_the_signature():
    jit, launcher = _launcher()
    x = torch.zeros(64)
    launcher(_grid, (x, 16, 0.5), {"BLOCK": 16})
    launcher(_grid, (x, 16, 0.25), {"BLOCK": 16})
    assert jit.log[-1] == ("direct",
                           (32, 1, 1, STREAM, "function 1", "metadata 1", None, None, None, x, 16, 0.25, 16))


def test_triton_launches_while_a_hook_is_registered_or_interpreting():
    jit, launcher = _launcher()
    x = torch.zeros(64)
    launcher(_grid, (x, 16, 0.5), {"BLOCK": 16})

    def hook(metadata):
        pass

    knobs.runtime.launch_enter_hook.add(hook)  # e.g. a profiler
    try:
        launcher(_grid, (x, 16, 0.5), {"BLOCK": 16})
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
    assert [entry[0] for entry in jit.log] == ["triton", "triton"]
    launcher(_grid, (x, 16, 0.5), {"BLOCK": 16})
    assert jit.log[-1][0] == "direct"

    jit.pre_run_hooks = [hook]  # a hook of the kernel itself
    launcher(_grid, (x, 16, 0.5), {"BLOCK": 16})
    assert jit.log[-1][0] == "triton"

    jit, interpreted = _launcher(direct=False)
    for _ in range(2):
        interpreted(_grid, (x, 16, 0.5), {"BLOCK": 16})
    assert [entry[0] for entry in jit.log] == ["triton", "triton"] and interpreted.kernels == {}


def test_unnamed_parameters_and_too_many_signatures_are_not_kept(monkeypatch):
    jit, launcher = _launcher()
    x = torch.zeros(64)
    launcher(_grid, (x, 16, 0.5), {"num_warps": 4})  # BLOCK left to a default: cannot be passed directly
    assert launcher.kernels == {}
    monkeypatch.setattr(launch_mod, "MAX_SIGNATURES", 2)
    for n in range(5):
        launcher(_grid, (x, n, 0.5), {"BLOCK": 16})
    assert 1 <= len(launcher.kernels) <= 2


def test_signature():
    x = torch.zeros(8, dtype=torch.bfloat16)
    assert signature((x, 3, 0.5, None), {"A": 1}) == ((torch.bfloat16, True), 3, float, (type(None), None),
                                                      (("A", 1),))
    assert signature((x[1:],), {})[0] == (torch.bfloat16, False)
    assert signature((True,), {}) != signature((1,), {})


# For the scripts below: Triton's CUDA launcher for a kernel without scratch memory, whose C half (not
# compiled: that needs the CUDA driver) hands `record` what it is given less the flags and scratch buffers
# its Python half puts after the function; a direct launch gives it each tensor as its address, and a
# stand-in finds the tensors there among the launching frames' variables (the launcher's argument list,
# the plan's tensors, the op's locals), where they are alive while it runs.
TENSORS_AT = textwrap.dedent("""
    import sys
    import torch
    from triton.backends.nvidia.driver import CudaLauncher

    def c_launcher(record):
        def launch(*args):
            assert args[5:9] == (False, False, None, None), args[5:9]
            record(*args[:5], *args[9:])
        run = CudaLauncher.__new__(CudaLauncher)
        run.launch, run.num_ctas, run.global_scratch_size, run.profile_scratch_size = launch, 1, 0, 0
        run.launch_cooperative_grid = run.launch_pdl = False
        return run

    def tensors_at(address):
        found, frame = [], sys._getframe(1)
        while frame is not None:
            for value in frame.f_locals.values():
                for t in (value if isinstance(value, (tuple, list)) else (value,)):
                    if isinstance(t, torch.Tensor) and t.data_ptr() == address:
                        found.append(t)
            frame = frame.f_back
        return found
""")


def _cuda_launcher(**metadata):
    """Triton's CUDA launcher for a kernel with `metadata` (no scratch memory unless given), built without
    compiling its C half: `launch` records what it is given."""
    driver = pytest.importorskip("triton.backends.nvidia.driver")
    calls = []

    def launch(*args):  # (named as the generated C function is)
        calls.append(args)

    run = driver.CudaLauncher.__new__(driver.CudaLauncher)
    run.launch, run.num_ctas = launch, 1
    defaults = dict(global_scratch_size=0, global_scratch_align=1, profile_scratch_size=0,
                    profile_scratch_align=1, launch_cooperative_grid=False, launch_pdl=True)
    for name, value in {**defaults, **metadata}.items():
        setattr(run, name, value)
    return run, calls


def test_a_direct_launch_calls_tritons_c_launcher_as_tritons_python_half_would():
    run, calls = _cuda_launcher()
    launch, head, addresses = launch_mod.kernel_launcher(run)
    assert launch is run.launch and addresses  # Triton's Python __call__ skipped; tensors as addresses
    args = (8, 1, 1, STREAM, "function", "metadata", None, None, None, 1234567, 10, 0.5, 16)
    run(*args)
    launch(*args[:5], *head, *args[5:])
    assert len(calls) == 2 and calls[0] == calls[1]
    # where the layout is not the known one, the launcher itself, given tensors: a kernel that needs scratch
    # memory (its Python half allocates it per launch), a launcher that unpacks tensor descriptors in
    # Python, another Triton version, or the raw path switched off
    for needs in ({"global_scratch_size": 64}, {"profile_scratch_size": 64}):
        run, _ = _cuda_launcher(**needs)
        assert launch_mod.kernel_launcher(run) == (run, (), False)
    run, _ = _cuda_launcher()
    run.launch = lambda *args: None  # (wrap_handle_tensordesc's wrapper is a Python function of another name)
    assert launch_mod.kernel_launcher(run) == (run, (), False)
    run, _ = _cuda_launcher()
    for switch, value in (("_RAW_LAUNCHER_VERSIONS", ("2.9.",)), ("RAW_LAUNCH", False)):
        was = getattr(launch_mod, switch)
        setattr(launch_mod, switch, value)
        try:
            assert launch_mod.kernel_launcher(run) == (run, (), False)
        finally:
            setattr(launch_mod, switch, was)
    assert launch_mod.kernel_launcher(run)[0] is run.launch


def test_a_cached_launcher_launches_tritons_c_launcher_with_addresses():
    run, calls = _cuda_launcher()

    class Compiled:  # what Triton's launch returns, with a CUDA launcher
        function, packed_metadata = "function 1", "metadata 1"

    Compiled.run = run

    class Jit(FakeJit):
        def __getitem__(self, grid):
            return lambda *args, **kwargs: Compiled()

    launcher = CachedLauncher(Jit())
    launcher.current_device, launcher.current_stream = (lambda: 0), (lambda device: STREAM)
    x, y = torch.zeros(64), torch.zeros(64)
    for tensor in (x, x, y):  # through Triton, then direct
        launcher(_grid, (tensor, 10, 0.5), {"BLOCK": 16, "num_warps": 4})
    head = (False, True, None, None)  # cooperative grid, PDL, no scratch buffers
    assert calls == [(32, 1, 1, STREAM, "function 1", *head, "metadata 1", None, None, None, t.data_ptr(), 10,
                      0.5, 16) for t in (x, y)]


# --- Launch plans: a call's direct launches, replayed with another call's tensors --------------------------


def _recorded_call(launchers, tensors, n=10):
    """One call of a two-kernel op (as attention's backward): `a` reads x and writes y, `b` reads y and
    writes z. Returns the recording."""
    (jit_a, a), (jit_b, b) = launchers
    x, y, z = tensors
    recording = Recording(tensors)
    a(_grid, (x, y, n, 0.5), {"BLOCK": 16}, recording)
    b((3, 2), (y, z, n), {"BLOCK": 32}, recording)
    return recording


def _two_kernel_launchers(device=(0,)):
    """Launchers of two kernels; `device` is a list whose first item the launchers read as the current
    device (as torch.cuda.current_device reads the current state)."""
    launchers = [_launcher(), _launcher()]
    launchers[0][0].arg_names = ["X", "Y", "n", "scale", "BLOCK"]
    launchers[1][0].arg_names = ["Y", "Z", "n", "BLOCK"]
    for _, launcher in launchers:
        launcher.current_device = lambda: device[0]
    return launchers


def test_a_plan_replays_the_recorded_launches_with_the_new_calls_tensors():
    launchers = _two_kernel_launchers()
    (jit_a, a), (jit_b, b) = launchers
    first = tuple(torch.zeros(64) for _ in range(3))
    assert _recorded_call(launchers, first).plan() is None  # first sight of each signature: Triton's launch
    recording = _recorded_call(launchers, first)  # direct
    plan = recording.plan()
    direct = (jit_a.log[-1], jit_b.log[-1])
    assert direct[0][0] == direct[1][0] == "direct"
    second = tuple(torch.zeros(64) for _ in range(3))
    assert plan(second) and plan.replays == 1
    replayed = (jit_a.log[-1], jit_b.log[-1])
    # the same grids, stream, kernels and scalars, each tensor the new call's at the recorded call's place
    for (kind, was), (again, now), slots in zip(direct, replayed, ((0, 1), (1, 2))):
        assert again == "direct" and now[:9] == was[:9] and now[11:] == was[11:]
        assert now[9] is second[slots[0]] and now[10] is second[slots[1]]
    assert now[:3] == (3, 2, 1)  # a grid given as a tuple, padded to three dimensions
    assert a.hits == b.hits == 1  # the replay went around the launchers


def test_no_plan_where_a_launch_was_not_direct_or_takes_an_unknown_tensor():
    launchers = _two_kernel_launchers()
    tensors = tuple(torch.zeros(64) for _ in range(3))
    _recorded_call(launchers, tensors)
    assert _recorded_call(launchers, tensors).plan() is not None
    # a tensor argument that is not one of the call's tensors: a replay could not know what to pass
    (jit_a, a), _ = launchers
    recording = Recording(tensors[:1])
    a(_grid, (tensors[0], torch.zeros(64), 10, 0.5), {"BLOCK": 16}, recording)
    assert jit_a.log[-1][0] == "direct" and recording.plan() is None
    # a launch through Triton (here: another specialization, n = 16 is divisible by 16) in the call
    assert _recorded_call(launchers, tensors, n=16).plan() is None
    assert Recording(tensors).plan() is None  # nothing launched
    # one tensor in two of the call's places: which place a launch took it from is unknown
    assert _recorded_call(launchers, (tensors[0], tensors[1], tensors[0])).plan() is None


def test_a_plan_does_not_replay_under_a_hook_or_on_another_device():
    device = [0]
    launchers = _two_kernel_launchers(device)
    (jit_a, a), (jit_b, b) = launchers
    tensors = tuple(torch.zeros(64) for _ in range(3))
    _recorded_call(launchers, tensors)
    plan = _recorded_call(launchers, tensors).plan()
    logged = len(jit_a.log) + len(jit_b.log)

    def hook(metadata):
        pass

    knobs.runtime.launch_enter_hook.add(hook)
    try:
        assert not plan(tensors)
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
    jit_b.pre_run_hooks = [hook]  # a hook of one of the plan's kernels
    assert not plan(tensors)
    jit_b.pre_run_hooks = []
    device[0] = 1  # the kernels were loaded on device 0
    assert not plan(tensors)
    assert len(jit_a.log) + len(jit_b.log) == logged and plan.replays == 0
    device[0] = 0
    assert plan(tensors) and plan.replays == 1


def test_direct_launch_passes_what_tritons_binder_binds():
    # A direct launch hands the compiled kernel's launcher `args + the remaining parameters in order` (the
    # constexprs from the keyword arguments); Triton's own launch hands it its binder's values. Both must
    # be the same list for every kernel, or a direct launch would feed the kernel shifted arguments. Checked
    # with the real launchers and Triton's binder for an H100 (no GPU needed): each kernel's first launch
    # goes to a stand-in that binds the arguments as Triton would, the second launch is direct into a
    # stand-in launcher that records what it is given, and so is the third, a launch plan's replay.
    code = TENSORS_AT + textwrap.dedent("""
        import sys, torch
        from triton.backends.compiler import GPUTarget
        from triton.compiler.compiler import make_backend
        from triton.runtime.jit import create_function_from_signature
        import fastlm.kernels
        fa = sys.modules["fastlm.kernels.flash_attention"]
        ce = sys.modules["fastlm.kernels.cross_entropy"]
        backend = make_backend(GPUTarget("cuda", 90, 32))
        bound, launched = {}, {}

        class Compiled:
            def __init__(self, name):
                self.function, self.packed_metadata = "function", "metadata"
                # (after grid, stream, ...; each tensor is given as its address: the layouts of the
                # tensors there are looked up while the launch's tensors are alive)
                self.run = c_launcher(lambda *a: launched.setdefault(name, []).append(
                    [(x, {(t.shape, t.stride(), t.dtype) for t in tensors_at(x)})
                     if type(x) is int and x > 2**16 else (x, None) for x in a[9:]]))

        class Jit:  # binds like Triton's launch, returns a compiled kernel
            def __init__(self, fn):
                self.fn, self.arg_names = fn, fn.arg_names
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    binder = create_function_from_signature(self.fn.signature, self.fn.params, backend)
                    bound[self.fn.__name__] = list(binder(*args, **kwargs)[0].values())
                    return Compiled(self.fn.__name__)
                return launch

        for launcher in (fa._FWD.launch, fa._BWD_Q.launch, fa._BWD_KV.launch, fa._BWD_KV_ATOMIC.launch,
                         fa._PREP, fa._SCALE_CAST, ce._LAUNCH):
            launcher.fn, launcher.direct = Jit(launcher.fn), True
            launcher.current_device, launcher.current_stream = (lambda: 0), (lambda device: 0)
        fa._INTERPRET = True  # CPU tensors past the device check
        torch.use_deterministic_algorithms(True)  # the fixed configs: no autotuning runs
        q = torch.randn(2, 4, 40, 64, dtype=torch.bfloat16)
        kv = torch.randn(2, 40, 2, 2, 64, dtype=torch.bfloat16)  # GQA, strided k and v as in the model
        logits, targets = torch.randn(8, 300, dtype=torch.bfloat16), torch.randint(0, 300, (8,))
        kernels = {"separate": ["_bwd_kv_kernel", "_bwd_q_kernel", "_cross_entropy_kernel", "_fwd_kernel"],
                   "atomic": ["_bwd_kv_kernel", "_bwd_prep_kernel", "_cross_entropy_kernel", "_fwd_kernel",
                              "_scale_cast_kernel"]}
        for mode in kernels:  # both ways of computing dq (deterministic runs only take "separate")
            fa._dq_mode = lambda key, device: mode
            launched.clear()  # (bound: a launcher that is direct already keeps what it bound before)
            fa._PLANS.clear()
            for call in range(3):  # through Triton's binder, then direct, then replayed (a launch plan)
                replays = sum(plan.replays for plan in fa._PLANS.values())
                qq = q.clone().requires_grad_()
                k, v = (kv[:, :, i].transpose(1, 2).requires_grad_() for i in range(2))
                fastlm.kernels.flash_attention(qq, k, v).sum().backward()
                ce.launch(logits, targets, torch.empty(8), logits, torch.ones(1), -100)
            assert sorted(launched) == kernels[mode], (mode, sorted(launched))
            assert sum(plan.replays for plan in fa._PLANS.values()) == replays + 2  # the third fwd + bwd
            for name, launches in launched.items():
                want = bound[name]
                for args in launches:
                    assert len(args) == len(want), (mode, name, len(args), len(want))
                    for i, ((a, layouts), b) in enumerate(zip(args, want)):
                        # a tensor's address where the binder has a tensor, of a live tensor with its layout
                        same = ((b.shape, b.stride(), b.dtype) in (layouts or ())
                                if isinstance(b, torch.Tensor) else a == b and type(a) is type(b))
                        assert same, (mode, name, i, a, b)
        print("BOUND")
    """)
    assert_lowers_to_sm90(code, done="BOUND")


def test_attention_plans_replay_the_direct_launches_and_are_keyed_on_what_those_read():
    # flash attention keeps the direct launches of a forward (a backward) as a plan and replays them for
    # later calls of the same plan key. A replay must launch exactly what the direct path would for its
    # call, and a call that differs in anything the direct path reads (layout, alignment, dtype, scale,
    # mask, program order and the grid limit behind it, deterministic tiles, dq mode) must not replay
    # another call's plan. Checked with stand-in kernels (no GPU) on variants of one call: per variant the
    # direct path's launches (each tensor named by its role, or described if it is scratch) against its
    # replay; then all variants interleaved, each replaying its own plan and launching the same as before.
    code = TENSORS_AT + textwrap.dedent("""
        import sys, torch
        import fastlm.kernels
        from triton import knobs
        fa = sys.modules["fastlm.kernels.flash_attention"]
        log, raw = [], []

        class Compiled:
            def __init__(self, name):
                self.function, self.packed_metadata = name, "metadata"
                self.run = c_launcher(lambda *args: (log.append(
                    (name, tuple(tensors_at(a) if type(a) is int and a > 2**16 else a for a in args))),
                    raw.append((name, args))))

        class Jit:  # first sight of a signature: "compiles" a kernel of its own
            def __init__(self, fn):
                self.name, self.arg_names, self.compiled = fn.__name__, fn.arg_names, 0
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    self.compiled += 1
                    log.append(("triton", self.name))
                    return Compiled(f"{self.name} {self.compiled}")
                return launch

        class Chosen(dict):  # autotuning "chose" the first config of each kernel's list
            def __init__(self, config):
                self.config = dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
            def get(self, key, default=None):
                return self.config

        for launcher in (fa._FWD.launch, fa._BWD_Q.launch, fa._BWD_KV.launch, fa._BWD_KV_ATOMIC.launch,
                         fa._PREP, fa._SCALE_CAST):
            launcher.fn, launcher.direct = Jit(launcher.fn), True
            launcher.current_device, launcher.current_stream = (lambda: 0), (lambda device: 7)
        for tuned in (fa._FWD, fa._BWD_Q, fa._BWD_KV, fa._BWD_KV_ATOMIC):
            tuned.chosen = Chosen(tuned.kernel.configs[0])
            assert tuned.chosen.config != tuned.fixed  # deterministic mode launches other tiles
        fa._INTERPRET = True  # CPU tensors past the device check (the launches stay direct)

        def inputs(dtype=torch.bfloat16, seq=40, contiguous_kv=False, offset=0):
            gen = torch.Generator().manual_seed(0)
            q = torch.randn(2, 4, seq, 64, generator=gen).to(dtype)
            if offset:  # offset elements into its buffer: not 16-byte aligned
                q = torch.empty(q.numel() + offset, dtype=dtype)[offset:].view(q.shape).copy_(q)
            kv = torch.randn(2, seq, 2, 2, 64, generator=gen).to(dtype)  # GQA, strided as in the model
            k, v = (kv[:, :, i].transpose(1, 2) for i in range(2))
            if contiguous_kv:
                k, v = k.contiguous(), v.contiguous()
            return q, k, v, torch.randn(2, 4, seq, 64, generator=gen).to(dtype)

        VARIANTS = {"base": {}, "atomic dq": {"mode": "atomic"}, "deterministic": {"deterministic": True},
                    "plain program order": {"heavy_first": False}, "contiguous k, v": {"contiguous_kv": True},
                    "unaligned q": {"offset": 1}, "fp16": {"dtype": torch.float16},
                    "fp32, atomic dq": {"dtype": torch.float32, "mode": "atomic"},
                    "softmax scale": {"scale": 0.3}, "not causal": {"causal": False}, "longer": {"seq": 72},
                    # batch x heads (8) beyond the grid's second axis (limit lowered to 3): heads first
                    "not causal, grid axis full": {"causal": False, "max_grid_y": 3}}
        made = {}

        def run(variant):  # the call's tensors by role
            s = dict(VARIANTS[variant])
            fa.BWD_DQ, fa.HEAVY_FIRST = s.pop("mode", "separate"), s.pop("heavy_first", True)
            fa._MAX_GRID_Y = s.pop("max_grid_y", 65535)
            torch.use_deterministic_algorithms(s.pop("deterministic", False))
            causal, scale = s.pop("causal", True), s.pop("scale", None)
            if variant not in made:
                made[variant] = inputs(**s)
            q, k, v, do = made[variant]
            q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
            log.clear()
            raw.clear()
            out = fastlm.kernels.flash_attention(q, k, v, causal=causal, softmax_scale=scale)
            grads = torch.autograd.grad(out, (q, k, v), do)
            return dict(zip(("q", "k", "v", "do", "out", "dq", "dk", "dv"), (q, k, v, do, out, *grads)))

        def by_address(roles):
            # the launches with each address named by the role of the tensor there ("scratch" if none
            # is: lse, delta, an accumulator), the stream left out (the C++ path gives CPU tensors 0)
            where = {t.data_ptr(): role for role, t in roles.items()}
            return [(kernel, args[:3] + args[4:9] + tuple(where.get(a, "scratch") if type(a) is int and
                                                          a > 2**16 else a for a in args[9:]))
                    for kernel, args in raw]

        def call(variant):
            roles = run(variant)

            def name(a):  # a launch's tensor argument: the live tensors at its address
                if not isinstance(a, list):
                    return a
                layouts = {(t.shape, t.stride(), t.dtype) for t in a}
                for role, t in roles.items():
                    if t.data_ptr() == a[0].data_ptr() and (t.shape, t.stride(), t.dtype) in layouts:
                        return role
                return ("scratch", sorted((tuple(s), st, str(d)) for s, st, d in layouts))
            return [(kernel, args if kernel == "triton" else tuple(map(name, args))) for kernel, args in log]

        def replays():
            return sum(plan.replays for plan in fa._PLANS.values())

        expected = {}
        for variant in VARIANTS:
            fa._PLANS.clear()
            call(variant)  # new signatures go through Triton
            fa._PLANS.clear()
            direct = call(variant)
            assert direct and all(kernel != "triton" for kernel, _ in direct), (variant, direct)
            before = replays()
            assert call(variant) == direct and replays() == before + 2, variant  # forward and backward
            expected[variant] = direct
        assert len({repr(e) for e in expected.values()}) == len(expected)  # each variant launches otherwise

        fa._PLANS.clear()
        for round in range(2):
            for variant in VARIANTS:
                before = replays()
                assert call(variant) == expected[variant], (round, variant)
                # round 0 makes the plans (the forward of "atomic dq" is base's), round 1 replays them
                replayed = 2 if round else int(variant == "atomic dq")
                assert replays() == before + replayed, (round, variant)

        # The C++ host path (kernels/attention_host.cpp) on every variant: its first call runs the Python
        # path and keeps the plan that call made, its second replays that plan from C++, with outputs,
        # gradients and scratch it allocates itself (it keeps a plan only where those have the recorded
        # call's layouts: the replays counted). Both launch what the Python path's replay launches.
        host = fa._HOST
        assert host is not None, "fastlm._attention_host was not built (setup.py builds it where torch is)"
        in_python = {}
        for variant in VARIANTS:
            run(variant)
            in_python[variant] = by_address(run(variant))  # (replayed by the Python path)
        fa.HOST_PATH = fa._HOST_ON_CPU = True
        fa._PLANS.clear()
        assert host.plans() == 0  # (emptied with the Python path's)
        for variant in VARIANTS:
            before = host.replays()
            assert by_address(run(variant)) == in_python[variant], ("C++ path, first call", variant)
            assert host.replays() == before, variant
            assert by_address(run(variant)) == in_python[variant], ("C++ path, replay", variant)
            # (a q that is not 16-byte aligned makes no plan the C++ path keeps: the Python path serves it)
            assert host.replays() == before + (0 if variant == "unaligned q" else 2), variant
        # and on a packed projection (flash_attention_qkv, GQA), both dq modes (atomic dq in bf16: the C++
        # path allocates the fp32 accumulator too): addresses named by role and offset (k, v, dk, dv are
        # views into the packed input and gradient)
        torch.use_deterministic_algorithms(False)
        fa.HEAVY_FIRST, fa._MAX_GRID_Y = True, 65535
        gen = torch.Generator().manual_seed(2)
        qkv = torch.randn(2, 40, 8 * 64, generator=gen).to(torch.bfloat16)  # 4 q heads, 2 k and 2 v heads
        dout = torch.randn(2, 4, 40, 64, generator=gen).to(torch.bfloat16)

        def packed(host_path):
            fa.HOST_PATH = fa._HOST_ON_CPU = host_path
            x = qkv.detach().requires_grad_()
            raw.clear()
            out = fastlm.kernels.flash_attention_qkv(x, 4, 2)
            (grad,) = torch.autograd.grad(out, (x,), dout)
            spans = [(role, t.data_ptr(), t.data_ptr() + t.numel() * t.element_size())
                     for role, t in (("x", x), ("out", out), ("grad", grad), ("dout", dout))]

            def where(a):
                return next(((role, a - lo) for role, lo, hi in spans if lo <= a < hi), "scratch")
            return [(kernel, args[:3] + args[4:9] + tuple(where(a) if type(a) is int and a > 2**16 else a
                                                          for a in args[9:])) for kernel, args in raw]

        for mode in ("separate", "atomic"):
            fa.BWD_DQ = mode
            packed(False)
            want = packed(False)  # the Python path's replay
            before = host.replays()
            assert packed(True) == want and host.replays() == before, mode  # kept
            assert packed(True) == want and host.replays() == before + 2, mode  # replayed

        # The public functions offer each call to the C++ path before checking it: a call whose key has a
        # plan is served there unchecked (the call that made the plan passed the checks); any other is
        # checked in Python first, and a bad one fails there as it would without the C++ path.
        import numpy as np
        checked = []
        check_tensor = fa._check_tensor
        fa._check_tensor = lambda fn, name, *rest: (checked.append(name), check_tensor(fn, name, *rest))[1]

        def counts(call):  # (the arguments the Python path checked, the C++ path's replays)
            checked.clear()
            before = host.replays()
            call()
            return list(checked), host.replays() - before

        x = qkv.detach().requires_grad_()
        attention, attention_qkv = fastlm.kernels.flash_attention, fastlm.kernels.flash_attention_qkv
        assert counts(lambda: attention_qkv(x, 4, 2).backward(dout)) == ([], 2)
        assert counts(lambda: attention_qkv(x, 4, 2, causal=True, softmax_scale=None)) == ([], 1)
        fa.BWD_DQ = "separate"
        q, k, v, do = (t.detach().requires_grad_() for t in made["base"])
        assert counts(lambda: attention(q, k, v).backward(do)) == ([], 2)
        # the scale as a float: base's plan (1 / sqrt(64)); as a numpy float: checked, then the plan replayed
        assert counts(lambda: attention(q, k, v, True, 0.125).backward(do)) == ([], 2)
        numpy_scale = np.float64(0.125)
        assert counts(lambda: attention(q, k, v, True, numpy_scale).backward(do)) == (["q", "k", "v"], 2)

        class Sub(torch.Tensor):  # a subclass may mean other things by its operations: checked first
            pass
        assert counts(lambda: attention(q.as_subclass(Sub), k, v))[0] == ["q", "k", "v"]
        # a layout not seen before: checked (its kernels "compile" on the first call, its plan is made on the
        # second); then served unchecked
        q2, k2, v2 = (t.detach()[:, :, :24] for t in (q, k, v))
        thrice = [counts(lambda: attention(q2, k2, v2)) for _ in range(3)]
        assert thrice == [(["q", "k", "v"], 0), (["q", "k", "v"], 0), ([], 1)], thrice
        # bad calls with the planned tensors fail as the checks say, without the C++ path (k_meta: k's
        # layout, the key the same but for k's device)
        k_meta = torch.empty_strided(k.shape, k.stride(), dtype=k.dtype, device="meta")
        for bad, error in [
                (lambda: attention(q, k, v, causal=1), "causal must be True or False"),
                (lambda: attention(q, k, v, softmax_scale=-0.125), "softmax_scale must be a positive"),
                (lambda: attention(q, k_meta, v), "q, k, v must be on one device"),
                (lambda: attention_qkv(x, 4.0, 2), "n_head must be a positive int"),
                (lambda: attention_qkv(x, True, 2), "n_head must be a positive int"),
                (lambda: attention_qkv(x, 4), "must hold n_head + 2 * n_kv_head = 12 heads"),
                # (2**64 heads in all: an int64 sum would wrap around to 0)
                (lambda: attention_qkv(x, 2**63 - 2, 2**62 + 1), "n_kv_head = 18446744073709551616 heads")]:
            before = host.replays()
            try:
                bad()
                raise AssertionError(f"no error: {error}")
            except (TypeError, ValueError) as e:
                assert error in str(e) and host.replays() == before, (error, str(e))
        fa._check_tensor = check_tensor
        fa.HOST_PATH = fa._HOST_ON_CPU = False

        # attention of one tensor with itself, attention(x, x, x), then of distinct q, k, v in the same
        # layout: the second call's launches take its own q, k and v (a plan recorded from the first
        # would pass its q in all three places)
        fa.BWD_DQ, fa.HEAVY_FIRST, fa._MAX_GRID_Y = "separate", True, 65535
        torch.use_deterministic_algorithms(False)
        fa._PLANS.clear()
        gen = torch.Generator().manual_seed(1)
        for _ in range(3):  # (the first goes through Triton; the others are direct)
            x = torch.randn(2, 4, 40, 64, generator=gen).to(torch.bfloat16).requires_grad_()
            fastlm.kernels.flash_attention(x, x, x).backward(torch.ones_like(x))
        q, k, v = (torch.randn(2, 4, 40, 64, generator=gen).to(torch.bfloat16).requires_grad_()
                   for _ in range(3))
        log.clear()
        fastlm.kernels.flash_attention(q, k, v)
        forward_args = [args for kernel, args in log if kernel != "triton"][0]
        assert [any(a is t for a in found) for found, t in zip(forward_args[9:12], (q, k, v))] == [True] * 3

        def hook(metadata):
            pass
        knobs.runtime.launch_enter_hook.add(hook)  # a profiler: every launch through Triton, no replay
        before = replays()
        launched = call("base")
        assert replays() == before and launched and all(kernel == "triton" for kernel, _ in launched)
        fa.HOST_PATH = fa._HOST_ON_CPU = True  # the C++ path too, with the plans it kept
        before = host.replays(), replays()
        launched = call("base")
        assert (host.replays(), replays()) == before and all(kernel == "triton" for kernel, _ in launched)
        print("PLANS")
    """)
    assert_lowers_to_sm90(code, done="PLANS")


# --- On a GPU: the real kernels, launched directly ---------------------------------------------------------


@pytest.mark.gpu
def test_gpu_direct_launches_match_tritons():
    from fastlm.kernels import cross_entropy, flash_attention

    fa = sys.modules["fastlm.kernels.flash_attention"]
    ce = sys.modules["fastlm.kernels.cross_entropy"]
    gen = torch.Generator(device="cuda").manual_seed(0)

    def attention_run(q, k, v, do):
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
        out = flash_attention(q, k, v, causal=True)
        out.backward(do)
        return out, q.grad, k.grad, v.grad

    shape = (2, 4, 200, 64)
    q, k, v, do = (torch.randn(shape, device="cuda", generator=gen, dtype=torch.bfloat16) for _ in range(4))
    launchers = {"separate": (fa._FWD.launch, fa._BWD_Q.launch, fa._BWD_KV.launch),
                 "atomic": (fa._FWD.launch, fa._PREP, fa._BWD_KV_ATOMIC.launch, fa._SCALE_CAST)}
    was = fa.BWD_DQ
    try:
        for mode, used in launchers.items():
            fa.BWD_DQ = mode
            first = attention_run(q, k, v, do)  # autotunes (unless an earlier test did)
            second = attention_run(q, k, v, do)  # Triton's launch with the chosen config, kept (or direct)
            fa._PLANS.clear()  # (a launch plan, made by a direct call, would replay instead)
            hits = [launcher.hits for launcher in used]
            third = attention_run(q, k, v, do)  # direct, and kept as launch plans
            assert [launcher.hits for launcher in used] == [h + 1 for h in hits], mode
            replays = sum(plan.replays for plan in fa._PLANS.values())
            fourth = attention_run(q, k, v, do)  # the plans replayed
            assert sum(plan.replays for plan in fa._PLANS.values()) == replays + 2, mode
            for name, *runs in zip(("out", "dq", "dk", "dv"), first, second, third, fourth):
                for a, b in zip(runs, runs[1:]):
                    if mode == "atomic" and name == "dq":  # the order of the fp32 adds varies run to run
                        torch.testing.assert_close(a, b)
                    else:
                        assert torch.equal(a, b), (mode, name)
        # q, k, v 2 bytes into their buffers: no 16-byte alignment, so Triton compiles another
        # specialization (a kept aligned kernel would read with vector loads this alignment does not allow)
        buffers = [torch.empty(q.numel() + 1, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
        unaligned = [b[1:].view(shape).copy_(t) for b, t in zip(buffers, (q, k, v))]
        assert all(t.data_ptr() % 16 for t in unaligned)
        for mode in launchers:
            fa.BWD_DQ = mode
            for _ in range(3):  # through Triton (another specialization), direct, replayed
                for a, b in zip(first, attention_run(*unaligned, do)):
                    torch.testing.assert_close(a, b)
    finally:
        fa.BWD_DQ = was

    logits = torch.randn(300, 50304, device="cuda", generator=gen, dtype=torch.bfloat16)
    targets = torch.randint(0, 50304, (300,), device="cuda", generator=gen)
    runs = []
    for _ in range(2):
        hits = ce._LAUNCH.hits
        x = logits.clone().requires_grad_()
        loss = cross_entropy(x, targets)
        loss.backward()
        runs.append((loss, x.grad))
    assert ce._LAUNCH.hits == hits + 1  # the second run, at least, launched directly
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


@pytest.mark.gpu
def test_gpu_host_path_matches_the_python_path():
    # The C++ host path (HOST_PATH) replays the plans the Python path made: the same kernels with the same
    # arguments, so the same outputs and gradients bit for bit (dq added atomically varies in its last
    # bits from run to run, either path), on q, k, v apart and on a packed qkv, on a side stream too.
    from fastlm.kernels import flash_attention, flash_attention_qkv

    fa = sys.modules["fastlm.kernels.flash_attention"]
    assert fa._HOST is not None, "fastlm._attention_host was not built (setup.py builds it where torch is)"
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, do = (torch.randn(2, 4, 200, 64, device="cuda", generator=gen, dtype=torch.bfloat16)
                   for _ in range(4))
    qkv = torch.randn(2, 200, 8 * 64, device="cuda", generator=gen, dtype=torch.bfloat16)  # 4 + 2 * 2 heads

    def apart():
        a, b, c = (t.detach().requires_grad_() for t in (q, k, v))
        out = flash_attention(a, b, c, causal=True)
        out.backward(do)
        return out, a.grad, b.grad, c.grad

    def packed():
        x = qkv.detach().requires_grad_()
        out = flash_attention_qkv(x, 4, 2, causal=True)
        out.backward(do)
        return out, x.grad

    was = fa.BWD_DQ, fa.HOST_PATH
    try:
        for mode in ("separate", "atomic"):
            fa.BWD_DQ = mode
            for run in (apart, packed):
                fa.HOST_PATH = False
                want = [run() for _ in range(3)][-1]  # tuned, direct, replayed by the Python path
                fa.HOST_PATH = True
                replays = fa._HOST.replays()
                side = torch.cuda.Stream()
                for stream in (None, None, side):  # the Python path once (no plan kept yet), then C++
                    with torch.cuda.stream(stream or torch.cuda.current_stream()):
                        got = run()
                    torch.cuda.synchronize()
                    for name, a, b in zip(("out", "grad q", "grad k", "grad v"), want, got):
                        if mode == "atomic" and name == "grad q":  # (packed: the gradient holding dq)
                            torch.testing.assert_close(a, b)
                        else:
                            assert torch.equal(a, b), (mode, run.__name__, name, stream)
                assert fa._HOST.replays() == replays + 4, (mode, run.__name__)  # 2 calls, fwd and bwd
    finally:
        fa.BWD_DQ, fa.HOST_PATH = was
