#!/usr/bin/env python3
"""What fastlm's Triton kernels compile to on an H100 (sm_90), without a GPU: per autotuning config, the
registers per thread, spilled bytes, shared memory, and the instruction mix of the SASS.

    python tools/kernel_report.py                  # every GPU config of every kernel, bf16, head_dim 64
    python tools/kernel_report.py bwd_kv --head-dim 128
    python tools/kernel_report.py fwd --config 64,128,8,3 --sass /tmp/fwd.sass   # one tiling, keep its SASS
    python tools/kernel_report.py ce --config 16384,16   # the cross-entropy kernel: BLOCK_V,WARPS

Kernels: fwd, bwd_q, bwd_kv, bwd_kv_atomic, bwd_kv_bulk (flash attention; configs
BLOCK_M,BLOCK_N,WARPS,STAGES; bwd_kv_atomic is the dk/dv kernel that also adds dq atomically, bwd_kv_bulk
the same adding whole dq tiles by TMA bulk reductions) and ce (the cross-entropy kernel that the fused
linear cross-entropy runs per chunk; configs BLOCK_V,WARPS).

Why: a config whose registers spill to local memory (STACK > 0) pays for it in every tile, and the
instruction mix shows what the inner loops do besides the tensor-core matmuls (HGMMA): exp2 (MUFU),
scaling, max, sums, conversions. Both can be read on a laptop, before a GPU run measures the time.

The kernels are compiled as a real launch specializes them: pointers 16-byte aligned and integer
arguments (strides, sequence lengths) divisible by 16, except those the kernels exclude from
specialization. Without that hint Triton cannot vectorize or pipeline the loads, and the SASS would be
another program. Needs Triton's NVIDIA backend and the nvdisasm / cuobjdump it ships; run it without
TRITON_INTERPRET (the interpreter lists one config per kernel).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# flash attention's three (bwd_kv_atomic: the dk/dv kernel adding dq atomically, BWD_DQ="atomic";
# bwd_kv_bulk: adding dq tiles by TMA bulk reductions, BWD_DQ="bulk"), the cross-entropy kernel
KERNELS = ("fwd", "bwd_q", "bwd_kv", "bwd_kv_atomic", "bwd_kv_bulk", "ce")


@dataclass
class Report:
    kernel: str
    config: tuple  # attention: (BLOCK_M, BLOCK_N, num_warps, num_stages); ce: (BLOCK_V, num_warps)
    registers: int
    spill_bytes: int  # per-thread stack: registers spilled to local memory
    shared_bytes: int
    ops: collections.Counter  # SASS opcode (without modifiers) -> count
    sass: str

    def line(self) -> str:
        if self.kernel == "ce":
            block, w = self.config
            tiling = f"V{block:<6d}  w{w:<2d}  "
        else:
            m, n, w, s = self.config
            tiling = f"M{m:<3d} N{n:<3d} w{w} s{s}"
        mix = " ".join(f"{op} {self.ops[op]}" for op in ("HGMMA", "MUFU", "FFMA", "FMUL", "FADD", "FMNMX"))
        return (f"{self.kernel:13s} {tiling}  regs {self.registers:3d}  spill "
                f"{self.spill_bytes:4d} B  smem {self.shared_bytes // 1024:3d} KiB  | {mix}  "
                f"LDL/STL {self.ops['LDL'] + self.ops['STL']}"
                + (f"  RED/ATOM {self.ops['RED'] + self.ops['ATOM'] + self.ops['REDG'] + self.ops['ATOMG']}"
                   if self.kernel.endswith(("atomic", "bulk")) else "")
                + (f"  UTMAREDG {self.ops['UTMAREDG']}" if self.kernel.endswith("bulk") else ""))


def _signatures(fa, dtype: str) -> dict:
    ptr = "*" + dtype
    strides = lambda *names: {f"stride_{n}{d}": "i32" for n in names for d in "bht"}  # noqa: E731
    common = {"n_head": "i32", "group": "i32", "seq_q": "i32", "seq_k": "i32"}
    bwd_kv = {"Q": ptr, "K": ptr, "V": ptr, "DO": ptr, "LSE": "*fp32", "DELTA": "*fp32", "DK": ptr, "DV": ptr,
              "DQ": "*fp32", "qk_scale": "fp32", "sm_scale": "fp32",
              **strides("q", "k", "v", "do", "dk", "dv", "dq"), "n_kv_head": "i32", **common}
    return {
        "fwd": (fa._fwd_kernel, {"Q": ptr, "K": ptr, "V": ptr, "O": ptr, "LSE": "*fp32", "qk_scale": "fp32",
                                 **strides("q", "k", "v", "o"), **common}),
        "bwd_q": (fa._bwd_q_kernel, {"Q": ptr, "K": ptr, "V": ptr, "O": ptr, "DO": ptr, "LSE": "*fp32",
                                     "DELTA": "*fp32", "DQ": ptr, "qk_scale": "fp32", "sm_scale": "fp32",
                                     **strides("q", "k", "v", "do", "o", "dq"), **common}),
        "bwd_kv": (fa._bwd_kv_kernel, bwd_kv),
        "bwd_kv_atomic": (fa._BWD_KV_ATOMIC.kernel, bwd_kv),
        "bwd_kv_bulk": (fa._BWD_KV_BULK.kernel, bwd_kv),
    }


def configs(kernel: str) -> list[tuple]:
    """The GPU autotuning list of a kernel: (BLOCK_M, BLOCK_N, num_warps, num_stages) for attention's,
    the timed candidates (BLOCK_V, num_warps) for the cross-entropy kernel."""
    fa = _module()
    if kernel == "ce":
        return list(sys.modules["fastlm.kernels.cross_entropy"].CANDIDATES)
    lists = {"fwd": fa._FWD_CONFIGS, "bwd_q": fa._BWD_Q_CONFIGS, "bwd_kv": fa._BWD_KV_CONFIGS,
             "bwd_kv_atomic": fa._BWD_KV_ATOMIC_CONFIGS, "bwd_kv_bulk": fa._BWD_KV_ATOMIC_CONFIGS}
    return [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in lists[kernel]]


def _module():
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("kernel_report: unset TRITON_INTERPRET (under the interpreter the kernels list one "
                         "config each and nothing is compiled)")
    import fastlm.kernels  # noqa: F401  (the package exports the function under the module's name)

    return sys.modules["fastlm.kernels.flash_attention"]


def _tool(name: str) -> str:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if not path.is_file():
        raise SystemExit(f"kernel_report: {path} not found: this Triton build ships no NVIDIA tools")
    return str(path)


def compile_report(kernel: str, config, head_dim: int = 64, dtype: str = "bf16",
                   causal: bool = True, arch: int = 90, aligned: bool = True) -> Report:
    """Compile one kernel with one tiling for sm_<arch> (90: H100/H200) and read its resources and SASS.
    aligned: as a launch with aligned pointers and strides specializes it (else without those hints, the
    code a launch with odd strides or sequence lengths gets)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fa = _module()
    if kernel == "ce":  # the launch names no num_stages: Triton's default
        jit = sys.modules["fastlm.kernels.cross_entropy"]._cross_entropy_kernel
        (block_v, warps), stages = config, 3
        signature = {"logits_ptr": "*" + dtype, "logits_row_stride": "i32", "grad_ptr": "*" + dtype,
                     "grad_row_stride": "i32", "targets_ptr": "*i64", "loss_ptr": "*fp32",
                     "scale_ptr": "*fp32", "n_cols": "i32", "ignore_index": "i32"}
        constexprs = {"BLOCK_V": block_v, "COMPUTE_GRAD": True, "SCALE_PER_ROW": False}
    else:
        fn, signature = _signatures(fa, dtype)[kernel]
        jit = fn.fn  # under the autotuner
        block_m, block_n, warps, stages = config
        constexprs = {"HEAD_DIM": head_dim, "CAUSAL": causal, "PRECISION": "tf32",
                      "HEAVY_FIRST": fa.HEAVY_FIRST and causal, "BLOCK_M": block_m, "BLOCK_N": block_n}
        if kernel.startswith("bwd_kv"):
            constexprs["ATOMIC_DQ"] = kernel in ("bwd_kv_atomic", "bwd_kv_bulk")
            constexprs["DQ_BULK"] = kernel == "bwd_kv_bulk"
    signature = {name: signature.get(name, "constexpr") for name in jit.arg_names}
    # what a launch specializes: every pointer and integer divisible by 16 unless excluded (the loss's
    # ignore_index is -100, not a multiple of 16)
    unhinted = {*jit.do_not_specialize, "ignore_index"}
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(jit.arg_names)
             if aligned and signature[name][0] in "*i" and name not in unhinted}
    src = ASTSource(fn=jit, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": warps, "num_stages": stages})
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        sass = subprocess.run([_tool("nvdisasm"), "-c", str(cubin)], check=True, capture_output=True,
                              text=True).stdout
        usage = subprocess.run([_tool("cuobjdump"), "-res-usage", str(cubin)], check=True,
                               capture_output=True, text=True).stdout
    registers = int(re.search(r"REG:(\d+)", usage).group(1))
    stack = int(re.search(r"STACK:(\d+)", usage).group(1))
    # an instruction line: /*0130*/  [@P0 ]OPCODE.MODIFIERS operands ;
    opcodes = re.findall(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)", sass, re.M)
    return Report(kernel, tuple(config), registers, stack, compiled.metadata.shared,
                  collections.Counter(opcodes), sass)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("kernels", nargs="*", metavar="KERNEL",
                    help=f"any of {', '.join(KERNELS)} (default: all)")
    ap.add_argument("--config", action="append", default=[], metavar="M,N,WARPS,STAGES",
                    help="a tiling instead of the autotuning list (repeatable; BLOCK_V,WARPS for ce)")
    ap.add_argument("--head-dim", type=int, default=64, choices=(16, 32, 64, 128))
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp16"))
    ap.add_argument("--non-causal", action="store_true")
    ap.add_argument("--arch", type=int, default=90,
                    help="compute capability x 10: 90 H100/H200 (default), 80 A100, 86 RTX 30xx, 89 RTX 40xx")
    ap.add_argument("--sass", metavar="FILE", help="write the SASS of the (last) config to FILE")
    args = ap.parse_args(argv)
    unknown = [k for k in args.kernels if k not in KERNELS]
    if unknown:
        ap.error(f"unknown kernel {unknown[0]!r}: expected one of {', '.join(KERNELS)}")
    given = []
    for c in args.config:
        parts = c.split(",")
        if len(parts) not in (2, 4) or not all(x.strip().isdigit() for x in parts):
            ap.error(f"--config takes whole numbers BLOCK_M,BLOCK_N,WARPS,STAGES (attention) or "
                     f"BLOCK_V,WARPS (ce), got {c!r}")
        given.append(tuple(int(x) for x in parts))
    for kernel in args.kernels or KERNELS:
        for tiling in given or configs(kernel):
            if len(tiling) != (2 if kernel == "ce" else 4):
                ap.error(f"{kernel} takes --config " + ("BLOCK_V,WARPS" if kernel == "ce" else
                                                        "BLOCK_M,BLOCK_N,WARPS,STAGES") + f", got {tiling}")
            try:
                report = compile_report(kernel, tiling, args.head_dim, args.dtype, not args.non_causal,
                                        args.arch)
            except Exception as e:  # e.g. shared memory beyond the H100's: the autotuner drops such configs
                print(f"{kernel:13s} {tiling}: does not compile: {type(e).__name__}: {str(e)[:200]}")
                continue
            print(report.line(), flush=True)
            if args.sass:
                Path(args.sass).write_text(report.sass)
    return 0


if __name__ == "__main__":
    sys.exit(main())
