"""Compile every kanc kernel for a GPU target without a GPU, as a launch compiles it, and report its registers, spills
and shared memory.

The launchers run on CPU tensors. Each ``kernel[grid](...)`` call goes through Triton's own launch path
(``JITFunction.run``) with ``warmup=True``: the JIT function's binder specialises the arguments exactly as a real
launch does (pointers 16-byte aligned, integers divisible by 16, integers equal to 1 such as a unit stride become
constants, and the constexprs and launch options of the config), Triton compiles that specialisation for the target
(default sm_90, an H100), and nothing is launched. A stand-in for Triton's driver names the target, since there is no
GPU. Registers, spills and shared memory are read from the ``ptxas -v`` report of Triton's own ptxas run (its flags,
its cubin), so they are those of the binary a launch loads. This checks the GPU code path (tl.dot shapes, constexpr
branches, resource limits) where the interpreter cannot; it measures no speed.

    python benchmarks/compile_report.py                        # ViT-B shapes, bf16, default configs, sm_90
    python benchmarks/compile_report.py --all-candidates --dtype float16 --arch 80 --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import sys
import tempfile
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"  # compile real kernels; nothing is launched
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from kanc.codegen import tuning  # noqa: E402

CONFIG_PREFIXES = ("BLOCK", "GROUP", "G_SPAN", "KIND", "ROWS", "SPLIT", "ACCUMULATE", "DETERMINISTIC")


class CompileOnlyDriver:
    """What ``JITFunction.run`` asks of Triton's active driver before it launches: the current device, its stream and
    the target to compile for. Enough to bind and compile with ``warmup=True``; nothing here can launch."""

    def __init__(self, target: GPUTarget) -> None:
        self.target = target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self) -> GPUTarget:
        return self.target


def compile_launches(target: GPUTarget, compiled: list, only: list[str] | None = None) -> None:
    """Route every launch through the JIT function's own binder and compiler with ``warmup=True`` (compile, never
    launch) for ``target``, appending (kernel, CompiledKernel, Triton's ptxas report of it) to ``compiled``: the report
    is empty when the launch reused a binary compiled earlier in this process. Kernels not in ``only`` are skipped."""
    launch = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        if only and self.__name__ not in only:
            return None
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            kernel = launch(self, *args, grid=grid, warmup=True, **kwargs)
        compiled.append((self, kernel, log.getvalue()))
        return kernel

    driver.set_active(CompileOnlyDriver(target))
    knobs.nvidia.dump_ptxas_log = True  # Triton prints the -v report of its own ptxas run (its flags)
    knobs.compilation.always_compile = True  # ... on every compile: no binary from the disk cache without one
    JITFunction.run = run


def describe(kernel: JITFunction, compiled) -> tuple[dict, dict]:
    """(the config: the tile constexprs and launch options; the specialisation the binder chose: the arguments it
    turned into constants because they equal 1, and those it declared divisible by 16)."""
    names = kernel.arg_names
    constants = {names[path[0]]: value for path, value in compiled.src.constants.items() if len(path) == 1}
    config = {k: v for k, v in constants.items() if k.startswith(CONFIG_PREFIXES)}
    options = {k: getattr(compiled.metadata, k) for k in ("num_warps", "num_stages")}
    constexpr_names = {p.name for p in kernel.params if p.is_constexpr}
    ones = sorted(k for k, v in constants.items() if k not in constexpr_names and v == 1)
    divisible = sorted(names[path[0]] for path, attrs in compiled.src.attrs.items() if ["tt.divisibility", 16] in attrs)
    return {**config, **options}, {"equal_to_1": ones, "divisible_by_16": divisible}


def ptxas_usage(log: str) -> dict:
    """Registers and spill bytes from a ``ptxas -v`` report."""
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if regs is None or spills is None:
        raise RuntimeError(f"no ptxas report in: {log[-500:]!r}")
    return {
        "registers": int(regs.group(1)),
        "spill_store_bytes": int(spills.group(1)),
        "spill_load_bytes": int(spills.group(2)),
    }


def run_launchers(
    dtype: torch.dtype,
    tokens: int,
    channels: int,
    hidden: int,
    groups: int,
    feats: list[int],
    kinds: list[str],
    all_candidates: bool,
) -> None:
    """Run every launcher (forward and backward) at one block shape (SNNK at each feature count and kind)."""
    from kanc.codegen.kernels import grkan_linear, linear_rational, rational, snnk

    x = torch.randn(tokens, channels).to(dtype)
    h = torch.randn(tokens, hidden).to(dtype)
    num, den = torch.randn(groups, 6), torch.randn(groups, 4)
    w1 = torch.randn(hidden, channels).to(dtype)
    w2 = torch.randn(channels, hidden).to(dtype)
    b = torch.zeros(channels).to(dtype)
    launches = [
        lambda: rational.rational_forward(h, num, den),
        lambda: rational.rational_backward(h, h, num, den),
        lambda: grkan_linear.grkan_linear_forward(h, num, den, w2, b),
        lambda: grkan_linear.grkan_linear_backward(x, h, num, den, w2, True),
        lambda: grkan_linear.grkan_linear_forward(x, num, den, w1, None),
        lambda: linear_rational.linear_rational_forward(x, w1, torch.zeros(hidden).to(dtype), num, den, True),
    ]
    for m in feats:
        g = torch.randn(m, channels)
        for kind in kinds:
            w = torch.randn(channels, m * (2 if kind == "cos" else 1)).to(dtype)
            launches.append(lambda g=g, w=w, kind=kind: snnk.snnk_forward(x, g, w, b, kind, 0.0, 1.0))
            launches.append(
                lambda g=g, w=w, kind=kind: snnk.snnk_backward(x, x, g, w, True, True, True, kind, 0.0, 1.0)
            )
    # all candidates: the bench of pick_config runs each one once (timed by a no-op clock)
    with tuning.autotuning("force" if all_candidates else "0"):
        for launch in launches:
            launch()
        with deterministic_algorithms():  # the backward kernels' coefficient sums without atomics
            launches[1]()
            launches[3]()


@contextlib.contextmanager
def deterministic_algorithms():
    """``torch.use_deterministic_algorithms(True)`` inside the block."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 (H100), 80 (A100)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--shape", default="vit_b", choices=["vit_b", "tiny"])
    parser.add_argument(
        "--feats", type=int, nargs="+", default=[256, 768], help="SNNK features m (768: ViT-B's default, hidden / 4)"
    )
    parser.add_argument("--kinds", nargs="+", default=["relu", "exp", "cos"], help="SNNK feature kinds")
    parser.add_argument("--all-candidates", action="store_true", help="every tuning candidate, not only the default")
    parser.add_argument("--only", nargs="+", default=None, help="kernel names to compile (default: all)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    shape = {"vit_b": (128 * 197, 768, 3072, 8), "tiny": (64, 32, 64, 4)}[args.shape]
    compiled: list = []
    compile_launches(GPUTarget("cuda", args.arch, 32), compiled, args.only)
    with tempfile.TemporaryDirectory() as cache:
        os.environ["KANC_CACHE_DIR"] = cache  # a fresh tuning cache: defaults (or every candidate), never past choices
        knobs.cache.dir = os.path.join(cache, "triton")
        tuning.cpu_bench = lambda fn, warmup=1, reps=3: (fn(), 1.0)[1]  # one compile per candidate
        run_launchers(getattr(torch, args.dtype), *shape, args.feats, args.kinds, args.all_candidates)
    rows, seen = [], set()
    for kernel, binary, log in compiled:
        if binary.hash in seen:
            continue
        seen.add(binary.hash)  # its first launch compiled it: that one has the report
        config, specialization = describe(kernel, binary)
        usage = ptxas_usage(log)
        row = {"kernel": kernel.__name__, "config": config, "shared_bytes": binary.metadata.shared, **usage}
        rows.append({**row, "specialization": specialization})
        print(f"{row['kernel']:<28} regs {row['registers']!s:>4}  spill {row['spill_store_bytes']!s:>5} B  "
              f"smem {row['shared_bytes']:>6} B  {row['config']}")  # fmt: skip
    if args.json:
        payload = {"arch": args.arch, "dtype": args.dtype, "shape": shape, "feats": args.feats, "kinds": args.kinds}
        args.json.write_text(json.dumps({**payload, "kernels": rows}))


if __name__ == "__main__":
    main()
