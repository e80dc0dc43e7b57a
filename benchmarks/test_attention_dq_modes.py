"""The attention backward's three ways of summing dq (kernels/flash_attention.py BWD_DQ), side by side on a
GPU: GPU kernel time of a causal forward + backward (bf16, B8 H16 hd64, T in {512, 1024, 2048}) with dq from
its own kernel ("separate"), added by the dk/dv kernel with one atomic per four values ("atomic"), or a whole
tile at a time by TMA bulk reductions ("bulk"), and torch SDPA's kernels in the same run.

"auto" times the modes of AUTO_DQ_MODES on a model's first backward of each shape and keeps the fastest;
"bulk" is not among them until a run of this file (and the GPU tests) has shown it right and where it is
faster. Each mode's dq is checked against the dq kernel's first (the rule "auto" applies: the same within
the order of fp32 sums). It runs in a subprocess: a mode that faults on some GPU (a CUDA error stays with
the process) costs this file's rows, not the rest of the session's. Without CUDA the file skips.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import ROOT, record

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="attention benchmark needs a CUDA GPU (no CUDA device found)")

MODES = ("separate", "atomic", "bulk")

SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    import torch.nn.functional as F
    import fastlm.kernels
    from conftest import gpu_kernel_times
    fa = sys.modules["fastlm.kernels.flash_attention"]
    B, H, D = 8, 16, 64
    out = {}
    for seq in (512, 1024, 2048):
        gen = torch.Generator(device="cuda").manual_seed(0)
        q, k, v, do = (torch.randn(B, H, seq, D, device="cuda", generator=gen, dtype=torch.bfloat16)
                       for _ in range(4))
        q.requires_grad_(), k.requires_grad_(), v.requires_grad_()

        def step(fn):
            q.grad = k.grad = v.grad = None
            fn(q, k, v).backward(do)

        def ours(a, b, c):
            return fastlm.kernels.flash_attention(a, b, c, causal=True)

        def sdpa(a, b, c):
            return F.scaled_dot_product_attention(a, b, c, is_causal=True)

        row = {}
        for mode in MODES:
            fa.BWD_DQ = mode
            try:
                for _ in range(3):  # tunes and compiles
                    step(ours)
                dq = q.grad.clone()
                if mode == "separate":
                    reference = dq
                row[mode] = {"us": sum(gpu_kernel_times(lambda: step(ours)).values()),
                             "dq_agrees": bool(fa._dq_agrees(dq, reference, (seq,)))}
            except Exception as e:  # (e.g. no tiling of a mode fits this GPU)
                row[mode] = {"error": f"{type(e).__name__}: {e}"[:300]}
        fa.BWD_DQ = "auto"
        for _ in range(3):
            step(sdpa)
        row["sdpa"] = {"us": sum(gpu_kernel_times(lambda: step(sdpa)).values())}
        out[seq] = row
        print(seq, row, file=sys.stderr)
    print("RESULT " + json.dumps(out))
""")


def test_attention_backward_per_dq_mode():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(Path(__file__).parent), *(p for p in sys.path if p)])
    script = f"MODES = {MODES!r}\n" + SCRIPT
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                          timeout=600)
    assert "RESULT " in done.stdout, done.stderr[-4000:]
    results = json.loads(done.stdout.split("RESULT ", 1)[1])
    failures = []
    for seq, row in results.items():
        name = f"attention fwd+bwd causal bf16 B8 H16 T{seq} hd64, GPU kernel time"
        separate = row["separate"]["us"]
        for mode in ("atomic", "bulk"):
            if "error" in row[mode]:
                failures.append(f"T={seq} {mode}: {row[mode]['error']}")
                continue
            if not row[mode]["dq_agrees"]:
                failures.append(f"T={seq} {mode}: dq disagrees with the dq kernel's")
            record(f"{name}, dq {mode}", row[mode]["us"], "us", "dq separate (its own kernel)", separate,
                   higher_is_better=False)
        best = min((m for m in MODES if row[m].get("dq_agrees")), key=lambda m: row[m]["us"])
        record(f"{name}, the fastest dq mode ({best})", row[best]["us"], "us", "torch SDPA kernels",
               row["sdpa"]["us"], higher_is_better=False)
    assert not failures, failures
