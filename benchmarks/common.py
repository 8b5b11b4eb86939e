"""Shared harness of kanc's benchmarks: arguments, timing with quantiles, hand-counted metrics, JSON output.

Every script prints a table and writes one JSON file holding the device, the versions, the exact command, the
shapes, and for each implementation the median and the 20th/80th percentile times, with GB/s or TFLOP/s computed
from bytes and FLOPs counted by hand (not by a profiler). Timing is ``triton.testing.do_bench`` on CUDA (CUDA events,
L2 flushed between runs); ``--smoke`` runs tiny shapes on the CPU under Triton's interpreter with a wall clock, to
check that the scripts work, never to measure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

QUANTILES = (0.5, 0.2, 0.8)
RESULTS_DIR = Path(__file__).resolve().parent / "results"
DTYPES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16", "float32": "float32"}


def parse_args(description: str, shape_names: list[str]) -> argparse.Namespace:
    """The options every benchmark takes; ``--smoke`` switches to the interpreter before triton is imported."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU interpreter (checks, no figures)")
    parser.add_argument("--shapes", nargs="+", default=None, help=f"subset of {shape_names}")
    parser.add_argument("--dtype", default=None, help="bfloat16 (GPU default), float16 or float32 (smoke default)")
    parser.add_argument("--compile-backend", default=None, help="torch.compile backend (inductor; smoke: aot_eager)")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default: benchmarks/results/ on a GPU)")
    parser.add_argument("--warmup", type=int, default=25, help="do_bench warmup in ms")
    parser.add_argument("--rep", type=int, default=100, help="do_bench repetition time in ms")
    args = parser.parse_args()
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first triton import
    args.dtype = DTYPES.get(args.dtype or ("float32" if args.smoke else "bfloat16"))
    if args.dtype is None:
        parser.error(f"--dtype must be one of {sorted(DTYPES)}")
    args.compile_backend = args.compile_backend or ("aot_eager" if args.smoke else "inductor")
    unknown = set(args.shapes or []) - set(shape_names)
    if unknown:
        parser.error(f"unknown shapes {sorted(unknown)}; known: {shape_names}")
    return args


def setup(args: argparse.Namespace):
    """(torch, device, dtype): CUDA when present; the CPU only with --smoke (there is nothing to measure there)."""
    import torch

    if torch.cuda.is_available() and not args.smoke:
        return torch, torch.device("cuda"), getattr(torch, args.dtype)
    if not args.smoke:
        sys.exit("no CUDA device: these benchmarks measure GPU kernels (use --smoke to check the scripts on a CPU)")
    return torch, torch.device("cuda" if torch.cuda.is_available() else "cpu"), getattr(torch, args.dtype)


def timer(device, args: argparse.Namespace) -> Callable[..., dict[str, float]]:
    """fn -> {"median_ms", "p20_ms", "p80_ms"}: do_bench on CUDA, a wall clock under the interpreter."""
    if device.type == "cuda":
        import triton

        def bench(fn, grad_to_none=None):
            med, p20, p80 = triton.testing.do_bench(
                fn, warmup=args.warmup, rep=args.rep, quantiles=list(QUANTILES), grad_to_none=grad_to_none
            )
            return {"median_ms": med, "p20_ms": p20, "p80_ms": p80}

        return bench

    def wall_clock(fn, grad_to_none=None, reps: int = 3):
        from kanc.timing import wall_times_ms

        times = sorted(wall_times_ms(fn, reps=reps, warmup=1))
        return {"median_ms": statistics.median(times), "p20_ms": times[0], "p80_ms": times[-1]}

    return wall_clock


def metrics(timing: dict[str, float], bytes_moved: float | None = None, flops: float | None = None) -> dict:
    """Timing plus GB/s and TFLOP/s at the median (hand-counted bytes and FLOPs are stored beside them)."""
    seconds = timing["median_ms"] * 1e-3
    out: dict[str, Any] = dict(timing)
    if bytes_moved is not None:
        out.update(bytes=bytes_moved, gbps=bytes_moved / seconds / 1e9 if seconds > 0 else None)
    if flops is not None:
        out.update(flops=flops, tflops=flops / seconds / 1e12 if seconds > 0 else None)
    return out


def environment(torch, device) -> dict[str, Any]:
    import triton

    import kanc
    from kanc.env import interpreting

    env = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (triton interpreter)",
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "triton": triton.__version__,
            "kanc": kanc.__version__,
            "cuda": torch.version.cuda,
        },
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "interpreter": interpreting(),
        "timing": "triton.testing.do_bench (CUDA events, L2 flushed)" if device.type == "cuda" else "wall clock",
        "quantiles": list(QUANTILES),
    }
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        env["capability"] = f"sm{major}{minor}"
    return env


def write(name: str, payload: dict[str, Any], args: argparse.Namespace, device) -> Path:
    """Write the JSON atomically; GPU runs default to benchmarks/results/, smoke runs to a temp folder."""
    if args.out is not None:
        path = args.out
    elif device.type == "cuda" and not args.smoke:
        slug = re.sub(r"[^A-Za-z0-9]+", "_", payload["device"]).strip("_").lower()
        path = RESULTS_DIR / f"{name}_{slug}_{args.dtype}.json"
    else:
        path = Path(tempfile.gettempdir()) / "kanc-bench" / f"{name}_smoke.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    from kanc.writing import write_text  # after the caller set TRITON_INTERPRET (kanc imports torch)

    return write_text(path, json.dumps(payload, indent=1), force=True)


def print_table(cases: list[dict[str, Any]], smoke: bool = False) -> None:
    if smoke:
        print("SMOKE RUN: Triton interpreter on the CPU; the times below check the script, they measure nothing.")
    for case in cases:
        print(f"\n== {case['name']}  {case['shapes']}")
        print(f"{'implementation':<48} {'pass':<17} {'median ms':>10} {'p20':>9} {'p80':>9} {'GB/s':>8} {'TFLOP/s':>8}")
        for r in case["results"]:
            gbps = f"{r['gbps']:.0f}" if r.get("gbps") else "-"
            tflops = f"{r['tflops']:.1f}" if r.get("tflops") else "-"
            print(
                f"{r['impl']:<48} {r['pass']:<17} {r['median_ms']:>10.4f} {r['p20_ms']:>9.4f} {r['p80_ms']:>9.4f} "
                f"{gbps:>8} {tflops:>8}"
            )


def max_error(actual, expected) -> float:
    """max |actual - expected| over finite entries, in fp64 (the correctness check beside every timing)."""
    a, e = actual.detach().double(), expected.detach().double()
    finite = a.isfinite() & e.isfinite()
    return float((a - e)[finite].abs().max()) if finite.any() else 0.0


def element_size(dtype) -> int:
    return dtype.itemsize


def run(
    benchmark: str,
    description: str,
    shapes: dict[str, tuple],
    smoke_shapes: dict[str, tuple],
    case: Callable[[str, tuple, SimpleNamespace], dict[str, Any]],
    extra: Callable[[dict[str, Any], list[dict[str, Any]]], dict[str, Any]] | None = None,
    report: Callable[[list[dict[str, Any]]], None] | None = None,
) -> None:
    """A benchmark's main: parse the options, run ``case(name, shape_spec, ctx)`` for each shape (``ctx`` holds
    torch, device, dtype, bench, backend and smoke), then print the table and write the JSON. ``extra(env, cases)``
    adds payload fields (and may annotate the cases); ``report(cases)`` prints lines after the table."""
    args = parse_args(description, list(shapes) + list(smoke_shapes))
    torch, device, dtype = setup(args)
    names = args.shapes or list(smoke_shapes if args.smoke else shapes)
    ctx = SimpleNamespace(torch=torch, device=device, dtype=dtype, bench=timer(device, args),
                          backend=args.compile_backend, smoke=args.smoke)  # fmt: skip
    env = environment(torch, device)
    table = {**shapes, **smoke_shapes}
    cases = [case(name, table[name], ctx) for name in names]
    payload = {"benchmark": benchmark, **env, "dtype": args.dtype, "smoke": args.smoke,
               "compile_backend": args.compile_backend}  # fmt: skip
    if extra is not None:
        payload.update(extra(env, cases))
    payload["cases"] = cases
    print_table(cases, args.smoke)
    if report is not None:
        report(cases)
    print(f"\nwrote {write(benchmark, payload, args, device)}")
