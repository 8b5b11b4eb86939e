"""Host overhead of kanc's kernel calls: Python and dispatch only, kernel launches replaced by no-ops (CPU).

Runs under ``TRITON_INTERPRET=1`` so that CPU tensors take the Triton path a GPU would take (checker, eager
autograd.Function or custom op, launcher, tuning-cache lookup, launch records), with every ``@triton.jit`` launch
turned into a no-op: what is left is the host time a GPU step pays per call, before any kernel runs. Prints the median
microseconds per call (and the 20th/80th percentiles) of:

- ``group_rational`` forward + backward (the call, then ``torch.autograd.grad`` of its inputs);
- ``grkan_linear`` forward + backward (x, coefficients, weight and bias);
- the KAT and FlashKAT backward wrappers of ``benchmarks/baselines.py`` (one call each: the floor a thin launcher
  reaches);
- the floor of any autograd op: a do-nothing ``torch.autograd.Function`` forward + ``torch.autograd.grad``;
- the CPU C-kernel path of ``group_rational`` forward + backward on a tiny tensor (host time plus a near-empty kernel);
- what counting one kernel-to-reference fallback costs (``kanc.codegen.fallbacks.count``).

The interpreter's launch entry point is what is stubbed, so Triton's own per-launch work on a GPU (argument binding,
specialisation, cache key: ~12 us a launch through ``kernel[grid]``, ~2 us through the compiled kernel's launcher
that kanc's launch plans keep after the first launch) is not in these rows: ``benchmarks/triton_launch.py`` measures
it with a stub driver.

Timings on a shared machine vary with its load: the script prints the load average beside the medians; compare the
kanc rows with the floors measured in the same run, not across runs.

    python benchmarks/host_overhead.py [--calls 3000] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: CPU tensors take the Triton path
os.environ.setdefault("KANC_AUTOTUNE", "0")  # a cache lookup per launch, as a tuned GPU run does

import torch  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import baselines  # noqa: E402

from kanc.codegen import fallbacks, grkan_linear, group_rational  # noqa: E402
from kanc.timing import interleaved_times_ms, percentiles  # noqa: E402

SHAPE, GROUPS, OUT_FEATURES = (8, 197, 768), 8, 3072  # ViT-B's fc2 input; the kernels never run, so size is free
TARGETS_US = {"group_rational fwd+bwd": 30.0, "grkan_linear fwd+bwd": 50.0}  # issue 13, item 4


def no_op_launches() -> None:
    """Every ``kernel[grid](...)`` returns at once (the interpreter's launch entry point)."""
    InterpretedFunction.run = lambda self, *args, grid, warmup, **kwargs: None


class _Nothing(torch.autograd.Function):
    """The floor: an autograd op that computes nothing."""

    @staticmethod
    def forward(ctx, x, numerator, denominator):
        return torch.empty_like(x)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


def cases() -> dict[str, callable]:
    x = torch.randn(SHAPE, requires_grad=True)
    num = torch.randn(GROUPS, 6, requires_grad=True)
    den = torch.randn(GROUPS, 4, requires_grad=True)
    weight = torch.randn(OUT_FEATURES, SHAPE[-1], requires_grad=True)
    bias = torch.randn(OUT_FEATURES, requires_grad=True)
    g, g_out = torch.ones(SHAPE), torch.ones(*SHAPE[:-1], OUT_FEATURES)
    tiny = torch.randn(1, 8, requires_grad=True)

    def rational():
        torch.autograd.grad(group_rational(x, num, den), (x, num, den), g)

    def linear():
        torch.autograd.grad(grkan_linear(x, num, den, weight, bias), (x, num, den, weight, bias), g_out)

    def cpu_rational():
        os.environ["TRITON_INTERPRET"] = "0"  # the checker reads it per call: the C kernel path
        try:
            torch.autograd.grad(group_rational(tiny, num, den), (tiny, num, den), torch.ones_like(tiny))
        finally:
            os.environ["TRITON_INTERPRET"] = "1"

    return {
        "group_rational fwd+bwd": rational,
        "grkan_linear fwd+bwd": linear,
        "KAT backward wrapper": lambda: baselines.kat_backward(g, x, num, den),
        "FlashKAT backward wrapper": lambda: baselines.flashkat_backward(g, x, num, den),
        "floor: empty autograd op fwd+bwd": lambda: torch.autograd.grad(_Nothing.apply(x, num, den), (x,), g),
        "cpu C kernel group_rational fwd+bwd, (1, 8)": cpu_rational,
        "a fallback's bookkeeping (fallbacks.count)": lambda: fallbacks.count("kanc::group_rational", den, "dtype"),
    }


def measure(fns: dict[str, callable], calls: int, warmup: int) -> dict[str, dict[str, float]]:
    """Per-call times in us, the cases interleaved call by call so that load changes hit them alike."""
    out = {}
    for name, ms in interleaved_times_ms(fns, calls, warmup).items():
        us = [t * 1e3 for t in ms]
        median, p20, p80 = percentiles(us)
        out[name] = {"median_us": median, "p20_us": p20, "p80_us": p80, "min_us": min(us)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=3000, help="timed calls per case (medians over these)")
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    no_op_launches()
    load_before = os.getloadavg()
    results = measure(cases(), args.calls, args.warmup)
    load_after = os.getloadavg()
    print(f"host time per call, kernel launches no-ops; median of {args.calls} calls (load average {load_before[0]:.1f}"
          f" -> {load_after[0]:.1f} on {os.cpu_count()} CPUs: a loaded machine inflates every row alike)")  # fmt: skip
    floor = results["floor: empty autograd op fwd+bwd"]["median_us"]
    print(f"{'case':<46} {'median us':>10} {'p20':>8} {'p80':>8} {'/ floor':>8}  target")
    for name, r in results.items():
        target = f"<= {TARGETS_US[name]:.0f} us" if name in TARGETS_US else ""
        print(f"{name:<46} {r['median_us']:>10.1f} {r['p20_us']:>8.1f} {r['p80_us']:>8.1f} "
              f"{r['median_us'] / floor:>8.2f}  {target}")  # fmt: skip
    if args.out is not None:
        payload = {"benchmark": "host_overhead", "torch": torch.__version__, "command": " ".join(sys.argv),
                   "calls": args.calls, "load_average": [load_before, load_after], "results": results}  # fmt: skip
        args.out.write_text(json.dumps(payload, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
