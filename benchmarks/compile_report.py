"""Compile every kanc kernel for a GPU target without a GPU, and report its registers, spills and shared memory.

The launchers run on CPU tensors with the launch itself intercepted: each ``kernel[grid](...)`` call is captured with
its real arguments, constexprs and config (every tuning candidate, or the heuristic default), then compiled ahead of
time by Triton for the target (default sm_90, an H100) and measured with ``ptxas -v``. This checks the GPU code path
(tl.dot shapes, constexpr branches, resource limits) where the interpreter cannot; it measures no speed.

    python benchmarks/compile_report.py                        # ViT-B shapes, bf16, default configs, sm_90
    python benchmarks/compile_report.py --all-candidates --dtype float16 --arch 80 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"  # compile real kernels; nothing is launched
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from kanc.codegen import tuning  # noqa: E402

TYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


class Captured(Exception):
    """Raised instead of a launch so the launcher stops after recording its call."""


def capture(calls: list):
    """Patch JITFunction.run to record (kernel, args, kwargs) instead of launching."""
    from triton.runtime.jit import JITFunction

    def run(self, *args, grid, warmup, **kwargs):
        calls.append((self, args, kwargs))
        return None

    JITFunction.run = run


def signature(kernel, args, kwargs) -> tuple[dict, dict, dict]:
    """(signature, constexprs, options) of one captured call."""
    names = [p.name for p in kernel.params]
    values = dict(zip(names, args)) | {k: v for k, v in kwargs.items() if k in names}
    options = {k: v for k, v in kwargs.items() if k in ("num_warps", "num_stages")}
    sig, constexprs = {}, {}
    for p in kernel.params:
        value = values[p.name]
        if p.is_constexpr:
            sig[p.name], constexprs[p.name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            sig[p.name] = "*" + TYPE_NAMES[value.dtype]
        elif isinstance(value, bool):
            sig[p.name] = "i1"
        elif isinstance(value, int):
            sig[p.name] = "i64" if abs(value) >= 2**31 else "i32"
        else:
            sig[p.name] = "fp32"
    return sig, constexprs, options


def ptxas_usage(ptx: str, arch: int) -> dict:
    """Registers, spill bytes and static shared memory from ``ptxas -v`` on the kernel's PTX."""
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(arch).path  # the ptxas Triton itself uses for this arch
    suffix = "a" if arch >= 90 else ""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.ptx"
        path.write_text(ptx)
        cmd = [str(ptxas), "-v", f"--gpu-name=sm_{arch}{suffix}", str(path), "-o", str(Path(tmp) / "k.cubin")]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"ptxas failed: {out.stderr.strip()[-500:]}")
        out = out.stdout + out.stderr
    regs = re.search(r"Used (\d+) registers", out)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out)
    return {
        "registers": int(regs.group(1)) if regs else None,
        "spill_store_bytes": int(spills.group(1)) if spills else None,
        "spill_load_bytes": int(spills.group(2)) if spills else None,
    }


def calls_for(dtype: torch.dtype, tokens: int, channels: int, hidden: int, groups: int, feats: int, all_candidates):
    """Run every launcher (forward and backward) at one block shape and return the captured calls."""
    from kanc.codegen.kernels import grkan_linear, linear_rational, rational, snnk

    calls: list = []
    capture(calls)
    x = torch.randn(tokens, channels).to(dtype)
    h = torch.randn(tokens, hidden).to(dtype)
    num, den = torch.randn(groups, 6), torch.randn(groups, 4)
    w1 = torch.randn(hidden, channels).to(dtype)
    w2 = torch.randn(channels, hidden).to(dtype)
    b = torch.zeros(channels).to(dtype)
    g = torch.randn(feats, channels)
    launches = [
        lambda: rational.rational_forward(h, num, den),
        lambda: rational.rational_backward(h, h, num, den),
        lambda: grkan_linear.grkan_linear_forward(h, num, den, w2, b),
        lambda: grkan_linear.grkan_linear_backward(x, h, num, den, w2, True),
        lambda: grkan_linear.grkan_linear_forward(x, num, den, w1, None),
        lambda: linear_rational.linear_rational_forward(x, w1, torch.zeros(hidden).to(dtype), num, den, True),
    ]
    for kind in ("relu", "exp", "cos"):
        w = torch.randn(channels, feats * (2 if kind == "cos" else 1)).to(dtype)
        launches.append(lambda w=w, kind=kind: snnk.snnk_forward(x, g, w, b, kind, 0.0, 1.0))
        launches.append(lambda w=w, kind=kind: snnk.snnk_backward(x, x, g, w, True, True, True, kind, 0.0, 1.0))
    # all candidates: the bench of pick_config runs each one once (timed by a no-op clock)
    with tuning.autotuning("force" if all_candidates else "0"):
        tuning.cpu_bench.__defaults__  # noqa: B018 - keep the import used
        for launch in launches:
            launch()
    return calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 (H100), 80 (A100)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--shape", default="vit_b", choices=["vit_b", "tiny"])
    parser.add_argument("--feats", type=int, default=256, help="SNNK features m")
    parser.add_argument("--all-candidates", action="store_true", help="every tuning candidate, not only the default")
    parser.add_argument("--only", nargs="+", default=None, help="kernel names to compile (default: all)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    shape = {"vit_b": (128 * 197, 768, 3072, 8), "tiny": (64, 32, 64, 4)}[args.shape]
    with tempfile.TemporaryDirectory() as cache:
        os.environ["KANC_CACHE_DIR"] = cache
        tuning.cpu_bench = lambda fn, warmup=1, reps=3: (fn(), 1.0)[1]  # one captured call per candidate
        calls = calls_for(getattr(torch, args.dtype), *shape, args.feats, args.all_candidates)
    target = GPUTarget("cuda", args.arch, 32)
    rows, seen = [], set()
    for kernel, call_args, kwargs in calls:
        if args.only and kernel.__name__ not in args.only:
            continue
        sig, constexprs, options = signature(kernel, call_args, kwargs)
        key = (kernel.__name__, tuple(sorted(constexprs.items(), key=str)), tuple(sorted(options.items())))
        if key in seen:
            continue
        seen.add(key)
        compiled = triton.compile(ASTSource(kernel, sig, constexprs), target=target, options=options)
        usage = ptxas_usage(compiled.asm["ptx"], args.arch)
        names = ("BLOCK", "GROUP", "G_SPAN", "KIND", "ROWS", "SPLIT")
        blocks = {k: v for k, v in constexprs.items() if k.startswith(names)}
        row = {"kernel": kernel.__name__, "config": {**blocks, **options}, "shared_bytes": compiled.metadata.shared,
               **usage}  # fmt: skip
        rows.append(row)
        print(f"{row['kernel']:<28} regs {row['registers']!s:>4}  spill {row['spill_store_bytes']!s:>5} B  "
              f"smem {row['shared_bytes']:>6} B  {row['config']}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"arch": args.arch, "dtype": args.dtype, "shape": shape, "kernels": rows}))


if __name__ == "__main__":
    main()
