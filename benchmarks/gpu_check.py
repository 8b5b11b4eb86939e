"""The GPU check (``make gpu-check``): one prepared run on a machine with one H100/H200, every figure beside its target.

    make gpu-check                      # python benchmarks/gpu_check.py: bf16, ViT-B shapes, < 8 minutes
    SMOKE=1 make gpu-check              # tiny shapes on the CPU under Triton's interpreter: checks the script only

Steps, in this order (``--only`` picks some):
  tests        the GPU-marked tests (``pytest -m gpu tests``) with tuning off (KANC_AUTOTUNE=0: default configs)
  rational     bench_rational at ViT-B act1 (C 768) and act2 (3072): forward+backward GB/s as a share of the HBM peak,
               and its speed against the FlashKAT design (baselines.py, its forward then its backward)
  mlp_block    bench_mlp_block: the GR-KAN block at each placement of fc2's rational (prologue, epilogue, auto: the
               tuner's choice) against Linear-GELU-Linear under torch.compile, forward+backward and inference
  snnk         bench_snnk at m = hidden/4 and hidden/8 (relu) against the MLP it replaces, under torch.compile
  memory       peak memory of one forward+backward step of the GR-KAN block (each placement) over the MLP's
  host         host overhead at batch 8: the time to issue one step of the block against the step's time
  determinism  two backward runs bitwise equal under torch.use_deterministic_algorithms (or refused in one line)
  grkan_linear bench_grkan_linear at ViT-B fc1 and fc2 (no target: the fused layer against a plain Linear)

Kernel configs and the "auto" placement are tuned on first use (KANC_AUTOTUNE=1, cached in $KANC_CACHE_DIR): a
second run starts tuned. A step that would start after ``--budget-s`` seconds (default 440) is skipped and says so,
so that a run ends within 8 minutes; the seconds each step took are saved for the next run to plan with.

Output: a table on stdout and one JSON file (``benchmarks/results/gpu_check_<gpu>_<dtype>.json`` on a GPU, a temp
folder for a smoke run, or ``--out``): device, capability, versions, the exact command, each step's status and
seconds, every figure with its value, unit, target (from issue 17) and pass/fail, and the benchmark cases it came
from. A smoke run is labelled ``"smoke": true`` and ``"gpu_figures": false``; its numbers are the interpreter's.
Exit status: 0 when every step ran (whatever the figures), 1 when a step raised.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

import common  # noqa: E402

from kanc.errors import one_line  # noqa: E402

STEPS = ("tests", "rational", "mlp_block", "snnk", "memory", "host", "determinism", "grkan_linear")
# Rough cost of each step on an H100 with cold caches (kernel tuning, Triton and Inductor compiles), in seconds:
# a step starts only if the budget leaves it this much. Guesses until a GPU run records the real ones.
ESTIMATE_S = dict(tests=150, rational=50, mlp_block=90, snnk=45, memory=15, host=15, determinism=15, grkan_linear=60)
TESTS_TIMEOUT_S = 180
VIT_B = SimpleNamespace(tokens=128 * 197, channels=768, hidden=3072, groups=8, host_tokens=8 * 197)
SMOKE = SimpleNamespace(tokens=37, channels=24, hidden=48, groups=4, host_tokens=2 * 5)


class Figure(dict):
    """One figure: name, value, unit, target (op and bound, or None), pass (None without a target), step, note."""

    def __init__(self, name: str, value: float, unit: str, target: tuple[str, float] | None, step: str, note=""):
        ok = None if target is None else _meets(float(value), *target)
        bound = None if target is None else {"op": target[0], "value": target[1]}
        super().__init__(name=name, value=float(value), unit=unit, target=bound, passed=ok, step=step, note=note)


def _meets(value: float, op: str, bound: float) -> bool:
    if not math.isfinite(value):
        return False
    return {"<=": value <= bound, ">=": value >= bound, "<": value < bound, "==": value == bound}[op]


# ------------------------------------------------------------------------------------------------------- steps


def step_tests(ctx) -> list[Figure]:
    """pytest -m gpu over the whole suite, tuning off, in a child process bounded by TESTS_TIMEOUT_S."""
    env = {
        **os.environ,
        "KANC_AUTOTUNE": "0",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", str(ROOT / "tests")]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TESTS_TIMEOUT_S)
        out, code = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        out, code = f"{e.stdout or ''}\ntimed out after {TESTS_TIMEOUT_S} s", -1
    counts = {k.rstrip("s"): int(n) for n, k in re.findall(r"(\d+) (passed|failed|errors?|skipped|deselected)", out)}
    failed = counts.get("failed", 0) + counts.get("error", 0)
    failed += 1 if code not in (0, 5) and failed == 0 else 0  # a crash or a timeout counts as one failure (5: none ran)
    ctx.cases["tests"] = {"command": " ".join(cmd), "exit_code": code, "counts": counts, "tail": out[-3000:]}
    print(out[-1500:])
    figures = [Figure("gpu_tests_failed", failed, "tests", ("==", 0), "tests")]
    note = "none can run without a GPU" if ctx.smoke else ""
    figures.append(
        Figure("gpu_tests_passed", counts.get("passed", 0), "tests", None if ctx.smoke else (">=", 1), "tests", note)
    )
    return figures


def step_rational(ctx) -> list[Figure]:
    import bench_rational as bench

    peak = ctx.peaks.memory_gbps
    figures = []
    for act, channels in (("act1", ctx.shape.channels), ("act2", ctx.shape.hidden)):
        keep = {bench.KANC, bench.FLASHKAT}.__contains__
        case = bench.run_case(f"{ctx.name}_{act}", ctx.shape.tokens, channels, ctx.shape.groups, *ctx.bench_args, keep)
        ctx.cases.setdefault("rational", []).append(case)
        kanc, flashkat = _row(case, bench.KANC, "forward+backward"), _row(case, bench.FLASHKAT, "forward+backward")
        note = f"{kanc['gbps']:.0f} GB/s of {peak:.0f} ({ctx.peaks.source})"
        pct = 100 * kanc["gbps"] / peak
        figures.append(Figure(f"rational_{act}_fwd_bwd_pct_of_hbm_peak", pct, "%", (">=", 75), "rational", note))
        speedup = flashkat["median_ms"] / kanc["median_ms"]
        figures.append(Figure(f"rational_{act}_fwd_bwd_speedup_vs_flashkat", speedup, "x", (">=", 1.5), "rational"))
    return figures


def step_mlp_block(ctx) -> list[Figure]:
    import bench_mlp_block as bench

    compiled_mlp = f"Linear-GELU-Linear torch.compile({ctx.backend})"
    auto = bench.kanc_impl("auto", ctx.backend)
    wanted = {bench.kanc_impl(p) for p in bench.PLACEMENTS} | {auto, compiled_mlp}
    s = ctx.shape
    case = bench.run_case(ctx.name, s.tokens, s.channels, s.hidden, *ctx.bench_args, s.groups, wanted.__contains__)
    ctx.cases["mlp_block"] = case
    ctx.choices["auto_placement"] = case["auto_placement"]
    figures = []
    for pass_, label, bound in (("forward+backward", "fwd_bwd", 1.15), ("inference", "inference", 1.10)):
        ratio = _row(case, auto, pass_)["vs_mlp_compiled"]
        note = f"auto chose {case['auto_placement'][pass_]}; both compiled"
        figures.append(Figure(f"mlp_block_{label}_vs_mlp_compiled", ratio, "x", ("<=", bound), "mlp_block", note))
        eager = {p: _row(case, bench.kanc_impl(p), pass_) for p in bench.PLACEMENTS}
        for placement in ("prologue", "epilogue"):
            ratio = eager[placement]["vs_mlp_compiled"]
            figures.append(
                Figure(f"mlp_block_{placement}_{label}_vs_mlp_compiled", ratio, "x", None, "mlp_block", "eager")
            )
        ratio = eager["auto"]["median_ms"] / min(eager["prologue"]["median_ms"], eager["epilogue"]["median_ms"])
        note = "eager; 1.0 = auto ran the faster placement"
        figures.append(
            Figure(f"mlp_block_{label}_auto_vs_faster_placement", ratio, "x", ("<=", 1.05), "mlp_block", note)
        )
    return figures


def step_snnk(ctx) -> list[Figure]:
    import bench_snnk as bench

    s, figures = ctx.shape, []
    fused = "kanc fused (features on chip)"
    for fraction in (4, 8):
        feats = s.hidden // fraction
        args = (f"{ctx.name}_m{feats}_relu", s.tokens, s.channels, s.hidden, feats, "relu", *ctx.bench_args)
        case = bench.run_case(*args, {fused}.__contains__)
        ctx.cases.setdefault("snnk", []).append(case)
        note = f"m = {feats}; break-even m (FLOPs) = {case['shapes']['break_even_m']:.0f}"
        for pass_, label in (("forward+backward", "fwd_bwd"), ("forward", "forward")):
            ratio = _row(case, fused, pass_)["vs_mlp_compiled"]
            name = f"snnk_m_hidden_over_{fraction}_{label}_vs_mlp_compiled"
            figures.append(Figure(name, ratio, "x", ("<", 1.0), "snnk", note))
    return figures


def step_memory(ctx) -> list[Figure]:
    """Peak memory of one forward+backward step (inputs and parameters excluded) over the MLP's under compile."""
    torch, s = ctx.torch, ctx.shape
    kan, mlp, x, dy = _block_and_mlp(ctx, s.tokens)
    compiled_mlp = torch.compile(mlp, backend=ctx.backend)
    step = lambda fn, module: lambda: _train_step(fn, module, x, dy)
    peaks = {"mlp_compiled": _peak_bytes(ctx, step(compiled_mlp, mlp)), "mlp_eager": _peak_bytes(ctx, step(mlp, mlp))}
    for placement in ("prologue", "epilogue", "auto"):
        kan.placement = placement
        peaks[placement] = _peak_bytes(ctx, step(kan, kan))
    ctx.cases["memory"] = {"peak_bytes": peaks, "method": _memory_method(ctx)}
    base = peaks["mlp_compiled"]
    note = f"auto placement, eager; the MLP's step peaks at {base / 2**20:.1f} MiB"
    figures = [Figure("peak_memory_vs_mlp_compiled", peaks["auto"] / base, "x", ("<=", 1.1), "memory", note)]
    for placement in ("prologue", "epilogue"):
        figures.append(Figure(f"peak_memory_{placement}_vs_mlp_compiled", peaks[placement] / base, "x", None, "memory"))
    return figures


def step_host(ctx) -> list[Figure]:
    """At batch 8: the host time to issue one training step against the step's time (hidden when well below it)."""
    kan, mlp, x, dy = _block_and_mlp(ctx, ctx.shape.host_tokens)
    kan.placement = "auto"
    figures = []
    for name, module in (("grkan_block", kan), ("mlp", mlp)):
        fn = lambda module=module: _train_step(module, module, x, dy)
        host_ms, step_ms = _host_ms(ctx, fn), ctx.bench(fn, grad_to_none=[x, *module.parameters()])["median_ms"]
        ctx.cases.setdefault("host", {})[name] = {"host_ms": host_ms, "step_ms": step_ms, "method": _host_method(ctx)}
        target = ("<=", 0.8) if name == "grkan_block" else None
        note = f"host {host_ms:.3f} ms to issue a step of {step_ms:.3f} ms"
        figures.append(Figure(f"host_overhead_{name}_batch8", host_ms / step_ms, "x", target, "host", note))
    return figures


def step_determinism(ctx) -> list[Figure]:
    """Gradients of two identical backward runs, bitwise, with torch.use_deterministic_algorithms(True, warn_only)."""
    torch, figures = ctx.torch, []
    for name, run in _determinism_runs(ctx).items():
        before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
        torch.use_deterministic_algorithms(True, warn_only=True)
        try:
            first, second = run(), run()
            same, note = all(torch.equal(a, b) for a, b in zip(first, second)), ""
        except Exception as e:  # noqa: BLE001 - a refusal in one line is an accepted answer (issue 13, item 6)
            same, note = True, f"refused: {one_line(e)[:300]}"
        finally:
            torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        figures.append(Figure(f"deterministic_backward_{name}", float(same), "bool", ("==", 1), "determinism", note))
    return figures


def step_grkan_linear(ctx) -> list[Figure]:
    import bench_grkan_linear as bench

    s, figures = ctx.shape, []
    plain = f"plain Linear torch.compile({ctx.backend})"
    for fc in ("fc1", "fc2"):
        wanted = {"kanc fused (rational in prologue)", plain}.__contains__
        args = (f"{ctx.name}_{fc}", s.tokens, s.channels, s.hidden, fc, *ctx.bench_args, s.groups, wanted)
        case = bench.run_case(*args)
        ctx.cases.setdefault("grkan_linear", []).append(case)
        fused_ms = _row(case, "kanc fused (rational in prologue)", "forward+backward")["median_ms"]
        ratio = fused_ms / _row(case, plain, "forward+backward")["median_ms"]
        note = "the rational's cost on top of the matmul"
        figures.append(Figure(f"grkan_linear_{fc}_fwd_bwd_vs_plain_linear", ratio, "x", None, "grkan_linear", note))
    return figures


# ----------------------------------------------------------------------------------------------------- helpers


def _row(case: dict, impl: str, pass_: str) -> dict:
    return next(r for r in case["results"] if r["impl"] == impl and r["pass"] == pass_)


def _block_and_mlp(ctx, tokens: int):
    """A GR-KAN block and the Linear-GELU-Linear it stands for, at the run's widths and dtype, with x and dy."""
    from kanc.nn import GRKANMlp, Mlp

    torch, s = ctx.torch, ctx.shape
    torch.manual_seed(0)
    kan = GRKANMlp(s.channels, s.hidden, groups=s.groups, act_init="gelu").to(ctx.device, ctx.dtype)
    mlp = Mlp(s.channels, s.hidden, act="gelu").to(ctx.device, ctx.dtype)
    x = torch.randn(tokens, s.channels, device=ctx.device, dtype=ctx.dtype, requires_grad=True)
    return kan, mlp, x, torch.randn(tokens, s.channels, device=ctx.device, dtype=ctx.dtype)


def _train_step(fn, module, x, dy) -> None:
    for p in (x, *module.parameters()):
        p.grad = None
    fn(x).backward(dy)


def _peak_bytes(ctx, fn: Callable[[], None]) -> float:
    """Bytes allocated at the peak of ``fn()`` above what was allocated before it (warm: run once first)."""
    torch = ctx.torch
    fn()
    if ctx.device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return float(torch.cuda.max_memory_allocated() - base)
    with LiveBytes() as live:
        fn()
    return float(live.peak)


def _memory_method(ctx) -> str:
    if ctx.device.type == "cuda":
        return "torch.cuda.max_memory_allocated above the allocation before the step"
    return "CPU smoke: peak bytes of live tensors produced by the step's ops (a dispatch mode)"


class LiveBytes:
    """Peak bytes held by the storages of tensors created inside the block (CPU stand-in for the CUDA allocator's
    peak): every op output's storage is counted once until it is freed."""

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        live = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                live.add(out)
                return out

        self.peak, self.held, self.mode = 0, {}, Mode()
        self.mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.mode.__exit__(*exc)

    def add(self, out) -> None:
        from torch.multiprocessing.reductions import StorageWeakRef
        from torch.utils._pytree import tree_leaves

        self.held = {k: (ref, n) for k, (ref, n) in self.held.items() if not ref.expired()}  # drop freed storages
        for t in tree_leaves(out):
            if hasattr(t, "untyped_storage"):
                storage = t.untyped_storage()
                if storage.data_ptr() not in self.held and storage.nbytes():
                    self.held[storage.data_ptr()] = (StorageWeakRef(storage), storage.nbytes())
        self.peak = max(self.peak, sum(n for _, n in self.held.values()))


def _host_ms(ctx, fn: Callable[[], None], steps: int = 10) -> float:
    """Host milliseconds to issue one call of ``fn``. CUDA: the GPU is kept busy by a sleep kernel queued first, so
    launches only enqueue and the wall clock is the host's. CPU (smoke): ``fn`` with every Triton launch a no-op."""
    torch = ctx.torch
    fn()
    if ctx.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda._sleep(2_000_000_000)  # ~1 s of GPU time: longer than the host needs to issue the steps
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        elapsed = time.perf_counter() - start
        torch.cuda.synchronize()
        return 1e3 * elapsed / steps
    with no_triton_launches():
        return ctx.bench(fn)["median_ms"]


def _host_method(ctx) -> str:
    if ctx.device.type == "cuda":
        return "wall clock of issuing 10 steps behind a GPU sleep kernel / do_bench step time"
    return "CPU smoke: the step with Triton launches made no-ops / the step with them (interpreter)"


@contextlib.contextmanager
def no_triton_launches():
    """``kernel[grid](...)`` does nothing inside the block (every Triton kernel, compiled or interpreted)."""
    from triton.runtime.jit import KernelInterface

    original = KernelInterface.__getitem__
    KernelInterface.__getitem__ = lambda self, grid: lambda *args, **kwargs: None
    try:
        yield
    finally:
        KernelInterface.__getitem__ = original


def _determinism_runs(ctx) -> dict[str, Callable[[], list]]:
    """name -> a function running one forward+backward and returning every gradient (fresh each call)."""
    from kanc.codegen import group_rational
    from kanc.codegen.snnk import snnk_block
    from kanc.nn.snnk import random_projection

    torch, s = ctx.torch, ctx.shape
    kan, _, x, dy = _block_and_mlp(ctx, s.tokens)
    gen = torch.Generator().manual_seed(0)
    num = (0.3 * torch.randn(s.groups, 6, generator=gen)).to(ctx.device).requires_grad_()
    den = torch.randn(s.groups, 4, generator=gen).to(ctx.device).requires_grad_()
    h = (2 * torch.randn(s.tokens, s.hidden, generator=gen)).to(ctx.device, ctx.dtype).requires_grad_()
    dh = torch.randn(s.tokens, s.hidden, generator=gen).to(ctx.device, ctx.dtype)
    feats = s.hidden // 4
    g = random_projection(feats, s.channels, seed=0).to(ctx.device)
    w = (torch.randn(s.channels, feats, generator=gen) / feats**0.5).to(ctx.device, ctx.dtype).requires_grad_()
    b = torch.zeros(s.channels, device=ctx.device, dtype=ctx.dtype, requires_grad=True)

    def grads(out, grad, leaves):
        return list(torch.autograd.grad(out, leaves, grad))

    def block(placement):
        def run():
            kan.placement = placement
            return grads(kan(x), dy, [x, *kan.parameters()])

        return run

    return {
        "rational": lambda: grads(group_rational(h, num, den), dh, [h, num, den]),
        "grkan_block_prologue": block("prologue"),
        "grkan_block_epilogue": block("epilogue"),
        "snnk": lambda: grads(snnk_block(x, g, w, b, "relu", 0.0, 1.0), dy, [x, w, b]),
    }


# -------------------------------------------------------------------------------------------------------- main

STEP_FUNCTIONS = {name: globals()[f"step_{name}"] for name in STEPS}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    smoke = os.environ.get("SMOKE") == "1"
    parser.add_argument("--smoke", action="store_true", default=smoke, help="tiny shapes on the CPU (also SMOKE=1)")
    parser.add_argument("--only", nargs="+", choices=STEPS, default=None, help="run these steps only")
    parser.add_argument("--budget-s", type=float, default=440.0, help="start no step that would end after this")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default: benchmarks/results/ on a GPU)")
    parser.add_argument("--warmup", type=int, default=25, help="do_bench warmup in ms")
    parser.add_argument("--rep", type=int, default=100, help="do_bench repetition time in ms")
    args = parser.parse_args()
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the first triton import
    args.dtype = "float32" if args.smoke else "bfloat16"
    args.compile_backend = "aot_eager" if args.smoke else "inductor"
    return args


def make_context(args: argparse.Namespace) -> SimpleNamespace:
    torch, device, dtype = common.setup(args)
    from kanc.runtime.devices import device_peaks

    bench = _smoke_timer if args.smoke else common.timer(device, args)
    shape, name = (SMOKE, "smoke") if args.smoke else (VIT_B, "vit_b")
    ctx = SimpleNamespace(torch=torch, device=device, dtype=dtype, bench=bench, backend=args.compile_backend)
    ctx.smoke, ctx.shape, ctx.name, ctx.peaks, ctx.cases, ctx.choices = (
        args.smoke,
        shape,
        name,
        device_peaks(device),
        {},
        {},
    )
    ctx.bench_args = (torch, device, dtype, bench, args.compile_backend)
    return ctx


def _smoke_timer(fn, grad_to_none=None) -> dict[str, float]:
    """One call, timed: the interpreter's times mean nothing, a smoke run only has to finish (and soon, in CI)."""
    from kanc.timing import wall_times_ms

    (ms,) = wall_times_ms(fn, reps=1, warmup=0)
    return {"median_ms": ms, "p20_ms": ms, "p80_ms": ms}


def run_steps(ctx, steps: list[str], budget_s: float) -> tuple[list[Figure], dict[str, dict]]:
    figures, status, start = [], {}, time.perf_counter()
    for name in steps:
        elapsed = time.perf_counter() - start
        if not ctx.smoke and elapsed + ESTIMATE_S[name] > budget_s:
            status[name] = {"status": f"skipped: time budget ({elapsed:.0f} s used of {budget_s:.0f})", "seconds": 0.0}
            continue
        print(f"\n=== {name} ({elapsed:.0f} s elapsed)", flush=True)
        t0 = time.perf_counter()
        try:
            figures += STEP_FUNCTIONS[name](ctx)
            status[name] = {"status": "ok"}
        except Exception as e:  # noqa: BLE001 - one step's failure is recorded; the others still run
            status[name] = {"status": f"error: {one_line(e)[:300]}"}
        status[name]["seconds"] = time.perf_counter() - t0
    return figures, status


def print_figures(figures: list[Figure], status: dict, smoke: bool) -> None:
    if smoke:
        print(
            "\nSMOKE RUN: Triton interpreter on the CPU; the figures below check the script, they are not GPU figures."
        )
    print(f"\n{'figure':<52} {'value':>10} {'unit':<6} {'target':<10} result")
    for f in figures:
        target = f"{f['target']['op']} {f['target']['value']:g}" if f["target"] else "-"
        verdict = "-" if f["passed"] is None else ("PASS" if f["passed"] else "FAIL")
        print(f"{f['name']:<52} {f['value']:>10.4g} {f['unit']:<6} {target:<10} {verdict}  {f['note']}")
    for name, s in status.items():
        print(f"step {name:<14} {s['status']:<50} {s['seconds']:.1f} s")


def main() -> int:
    args = parse_args()
    ctx = make_context(args)
    steps = [s for s in STEPS if args.only is None or s in args.only]
    t0 = time.perf_counter()
    figures, status = run_steps(ctx, steps, args.budget_s)
    env = common.environment(ctx.torch, ctx.device)
    targets = [f for f in figures if f["passed"] is not None]
    summary = {"figures": len(figures), "with_target": len(targets), "passed": sum(bool(f["passed"]) for f in targets)}
    payload = {"benchmark": "gpu_check", **env, "dtype": args.dtype, "smoke": args.smoke}
    if args.smoke and "--smoke" not in sys.argv:
        payload["command"] = f"SMOKE=1 {env['command']}"  # the switch came from the environment (make gpu-check)
    payload.update(
        compile_backend=ctx.backend,
        gpu_figures=ctx.device.type == "cuda" and not args.smoke,
        label="SMOKE RUN: interpreter on the CPU, not GPU figures" if args.smoke else "GPU run",
        shapes=vars(ctx.shape),
        peaks=ctx.peaks.to_json(),
        budget_s=args.budget_s,
        elapsed_s=time.perf_counter() - t0,
        steps=status,
        choices=ctx.choices,
        figures=figures,
        summary=summary,
        cases=ctx.cases,
    )
    print_figures(figures, status, args.smoke)
    print(f"\n{summary['passed']} of {summary['with_target']} figures meet their targets")
    print(f"wrote {common.write('gpu_check', payload, args, ctx.device)}")
    return 1 if any(s["status"].startswith("error") for s in status.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
