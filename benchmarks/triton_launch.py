"""What one ``kernel[grid](...)`` costs on the host under Triton's own launcher (not the interpreter), and what a
launch that skips its per-call work would cost: CPU only, no GPU, no compilation.

Triton's ``JITFunction.run`` does, per call: read three knobs, ask the driver for the current device and stream, run
the pre-run hooks, bind the arguments and compute their specialisation (each tensor's dtype and 16-byte alignment,
each integer's value == 1 / divisibility by 16) with ``native_specialize_impl``, build the cache key
(``compute_cache_key``), look the compiled kernel up, check that no global it read has changed, build the launch
metadata and call the C launcher. Here the driver is a stub (device 0, stream 0, an sm_90 target) and the compiled
kernel a stand-in whose launcher does nothing, so every figure is Python host time:

- ``kernel[grid](...)``: the public launch (kanc's launchers use it);
- ``kernel.run(..., grid=, warmup=False)``: the same without ``__getitem__``'s lambda;
- ``binder(*args)``: the argument binding and specialisation alone;
- ``direct CompiledKernel.run``: the C launcher called with a cached compiled kernel, plus the per-call checks that
  keep it safe: each pointer's 16-byte alignment (the specialisation the cached kernel was compiled for) and the
  current stream;
- ``kanc launch_planned``: what kanc's launchers do per launch on a GPU (``kernels.common.launch_planned``: the
  compiled kernel's launcher kept by the plan after its first launch, pointers checked for alignment).

    python benchmarks/triton_launch.py [--calls 20000]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

os.environ["TRITON_INTERPRET"] = "0"  # Triton's own launcher, not the interpreter

import torch  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class StubDriver:
    """The calls JITFunction.run makes on the active driver, answered without a GPU."""

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int) -> int:
        return 0

    def get_current_target(self) -> GPUTarget:
        return GPUTarget("cuda", 90, 32)


class StubKernel:
    """A compiled kernel whose launcher does nothing."""

    function, packed_metadata = 0, ()

    def launch_metadata(self, grid, stream, *args):
        return None

    def run(self, *args):
        return None

    def __getitem__(self, grid):
        return lambda *args: None


def stub_compile(self, key, signature, device, constexprs, options, attrs, warmup):
    kernel = StubKernel()
    self.device_caches[device][0][key] = kernel
    return kernel


def per_call_us(fn, calls: int) -> float:
    for _ in range(200):
        fn()
    times = []
    for _ in range(calls // 100):
        start = time.perf_counter()
        for _ in range(100):
            fn()
        times.append((time.perf_counter() - start) * 1e4)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20000)
    args = parser.parse_args()
    driver.set_active(StubDriver())
    JITFunction._do_compile = stub_compile
    from kanc.codegen.kernels import common
    from kanc.codegen.kernels.rational import _rational_fwd_kernel as kernel

    x, y = torch.empty(64, 768), torch.empty(64, 768)
    num, den = torch.empty(8, 6), torch.empty(8, 4)
    launch = (x, y, num, den, 64, 768, 96, 768, 768, 6, 4, False, 16, 128)
    grid = (4, 6)
    compiled = kernel.run(*launch, grid=grid, warmup=False, num_warps=4)
    binder = kernel.device_caches[0][4]
    pointers = launch[:4]

    def direct():
        if any(t.data_ptr() % 16 for t in pointers):
            raise AssertionError("misaligned: the cached kernel was compiled for 16-byte aligned pointers")
        stream = driver.active.get_current_stream(0)
        compiled.run(*grid, 1, stream, compiled.function, compiled.packed_metadata, None, None, None, *launch)

    common._COMPILED = StubKernel  # the stand-in counts as a compiled kernel
    plan = SimpleNamespace(grid=grid, args=launch[4:], options={"num_warps": 4}, record=None, direct=[])
    common.launch_planned(kernel, plan, *pointers)  # the first launch keeps the compiled kernel's launcher
    cases = {
        "kernel[grid](...)": lambda: kernel[grid](*launch, num_warps=4),
        "kernel.run(..., grid=, warmup=False)": lambda: kernel.run(*launch, grid=grid, warmup=False, num_warps=4),
        "binder(*args) alone": lambda: binder(*launch, num_warps=4),
        "direct CompiledKernel.run + checks": direct,
        "kanc launch_planned (direct)": lambda: common.launch_planned(kernel, plan, *pointers),
        "floor: a Python call with 14 args": lambda: compiled.run(*launch),
    }
    load = os.getloadavg()[0]
    print(
        f"host time per launch, {args.calls} calls, stub driver and launcher (load average {load:.1f} on "
        f"{os.cpu_count()} CPUs)"
    )
    for name, fn in cases.items():
        print(f"{name:<40} {per_call_us(fn, args.calls):8.2f} us")


if __name__ == "__main__":
    main()
