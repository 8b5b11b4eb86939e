"""Bundled SNNK block y = Phi(x) W^T + b: kanc's fused kernel (features on chip) vs the reference eager and under
torch.compile, vs the Linear-GELU-Linear MLP it replaces under torch.compile. design.md 5: faster than that MLP
whenever m < d h / (d + h).

    python benchmarks/bench_snnk.py                           # GPU, bf16: ViT-B (m 128/256/512, relu/exp/cos), ...
    python benchmarks/bench_snnk.py --smoke                    # CPU interpreter, tiny shapes: checks the script only

Counted by hand per token (d in, d_out out, m features, width m or 2m for cos): forward 2 m d + 2 width d_out
FLOPs; forward+backward 3x that (dPhi, dW, dx): the useful work, the same for every implementation. kanc's backward
never writes Phi: its dx kernel recomputes Z = G x once and its dW kernel once per output tile (``dw_z_recomputed``
in the case, from the launch record), so "flops_executed" (kanc, forward+backward) adds (1 + dw_z_recomputed) 2 m d
per token. Bytes (ideal, I/O dtype s): forward s (d + d_out) per token; forward+backward s (4 d + 3 d_out) per token
(x read by the forward, dx and dW kernels, y written, dy read by both backward kernels, dx written; no Phi).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402

MODELS = {"vit_b": (128 * 197, 768, 3072), "vit_s": (128 * 197, 384, 1536), "gpt2_small": (8 * 1024, 768, 3072)}
SHAPES = {
    **{f"vit_b_m{m}_{k}": (*MODELS["vit_b"], m, k) for m in (128, 256, 512) for k in ("relu", "exp", "cos")},
    "vit_s_m128_relu": (*MODELS["vit_s"], 128, "relu"),
    "gpt2_small_m256_relu": (*MODELS["gpt2_small"], 256, "relu"),
}
SMOKE_SHAPES = {"smoke_relu": (37, 24, 48, 12, "relu"), "smoke_exp": (37, 24, 48, 12, "exp"),
                "smoke_cos": (37, 24, 48, 12, "cos")}  # fmt: skip


def run_case(name, tokens, d, hidden, feats, kind, torch, device, dtype, bench, backend, keep=None):
    """One shape: every implementation and pass (``keep(impl)`` picks a subset; default all)."""
    from kanc.codegen import recording
    from kanc.codegen.snnk import snnk_block, snnk_block_ref, snnk_width
    from kanc.nn import Mlp
    from kanc.nn.snnk import random_projection

    width = snnk_width(feats, kind)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, d, generator=gen).to(device, dtype).requires_grad_()
    g = random_projection(feats, d, seed=0).to(device)
    w = (torch.randn(d, width, generator=gen) / width**0.5).to(device, dtype).requires_grad_()
    b = torch.zeros(d).to(device, dtype).requires_grad_()
    dy = torch.randn(tokens, d, generator=gen).to(device, dtype)
    scale = 1.0 if kind == "relu" else d**-0.5
    params = [x, w, b]
    s, per_token = dtype.itemsize, 2 * feats * d + 2 * width * d
    flops = {"forward": tokens * per_token, "forward+backward": 3 * tokens * per_token}
    nbytes = {"forward": s * tokens * 2 * d, "forward+backward": s * tokens * 7 * d}  # d_out = d here
    torch.manual_seed(0)
    mlp = Mlp(d, hidden, act="gelu").to(device, dtype)
    mlp_flops = {"forward": 4 * tokens * d * hidden, "forward+backward": 12 * tokens * d * hidden}

    def ref(x, w, b):
        return snnk_block_ref(x, g, w, b, kind, 0.0, scale)

    def fused(x, w, b):
        return snnk_block(x, g, w, b, kind, 0.0, scale)

    impls = {
        "kanc fused (features on chip)": fused,
        "reference eager": ref,
        f"reference torch.compile({backend})": torch.compile(ref, backend=backend),
    }
    with recording() as launches:
        got = fused(x, w, b)
        got.backward(dy)
    for p in params:
        p.grad = None
    expected = snnk_block_ref(x.float(), g, w.float(), b.float(), kind, 0.0, scale)
    dw_launch = next((launch for launch in launches if launch.kernel == "_snnk_dw_kernel"), None)
    z_recomputed = dw_launch.extra["z_recomputed"] if dw_launch else None
    results = []
    for impl, fn in impls.items():
        if keep is not None and not keep(impl):
            continue
        for pass_ in ("forward", "forward+backward"):
            if pass_ == "forward":
                run = lambda fn=fn: fn(x.detach(), w.detach(), b.detach())
            else:
                run = lambda fn=fn: fn(x, w, b).backward(dy)
            r = {"impl": impl, "pass": pass_, **common.metrics(bench(run, grad_to_none=params), nbytes[pass_],
                                                               flops[pass_])}  # fmt: skip
            if impl.startswith("kanc") and pass_ == "forward":
                r["max_abs_err"] = common.max_error(got, expected)
            if impl.startswith("kanc") and pass_ == "forward+backward" and z_recomputed is not None:
                r["flops_executed"] = flops[pass_] + (1 + z_recomputed) * 2 * feats * d * tokens
            results.append(r)
    compiled_mlp = torch.compile(mlp, backend=backend)
    for pass_ in ("forward", "forward+backward"):
        run = (lambda: compiled_mlp(x.detach())) if pass_ == "forward" else (lambda: compiled_mlp(x).backward(dy))
        timing = bench(run, grad_to_none=[x, *mlp.parameters()])
        impl = f"MLP replaced: Linear-GELU-Linear torch.compile({backend})"
        results.append({"impl": impl, "pass": pass_, **common.metrics(timing, None, mlp_flops[pass_])})
    for pass_ in ("forward", "forward+backward"):
        base = next(r for r in results if r["pass"] == pass_ and r["impl"].startswith("MLP replaced"))
        for r in results:
            if r["pass"] == pass_:
                r["vs_mlp_compiled"] = r["median_ms"] / base["median_ms"]
    shapes = {"x": [tokens, d], "projection": [feats, d], "weight": [d, width], "kind": kind, "mlp_hidden": hidden,
              "break_even_m": d * hidden / (d + hidden)}  # fmt: skip
    kernels = sorted({launch.kernel for launch in launches})
    case = {"name": name, "shapes": shapes, "kanc_kernels": kernels, "results": results}
    if dw_launch:
        case.update(dw_z_recomputed=z_recomputed, dw_splits=dw_launch.extra["splits"], dw_config=dw_launch.config)
    return case


def main() -> None:
    def case(name, spec, c):
        return run_case(name, *spec, c.torch, c.device, c.dtype, c.bench, c.backend)

    common.run("snnk", __doc__.splitlines()[0], SHAPES, SMOKE_SHAPES, case)


if __name__ == "__main__":
    main()
