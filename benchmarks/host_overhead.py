"""Host overhead of kanc's kernel calls: Python and dispatch only, kernel launches replaced by no-ops (CPU).

Runs under ``TRITON_INTERPRET=1`` so that CPU tensors take the Triton path a GPU would take (checker, eager
autograd.Function or custom op, launcher, launch plans, launch records), with every ``@triton.jit`` launch turned into
a no-op: what is left is the host time a GPU step pays per call, before any kernel runs. Prints the median
microseconds per call (and the 20th/80th percentiles) of:

- ``group_rational`` forward + backward (the call, then ``torch.autograd.grad`` of its inputs);
- ``grkan_linear`` forward + backward (x, coefficients, weight and bias);
- ``snnk_block`` forward + backward (x and the readout weight; m = d features, "relu");
- the KAT and FlashKAT backward wrappers of ``benchmarks/baselines.py`` (one plain call each, no autograd: the
  issue's 9-13 us reference, timed on this machine);
- floors: a do-nothing ``torch.autograd.Function`` through ``torch.autograd.grad`` (as the rational is used: three
  inputs saved, three gradients), the same op through the autograd engine's C entry point (what is left without
  ``torch.autograd.grad``'s Python layer), and ``x.view(shape)``, a C++ op that computes nothing, through
  ``torch.autograd.grad``;
- components of the rational's call, each timed alone: the checker (``kernel_route``), the launch-plan lookup, the
  forward and backward launchers, one ``empty_like`` of the activation;
- the CPU C-kernel path of ``group_rational`` forward + backward on a tiny tensor (host time plus a near-empty kernel);
- what counting one kernel-to-reference fallback costs (``kanc.codegen.fallbacks.count``).

Each kanc, floor and baseline row runs at ViT-B's size, (8, 197, 768) into 3072 features, and at a tiny size,
(1, 8) into 8. Allocation: a GPU step allocates through PyTorch's caching allocator, about 1 us at any size. On the
CPU, glibc serves PyTorch's 4.8 MB tensors with mmap and gives them back with munmap, and the pages it touches fault
again on every call: measured alone, group_rational fwd+bwd at ViT-B took ~43 us more than at (1, 8), with 1.4 page
faults per call against 0.01 once freed blocks are reused. A GPU step never pays that. So by default the script first
sets glibc's mmap and trim thresholds (``mallopt``) so that freed blocks stay in the heap and are reused, as a caching
allocator does; ``--glibc-malloc`` keeps glibc's defaults, to see that cost. Interleaved with the other cases' large
tensors, the ViT-B rows still run a few us (up to ~20) above the tiny rows (the heap's bookkeeping among many large
blocks, no page faults): the tiny rows are the host floor a GPU step pays. Nothing else is removed.

The interpreter's launch entry point is what is stubbed, so Triton's own per-launch work on a GPU (argument binding,
specialisation, cache key: ~12 us a launch through ``kernel[grid]``, ~2 us through the compiled kernel's launcher
that kanc's launch plans keep after the first launch) is not in these rows: ``benchmarks/triton_launch.py`` measures
it with a stub driver.

Timings on a shared machine vary with its load: the script prints the load average beside the medians; compare the
kanc rows with the floors measured in the same run, not across runs.

    python benchmarks/host_overhead.py [--calls 3000] [--glibc-malloc] [--out results.json]
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: CPU tensors take the Triton path
os.environ.setdefault("KANC_AUTOTUNE", "0")  # a cache lookup per launch, as a tuned GPU run does

import torch  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import baselines  # noqa: E402

from kanc.codegen import fallbacks, grkan_linear, group_rational, snnk_block  # noqa: E402
from kanc.codegen.checker import kernel_route  # noqa: E402
from kanc.codegen.kernels import common  # noqa: E402
from kanc.codegen.kernels import rational as rational_kernels  # noqa: E402
from kanc.timing import interleaved_times_ms, percentiles  # noqa: E402

GROUPS = 8
SIZES = {"": ((8, 197, 768), 3072), ", tiny": ((1, GROUPS), GROUPS)}  # row suffix -> (x's shape, out features)
TARGETS_US = {"group_rational fwd+bwd": 30.0, "grkan_linear fwd+bwd": 50.0}  # issue 13, item 4
FLOOR = "floor: empty autograd op, 3 saved, 3 grads"
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def no_op_launches() -> None:
    """Every ``kernel[grid](...)`` returns at once (the interpreter's launch entry point)."""
    InterpretedFunction.run = lambda self, *args, grid, warmup, **kwargs: None


def reuse_freed_blocks() -> bool:
    """Make glibc keep and reuse freed blocks up to 1 GiB instead of mmap/munmap per large tensor (as a caching
    allocator does); False where the C library is not glibc."""
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, 1 << 30) and libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))


class _Nothing(torch.autograd.Function):
    """The floor: an autograd op that computes nothing, used as the rational is (three inputs saved, three
    gradients)."""

    @staticmethod
    def forward(ctx, x, numerator, denominator):
        ctx.save_for_backward(x, numerator, denominator)
        return torch.empty_like(x)

    @staticmethod
    def backward(ctx, grad):
        _, numerator, denominator = ctx.saved_tensors
        return grad, numerator, denominator


def kanc_cases(shape: tuple[int, ...], out_features: int, suffix: str) -> dict[str, callable]:
    """kanc's calls and the floors at one size."""
    x = torch.randn(shape, requires_grad=True)
    num = torch.randn(GROUPS, 6, requires_grad=True)
    den = torch.randn(GROUPS, 4, requires_grad=True)
    weight = torch.randn(out_features, shape[-1], requires_grad=True)
    bias = torch.randn(out_features, requires_grad=True)
    g, g_out = torch.ones(shape), torch.ones(*shape[:-1], out_features)
    projection = torch.randn(shape[-1], shape[-1])  # SNNK with m = d (ViT-B: 768 = hidden / 4), d_out = d
    features = torch.randn(shape[-1], shape[-1], requires_grad=True)
    inputs = (x, num, den)
    engine = torch.autograd.Variable._execution_engine.run_backward
    xd, nd, dd = x.detach(), num.detach(), den.detach()
    key = common.operands_key(x, num, den)
    plans, build = rational_kernels._fwd_plans, rational_kernels._fwd_plan
    return {
        f"group_rational fwd+bwd{suffix}": lambda: torch.autograd.grad(group_rational(*inputs), inputs, g),
        f"grkan_linear fwd+bwd{suffix}": lambda: torch.autograd.grad(
            grkan_linear(x, num, den, weight, bias), (x, num, den, weight, bias), g_out
        ),
        f"snnk_block fwd+bwd{suffix}": lambda: torch.autograd.grad(
            snnk_block(x, projection, features, None, "relu"), (x, features), g
        ),
        f"{FLOOR}{suffix}": lambda: torch.autograd.grad(_Nothing.apply(*inputs), inputs, g),
        f"floor: same op, autograd engine called directly{suffix}": lambda: engine(
            (_Nothing.apply(*inputs),), (g,), False, False, inputs, False, False
        ),
        f"floor: x.view(shape) (a C++ op) fwd+bwd{suffix}": lambda: torch.autograd.grad(x.view(shape), (x,), g),
        f"part: checker (kernel_route){suffix}": lambda: kernel_route(*inputs, cpu=True),
        f"part: launch plan lookup{suffix}": lambda: common.planned(plans, key, x.device, build, xd, nd, dd),
        f"part: forward launcher{suffix}": lambda: rational_kernels.rational_forward(xd, nd, dd),
        f"part: backward launcher{suffix}": lambda: rational_kernels.rational_backward(g, xd, nd, dd),
        f"part: empty_like(x){suffix}": lambda: torch.empty_like(xd),
        f"KAT backward wrapper{suffix}": lambda: baselines.kat_backward(g, xd, nd, dd),
        f"FlashKAT backward wrapper{suffix}": lambda: baselines.flashkat_backward(g, xd, nd, dd),
    }


def cases() -> dict[str, callable]:
    out = {}
    for suffix, (shape, out_features) in SIZES.items():
        out.update(kanc_cases(shape, out_features, suffix))
    num, den = torch.randn(GROUPS, 6, requires_grad=True), torch.randn(GROUPS, 4, requires_grad=True)
    tiny = torch.randn(1, GROUPS, requires_grad=True)

    def cpu_rational():
        os.environ["TRITON_INTERPRET"] = "0"  # the checker reads it per call: the C kernel path
        try:
            torch.autograd.grad(group_rational(tiny, num, den), (tiny, num, den), torch.ones_like(tiny))
        finally:
            os.environ["TRITON_INTERPRET"] = "1"

    out.update(
        {
            "cpu C kernel group_rational fwd+bwd, (1, 8)": cpu_rational,
            "a fallback's bookkeeping (fallbacks.count)": lambda: fallbacks.count("kanc::group_rational", den, "dtype"),
        }
    )
    return out


def measure(fns: dict[str, callable], calls: int, warmup: int) -> dict[str, dict[str, float]]:
    """Per-call times in us, the cases interleaved call by call so that load changes hit them alike."""
    out = {}
    for name, ms in interleaved_times_ms(fns, calls, warmup).items():
        us = [t * 1e3 for t in ms]
        median, p20, p80 = percentiles(us)
        out[name] = {"median_us": median, "p20_us": p20, "p80_us": p80, "min_us": min(us)}
    return out


def _commit() -> str | None:
    """The checkout's commit (with "+dirty" for uncommitted changes), None outside a git checkout."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=3000, help="timed calls per case (medians over these)")
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--glibc-malloc", action="store_true", help="keep glibc's mmap per large tensor (see above)")
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    allocator = "glibc defaults" if args.glibc_malloc or not reuse_freed_blocks() else "freed blocks reused (mallopt)"
    no_op_launches()
    load_before = os.getloadavg()
    results = measure(cases(), args.calls, args.warmup)
    load_after = os.getloadavg()
    load = f"load average {load_before[0]:.1f} -> {load_after[0]:.1f} on {os.cpu_count()} CPUs"
    print(f"host time per call, kernel launches no-ops; median of {args.calls} calls; allocator: {allocator}; {load}"
          " (load inflates every row)")  # fmt: skip
    floor = results[FLOOR]["median_us"]
    print(f"{'case':<56} {'median us':>10} {'p20':>8} {'p80':>8} {'/ floor':>8}  target")
    for name, r in results.items():
        target = next((f"<= {us:.0f} us" for case, us in TARGETS_US.items() if name.startswith(case)), "")
        print(f"{name:<56} {r['median_us']:>10.1f} {r['p20_us']:>8.1f} {r['p80_us']:>8.1f} "
              f"{r['median_us'] / floor:>8.2f}  {target}")  # fmt: skip
    if args.out is not None:
        command = " ".join(f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS",) if k in os.environ)
        command = f"{command} python {' '.join(sys.argv)}".strip()
        payload = {"benchmark": "host_overhead", "torch": torch.__version__, "command": command, "commit": _commit(),
                   "calls": args.calls, "allocator": allocator, "load_average": [load_before, load_after],
                   "results": results}  # fmt: skip
        args.out.write_text(json.dumps(payload, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
