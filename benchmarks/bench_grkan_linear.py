"""One GR-KAN linear layer y = F(x) W^T + b: kanc's fused kernels (F in the matmul prologue) vs the reference eager
and under torch.compile, vs the unfused pair (kanc's rational kernel then cuBLAS F.linear), and vs a plain Linear
(no rational: the floor this layer can reach) under torch.compile.

    python benchmarks/bench_grkan_linear.py                   # GPU, bf16: fc1 and fc2 of ViT-B, ViT-S, GPT-2 small
    python benchmarks/bench_grkan_linear.py --smoke            # CPU interpreter, tiny shapes: checks the script only

Counted by hand (M rows, K inputs, N outputs): forward 2 M N K matmul FLOPs + 21 M K for F; forward+backward
6 M N K + 86 M K. Bytes (ideal, I/O dtype s): forward s (M K + N K + M N), forward+backward s (3 M K + 3 N K + 2 M N)
(x, W read twice; y written; dy read twice; dx, dW written).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402

MODELS = {"vit_b": (128 * 197, 768, 3072), "vit_s": (128 * 197, 384, 1536), "gpt2_small": (8 * 1024, 768, 3072)}
SHAPES = {f"{m}_{fc}": (t, c, h, fc) for m, (t, c, h) in MODELS.items() for fc in ("fc1", "fc2")}
SMOKE_SHAPES = {"smoke_fc1": (37, 24, 48, "fc1"), "smoke_fc2": (37, 24, 48, "fc2")}
GROUPS = 8


def run_case(name, tokens, channels, hidden, fc, torch, device, dtype, bench, backend, groups, keep=None):
    """One shape: every implementation and pass (``keep(impl)`` picks a subset; default all)."""
    from kanc.codegen import grkan_linear, grkan_linear_ref, group_rational, recording

    k_in, n_out = (channels, hidden) if fc == "fc1" else (hidden, channels)
    gen = torch.Generator().manual_seed(0)
    x = (2 * torch.randn(tokens, k_in, generator=gen)).to(device, dtype).requires_grad_()
    num = (0.3 * torch.randn(groups, 6, generator=gen)).to(device).requires_grad_()
    den = torch.randn(groups, 4, generator=gen).to(device).requires_grad_()
    w = (torch.randn(n_out, k_in, generator=gen) / k_in**0.5).to(device, dtype).requires_grad_()
    b = torch.zeros(n_out).to(device, dtype).requires_grad_()
    dy = torch.randn(tokens, n_out, generator=gen).to(device, dtype)
    params = [x, num, den, w, b]
    m, s = tokens, dtype.itemsize
    flops = {"forward": 2 * m * n_out * k_in + 21 * m * k_in, "forward+backward": 6 * m * n_out * k_in + 86 * m * k_in}
    nbytes = {"forward": s * (m * k_in + n_out * k_in + m * n_out),
              "forward+backward": s * (3 * m * k_in + 3 * n_out * k_in + 2 * m * n_out)}  # fmt: skip

    def unfused(x, num, den, w, b):
        return torch.nn.functional.linear(group_rational(x, num, den), w, b)

    def plain(x, num, den, w, b):
        return torch.nn.functional.linear(x, w, b)

    impls = {
        "kanc fused (rational in prologue)": grkan_linear,
        "kanc rational kernel + F.linear": unfused,
        "reference eager": grkan_linear_ref,
        f"reference torch.compile({backend})": torch.compile(grkan_linear_ref, backend=backend),
        f"plain Linear torch.compile({backend})": torch.compile(plain, backend=backend),
    }
    expected = grkan_linear_ref(x.float(), num, den, w.float(), b.float())
    with recording() as launches:
        got = grkan_linear(x, num, den, w, b)
    results = []
    for impl, fn in impls.items():
        if keep is not None and not keep(impl):
            continue
        for pass_ in ("forward", "forward+backward"):
            if pass_ == "forward":
                run = lambda fn=fn: fn(x.detach(), num, den, w.detach(), b.detach())
            else:
                run = lambda fn=fn: fn(x, num, den, w, b).backward(dy)
            timing = bench(run, grad_to_none=params)
            r = {"impl": impl, "pass": pass_, **common.metrics(timing, nbytes[pass_], flops[pass_])}
            if impl.startswith("kanc fused") and pass_ == "forward":
                r["max_abs_err"] = common.max_error(got, expected)
            results.append(r)
    shapes = {"x": [tokens, k_in], "weight": [n_out, k_in], "groups": groups, "layer": fc}
    kernels = sorted({launch.kernel for launch in launches})
    return {"name": name, "shapes": shapes, "kanc_kernels": kernels, "results": results}


def main() -> None:
    def case(name, spec, c):
        return run_case(name, *spec, c.torch, c.device, c.dtype, c.bench, c.backend, 4 if c.smoke else GROUPS)

    common.run("grkan_linear", __doc__.splitlines()[0], SHAPES, SMOKE_SHAPES, case)


if __name__ == "__main__":
    main()
