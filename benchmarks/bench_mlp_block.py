"""A whole GR-KAN MLP block (KAT layout: fc1 = Linear(identity rational), fc2 = Linear(GELU-fit rational)) with
kanc's fused ops, vs the same block on the reference (eager, torch.compile), vs the Linear-GELU-Linear MLP it
replaces (eager, torch.compile). The target (design.md 5): forward+backward within 1.15x of Linear-GELU-Linear
under torch.compile, on an H100 in bf16.

    python benchmarks/bench_mlp_block.py                      # GPU, bf16: ViT-B/KAT-B, ViT-S, GPT-2 small
    python benchmarks/bench_mlp_block.py --smoke               # CPU interpreter, tiny shapes: checks the script only

Modules are cast to the benchmark dtype whole (weights, biases and rational coefficients), the kernels still doing
the rational's math in fp32. Counted by hand (M tokens, C width, H hidden): forward 4 M C H matmul FLOPs + 21 M (C + H)
for the rationals; forward+backward 12 M C H + 86 M (C + H). "vs_mlp_compiled" is time / the Linear-GELU-Linear
torch.compile time of the same pass.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402

SHAPES = {"vit_b": (128 * 197, 768, 3072), "vit_s": (128 * 197, 384, 1536), "gpt2_small": (8 * 1024, 768, 3072)}
SMOKE_SHAPES = {"smoke": (37, 24, 48)}
GROUPS = 8


def run_case(name, tokens, channels, hidden, torch, device, dtype, bench, backend, groups):
    from kanc.codegen import kernels_disabled, recording
    from kanc.nn import GRKANMlp, Mlp

    torch.manual_seed(0)
    kan = GRKANMlp(channels, hidden, groups=groups, act_init="gelu").to(device, dtype)
    mlp = Mlp(channels, hidden, act="gelu").to(device, dtype)
    x = torch.randn(tokens, channels, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(tokens, channels, device=device, dtype=dtype)
    m = tokens
    flops = {"forward": 4 * m * channels * hidden + 21 * m * (channels + hidden),
             "forward+backward": 12 * m * channels * hidden + 86 * m * (channels + hidden)}  # fmt: skip

    def on_reference(fn):
        def run(x):
            with kernels_disabled():
                return fn(x)

        return run

    impls = {
        "kanc GR-KAN block (fused ops)": (kan, kan),
        f"kanc GR-KAN block torch.compile({backend})": (kan, torch.compile(kan, backend=backend)),
        "GR-KAN reference eager": (kan, on_reference(kan)),
        f"GR-KAN reference torch.compile({backend})": (kan, on_reference(torch.compile(kan, backend=backend))),
        "Linear-GELU-Linear eager": (mlp, mlp),
        f"Linear-GELU-Linear torch.compile({backend})": (mlp, torch.compile(mlp, backend=backend)),
    }
    with torch.no_grad(), kernels_disabled():
        expected = kan.float()(x.float())
    kan.to(dtype)
    with recording() as launches:
        got = kan(x)
    results = []
    for impl, (module, fn) in impls.items():
        for pass_ in ("forward", "forward+backward"):
            params = [x, *module.parameters()]
            if pass_ == "forward":
                run = lambda fn=fn: fn(x.detach())
            else:
                run = lambda fn=fn: fn(x).backward(dy)
            r = {"impl": impl, "pass": pass_, **common.metrics(bench(run, grad_to_none=params), None, flops[pass_])}
            if impl.startswith("kanc GR-KAN block (") and pass_ == "forward":
                r["max_abs_err"] = common.max_error(got, expected)
            results.append(r)
    for pass_ in ("forward", "forward+backward"):
        base = next(r for r in results if r["pass"] == pass_ and r["impl"].startswith("Linear-GELU-Linear torch"))
        for r in results:
            if r["pass"] == pass_:
                r["vs_mlp_compiled"] = r["median_ms"] / base["median_ms"]
    shapes = {"x": [tokens, channels], "hidden": hidden, "groups": groups}
    kernels = sorted({launch.kernel for launch in launches})
    return {"name": name, "shapes": shapes, "kanc_kernels": kernels, "results": results}


def main() -> None:
    def case(name, spec, c):
        return run_case(name, *spec, c.torch, c.device, c.dtype, c.bench, c.backend, 4 if c.smoke else GROUPS)

    def report(cases):
        for case_ in cases:
            for r in case_["results"]:
                print(f"{case_['name']:<12} {r['impl']:<44} {r['pass']:<17} {r['vs_mlp_compiled']:.2f}x MLP compiled")

    extra = lambda env, cases: {"target_vs_mlp_compiled": 1.15}
    common.run("mlp_block", __doc__.splitlines()[0], SHAPES, SMOKE_SHAPES, case, extra, report)


if __name__ == "__main__":
    main()
