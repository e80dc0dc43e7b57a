"""The kernels' launch path (fastlm.kernels.launch): the first launch of an argument signature goes through
Triton, later ones call the compiled kernel's launcher directly, and only where Triton would have launched
the same compiled kernel.

On CPU a stand-in for a @triton.jit function records both kinds of launch; on a GPU the real kernels run
twice (the second time directly) and must give the same results, also for inputs whose alignment asks
Triton for another specialization.
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
    # launch metadata or hooks, then every parameter in order: the constexpr BLOCK too, num_warps not
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


def test_direct_launch_passes_what_tritons_binder_binds():
    # A direct launch hands the compiled kernel's launcher `args + the remaining parameters in order` (the
    # constexprs from the keyword arguments); Triton's own launch hands it its binder's values. Both must
    # be the same list for every kernel, or a direct launch would feed the kernel shifted arguments. Checked
    # with the real launchers and Triton's binder for an H100 (no GPU needed): each kernel's first launch
    # goes to a stand-in that binds the arguments as Triton would, the second launch is direct into a
    # stand-in launcher that records what it is given.
    code = textwrap.dedent("""
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
                self.run = lambda *a: launched.setdefault(name, a[9:])  # after grid, stream, function, ...

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
            for _ in range(2):  # through Triton's binder, then direct
                qq = q.clone().requires_grad_()
                k, v = (kv[:, :, i].transpose(1, 2).requires_grad_() for i in range(2))
                fastlm.kernels.flash_attention(qq, k, v).sum().backward()
                ce.launch(logits, targets, torch.empty(8), logits, torch.ones(1), -100)
            assert sorted(launched) == kernels[mode], (mode, sorted(launched))
            for name, args in launched.items():
                want = bound[name]
                assert len(args) == len(want), (mode, name, len(args), len(want))
                for i, (a, b) in enumerate(zip(args, want)):
                    same = (a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype
                            if isinstance(a, torch.Tensor) else a == b and type(a) is type(b))
                    assert same, (mode, name, i, a, b)
        print("BOUND")
    """)
    assert_lowers_to_sm90(code, done="BOUND")


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
            hits = [launcher.hits for launcher in used]
            third = attention_run(q, k, v, do)  # direct
            assert [launcher.hits for launcher in used] == [h + 1 for h in hits], mode
            for name, a, b, c in zip(("out", "dq", "dk", "dv"), first, second, third):
                if mode == "atomic" and name == "dq":  # the order of the fp32 adds varies from run to run
                    torch.testing.assert_close(a, b)
                    torch.testing.assert_close(b, c)
                else:
                    assert torch.equal(a, b) and torch.equal(b, c), (mode, name)
        # q, k, v 2 bytes into their buffers: no 16-byte alignment, so Triton compiles another
        # specialization (a kept aligned kernel would read with vector loads this alignment does not allow)
        buffers = [torch.empty(q.numel() + 1, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
        unaligned = [b[1:].view(shape).copy_(t) for b, t in zip(buffers, (q, k, v))]
        assert all(t.data_ptr() % 16 for t in unaligned)
        for mode in launchers:
            fa.BWD_DQ = mode
            for _ in range(2):
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
