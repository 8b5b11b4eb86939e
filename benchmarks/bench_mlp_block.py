"""A whole GR-KAN MLP block (KAT layout: fc1 = Linear(identity rational), fc2 = Linear(GELU-fit rational)) with
kanc's fused ops at each placement of fc2's rational (prologue of fc2, epilogue of fc1, and "auto", the tuner's
choice), eager and under torch.compile, vs the same block on the reference (eager, torch.compile), vs the
Linear-GELU-Linear MLP it replaces (eager, torch.compile). Passes: forward (autograd recording), inference (no_grad)
and forward+backward. Targets (design.md 5, issue 17): forward+backward within 1.15x of Linear-GELU-Linear under
torch.compile, inference within 1.10x, on an H100/H200 in bf16.

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


PLACEMENTS = ("prologue", "epilogue", "auto")
PASSES = ("forward", "inference", "forward+backward")


def kanc_impl(placement: str, backend: str | None = None) -> str:
    """The name of kanc's block at ``placement``, eager (no backend) or under torch.compile(backend)."""
    name = f"kanc GR-KAN block, {placement} placement"
    return f"{name}, torch.compile({backend})" if backend else name


def run_case(name, tokens, channels, hidden, torch, device, dtype, bench, backend, groups, keep=None):
    """One shape: every implementation and pass (``keep(impl)`` picks a subset; default all)."""
    from kanc.codegen import kernels_disabled, recording
    from kanc.nn import GRKANMlp, Mlp
    from kanc.nn.pair import resolve_placement

    torch.manual_seed(0)
    kan = GRKANMlp(channels, hidden, groups=groups, act_init="gelu").to(device, dtype)
    mlp = Mlp(channels, hidden, act="gelu").to(device, dtype)
    x = torch.randn(tokens, channels, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(tokens, channels, device=device, dtype=dtype)
    m = tokens
    forward_flops = 4 * m * channels * hidden + 21 * m * (channels + hidden)
    train_flops = 12 * m * channels * hidden + 86 * m * (channels + hidden)
    flops = {"forward": forward_flops, "inference": forward_flops, "forward+backward": train_flops}
    keep = keep or (lambda impl: True)

    placed, impls = _implementations(kan, mlp, backend, torch)
    with torch.no_grad(), kernels_disabled():
        expected = kan.float()(x.float())
    kan.to(dtype)
    errors, launches = {}, []
    for placement in ("prologue", "epilogue"):
        with recording() as placement_launches:
            errors[placement] = common.max_error(placed[placement](x), expected)
        launches += placement_launches
    results = []
    for impl, (module, fn) in impls.items():
        if not keep(impl):
            continue
        for pass_ in PASSES:
            timing = _time(bench, fn, pass_, x, dy, module)
            r = {"impl": impl, "pass": pass_, **common.metrics(timing, None, flops[pass_])}
            placement = next((p for p in ("prologue", "epilogue") if impl == kanc_impl(p)), None)
            if placement and pass_ == "forward":
                r["max_abs_err"] = errors[placement]
            results.append(r)
    for pass_ in PASSES:
        base = [r for r in results if r["pass"] == pass_ and r["impl"].startswith("Linear-GELU-Linear torch")]
        for r in results:
            if r["pass"] == pass_ and base:
                r["vs_mlp_compiled"] = r["median_ms"] / base[0]["median_ms"]
    with torch.no_grad():
        inference = resolve_placement(kan.fc1, kan.fc2, x, "auto", kan.drop1)
    training = resolve_placement(kan.fc1, kan.fc2, x, "auto", kan.drop1)
    shapes = {"x": [tokens, channels], "hidden": hidden, "groups": groups}
    kernels = sorted({launch.kernel for launch in launches})
    case = {"name": name, "shapes": shapes, "kanc_kernels": kernels, "results": results}
    return {**case, "auto_placement": {"forward+backward": training, "inference": inference}}


def _implementations(kan, mlp, backend, torch):
    """({placement: block}, {impl: (module whose parameters it trains, callable)}): kanc's block at each placement,
    eager then compiled (eager first: "auto" measures its choice eagerly, a trace only reads it), the reference and
    the MLP."""
    import copy

    from kanc.codegen import kernels_disabled

    def on_reference(fn):
        def run(x):
            with kernels_disabled():
                return fn(x)

        return run

    placed, impls = {}, {}
    for placement in PLACEMENTS:
        placed[placement] = block = copy.copy(kan)  # shares kan's layers (a shallow copy); only the placement differs
        block.placement = placement
        impls[kanc_impl(placement)] = (kan, block)
        impls[kanc_impl(placement, backend)] = (kan, torch.compile(block, backend=backend))
    impls["GR-KAN reference eager"] = (kan, on_reference(kan))
    impls[f"GR-KAN reference torch.compile({backend})"] = (kan, on_reference(torch.compile(kan, backend=backend)))
    impls["Linear-GELU-Linear eager"] = (mlp, mlp)
    impls[f"Linear-GELU-Linear torch.compile({backend})"] = (mlp, torch.compile(mlp, backend=backend))
    return placed, impls


def _time(bench, fn, pass_, x, dy, module):
    """Time one pass: forward with autograd recording, inference under no_grad, or forward then backward."""
    import torch

    if pass_ == "forward":
        return bench(lambda: fn(x.detach()), grad_to_none=[x, *module.parameters()])
    if pass_ == "inference":

        def infer():
            with torch.no_grad():
                return fn(x.detach())

        return bench(infer)
    return bench(lambda: fn(x).backward(dy), grad_to_none=[x, *module.parameters()])


def main() -> None:
    def case(name, spec, c):
        return run_case(name, *spec, c.torch, c.device, c.dtype, c.bench, c.backend, 4 if c.smoke else GROUPS)

    def report(cases):
        for case_ in cases:
            print(f"{case_['name']}: auto placement {case_['auto_placement']}")
            for r in case_["results"]:
                print(f"{case_['name']:<12} {r['impl']:<60} {r['pass']:<17} {r['vs_mlp_compiled']:.2f}x MLP compiled")

    extra = lambda env, cases: {"target_vs_mlp_compiled": 1.15}
    common.run("mlp_block", __doc__.splitlines()[0], SHAPES, SMOKE_SHAPES, case, extra, report)


if __name__ == "__main__":
    main()
