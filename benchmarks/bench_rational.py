"""Group-rational activation: kanc's kernels vs the PyTorch reference (eager, torch.compile) and, for the backward,
the KAT per-element-atomic design and the FlashKAT per-program-reduction design (FlashKAT also forward and
forward+backward: its forward is KAT's elementwise kernel).

    python benchmarks/bench_rational.py                      # GPU, bf16, every shape
    python benchmarks/bench_rational.py --shapes vit_b --dtype float16
    python benchmarks/bench_rational.py --smoke               # CPU interpreter, tiny shapes: checks the script only

Counted by hand per element (N elements, s bytes per element of the I/O dtype):
forward 21 FLOPs, 2 s bytes (read x, write y); backward ~65 FLOPs, 3 s bytes (read x and dy, write dx).
GB/s is the effective bandwidth at those ideal bytes (the same for every implementation, so it ranks them by time);
"pct_of_hbm_peak" compares it with the device's datasheet HBM bandwidth where the device is known.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402

SHAPES = {  # name: (tokens, channels, groups)
    "vit_b_act1": (128 * 197, 768, 8),
    "vit_b_act2": (128 * 197, 3072, 8),
    "vit_s_act1": (128 * 197, 384, 8),
    "vit_s_act2": (128 * 197, 1536, 8),
    "gpt2_small_act1": (8 * 1024, 768, 8),
    "gpt2_small_act2": (8 * 1024, 3072, 8),
}
SMOKE_SHAPES = {"smoke": (37, 48, 4)}
FLOPS = {"forward": 21, "backward": 65, "forward+backward": 86}
HBM_PEAK_GBPS = {"H100 80GB HBM3": 3350, "H100 PCIe": 2000, "H100 NVL": 3900, "H200": 4800, "A100-SXM4-80GB": 2039}


def hbm_peak(device_name: str) -> float | None:
    return next((v for k, v in HBM_PEAK_GBPS.items() if k in device_name), None)


KANC, FLASHKAT, KAT = "kanc kernel", "FlashKAT design (per-program sums)", "KAT design (per-element atomics)"


def run_case(name, tokens, channels, groups, torch, device, dtype, bench, compile_backend, keep=None):
    """One shape: every implementation and pass (``keep(impl)`` picks a subset; default all)."""
    from baselines import flashkat_atomics, flashkat_backward, flashkat_forward, kat_atomics, kat_backward

    from kanc.codegen import rational_ref, recording
    from kanc.codegen.rational import group_rational

    gen = torch.Generator().manual_seed(0)
    x = (2 * torch.randn(tokens, channels, generator=gen)).to(device, dtype).requires_grad_()
    num = (0.3 * torch.randn(groups, 6, generator=gen)).to(device).requires_grad_()
    den = torch.randn(groups, 4, generator=gen).to(device).requires_grad_()
    dy = torch.randn(tokens, channels, generator=gen).to(device, dtype)
    n, size = x.numel(), dtype.itemsize
    bytes_by_pass = {"forward": 2 * n * size, "backward": 3 * n * size, "forward+backward": 5 * n * size}
    compiled = torch.compile(rational_ref, backend=compile_backend)

    # correctness of every implementation against the reference in fp32 math, before timing
    with torch.no_grad():
        expected = rational_ref(x.float(), num, den)
    ref_grads = torch.autograd.grad(rational_ref(x.float(), num, den), (x, num, den), dy.float())
    with recording() as launches:
        out = group_rational(x, num, den)
        grads = torch.autograd.grad(out, (x, num, den), dy)
    kernels = sorted({launch.kernel for launch in launches})

    def grad_err(got):
        return max(common.max_error(g, r) for g, r in zip(got, ref_grads))

    results = []
    keep = keep or (lambda impl: True)

    def add(impl, pass_, fn, err=None, atomics=None, grad_to_none=None):
        if not keep(impl):
            return
        timing = bench(fn, grad_to_none=grad_to_none)
        r = {"impl": impl, "pass": pass_, **common.metrics(timing, bytes_by_pass[pass_], FLOPS[pass_] * n)}
        if err is not None:
            r["max_abs_err"] = err
        if atomics is not None:
            r["atomics"] = atomics
        results.append(r)

    xd = x.detach()
    add(KANC, "forward", lambda: group_rational(xd, num, den), common.max_error(out, expected))
    add("reference eager", "forward", lambda: rational_ref(xd, num, den))
    add(f"reference torch.compile({compile_backend})", "forward", lambda: compiled(xd, num, den))
    if keep(FLASHKAT):
        fk_err = common.max_error(flashkat_forward(xd, num, den), expected)
        add(FLASHKAT, "forward", lambda: flashkat_forward(xd, num, den), fk_err)

    bwd_atomics = next((launch.atomics for launch in launches if launch.extra["direction"] == "backward"), None)
    kanc_bwd = torch.ops.kanc.group_rational_backward
    add(KANC, "backward", lambda: kanc_bwd(dy, xd, num, den), grad_err(grads), bwd_atomics)
    ref_out = rational_ref(x, num, den)
    params = [x, num, den]
    add("reference eager", "backward", lambda: ref_out.backward(dy, retain_graph=True), grad_to_none=params)
    if keep(KAT):
        kat_err = grad_err(kat_backward(dy, xd, num, den))
        add(KAT, "backward", lambda: kat_backward(dy, xd, num, den), kat_err, kat_atomics(xd))
    if keep(FLASHKAT):
        fk_err = grad_err(flashkat_backward(dy, xd, num, den))
        add(FLASHKAT, "backward", lambda: flashkat_backward(dy, xd, num, den), fk_err, flashkat_atomics(xd, groups))
        # a training step of the design: its forward, then its backward
        add(FLASHKAT, "forward+backward", lambda: (flashkat_forward(xd, num, den), flashkat_backward(dy, xd, num, den)))

    def fwd_bwd(fn):
        return lambda: fn(x, num, den).backward(dy)

    add(KANC, "forward+backward", fwd_bwd(group_rational), grad_to_none=params)
    add("reference eager", "forward+backward", fwd_bwd(rational_ref), grad_to_none=params)
    add(f"reference torch.compile({compile_backend})", "forward+backward", fwd_bwd(compiled), grad_to_none=params)
    shapes = {"x": [tokens, channels], "groups": groups, "numerator": [groups, 6], "denominator": [groups, 4]}
    return {"name": name, "shapes": shapes, "kanc_kernels": kernels, "results": results}


def main() -> None:
    def case(name, spec, c):
        return run_case(name, *spec, c.torch, c.device, c.dtype, c.bench, c.backend)

    def extra(env, cases):
        peak = hbm_peak(env["device"])
        for case_ in cases:
            for r in case_["results"]:
                r["pct_of_hbm_peak"] = 100 * r["gbps"] / peak if peak and r.get("gbps") else None
        return {"hbm_peak_gbps": peak}

    common.run("rational", __doc__.splitlines()[0], SHAPES, SMOKE_SHAPES, case, extra)


if __name__ == "__main__":
    main()
