"""kanc on the CPU: the group rational's C kernels against GELU, and a converted ViT against the original (eager).

Two parts, each printed with medians (and 20th/80th percentiles) over ``--reps`` interleaved runs:

1. ``GroupRational`` (G = 8, fitted to GELU) on an (8, 197, 768) fp32 tensor: forward, and forward + backward (the
   input's and both coefficients' gradients), on kanc's C kernels and on the PyTorch reference (``rational_ref``,
   ``kanc.codegen.kernels_disabled()``), beside ``torch.nn.functional.gelu``. Targets (issue 13, item 9): forward
   <= 2x GELU, forward + backward <= 3x.
2. A Hugging Face ViT (hidden 384, 6 layers, 6 heads, MLP 1536, 224 px, patch 16: 197 tokens) converted by
   ``kanc.compile(target="grkan")``: inference forward (no_grad) and one training step (forward, backward, SGD step)
   of the original, the converted model on the C kernels, and the converted model on the reference. Targets: forward
   <= 1.1x the original, training step <= 1.15x.

Times on a shared machine move with its load: the script prints the load average; compare rows of one run.

    python benchmarks/cpu_rational.py [--reps 20] [--batch 8] [--threads N] [--skip-vit] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch

import kanc
from kanc.codegen import cpu, kernels_disabled
from kanc.nn import GroupRational
from kanc.timing import interleaved_times_ms, percentiles

SHAPE = (8, 197, 768)
TARGETS = {"rational forward / GELU": 2.0, "rational fwd+bwd / GELU": 3.0, "ViT forward": 1.1, "ViT train step": 1.15}


def timed(cases: dict[str, Callable[[], object]], reps: int, warmup: int = 2) -> dict[str, dict[str, float]]:
    """Median and 20th/80th percentile ms of each case, the cases interleaved run by run (load hits them alike)."""
    out = {}
    for name, ts in interleaved_times_ms(cases, reps, warmup).items():
        median, p20, p80 = percentiles(ts)
        out[name] = {"median_ms": median, "p20_ms": p20, "p80_ms": p80}
    return out


def rational_cases() -> dict[str, Callable[[], object]]:
    torch.manual_seed(0)
    act = GroupRational(SHAPE[-1], groups=8, init="gelu")
    x = torch.randn(SHAPE)
    xg = x.clone().requires_grad_()
    grad = torch.randn(SHAPE)
    params = (xg, act.numerator, act.denominator)

    def fwd_bwd(fn):
        return lambda: torch.autograd.grad(fn(xg), params if fn is act else (xg,), grad)

    def on_reference(fn):
        def run():
            with kernels_disabled():
                return fn()

        return run

    forward = {
        "GELU forward": lambda: torch.nn.functional.gelu(x),
        "rational forward (C kernel)": lambda: act(x),
        "rational forward (reference)": on_reference(lambda: act(x)),
    }
    return {
        **{name: _no_grad(fn) for name, fn in forward.items()},
        "GELU fwd+bwd": fwd_bwd(torch.nn.functional.gelu),
        "rational fwd+bwd (C kernel)": fwd_bwd(act),
        "rational fwd+bwd (reference)": on_reference(fwd_bwd(act)),
    }


def _no_grad(fn: Callable[[], object]) -> Callable[[], object]:
    def run():
        with torch.no_grad():
            return fn()

    return run


def vit_cases(batch: int) -> dict[str, Callable[[], object]]:
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=6, intermediate_size=1536,
                       image_size=224, patch_size=16)  # fmt: skip
    torch.manual_seed(0)
    original = ViTModel(config, add_pooling_layer=False).eval()
    pixels = torch.randn(batch, 3, 224, 224)
    converted = kanc.compile(original, target="grkan", example_inputs=(pixels[:2],)).eval()
    print(f"converted: {len(kanc.report(converted).converted)} MLP blocks", file=sys.stderr)

    def forward(model):
        return _no_grad(lambda: model(pixel_values=pixels).last_hidden_state)

    def train_step(model):
        opt = torch.optim.SGD(model.parameters(), lr=1e-6)

        def step():
            opt.zero_grad(set_to_none=True)
            model(pixel_values=pixels).last_hidden_state.square().mean().backward()
            opt.step()

        return step

    def on_reference(fn):
        def run():
            with kernels_disabled():
                fn()

        return run

    return {
        "ViT forward, original": forward(original),
        "ViT forward, kanc C kernels": forward(converted),
        "ViT forward, kanc reference": on_reference(forward(converted)),
        "ViT train step, original": train_step(original),
        "ViT train step, kanc C kernels": train_step(converted),
        "ViT train step, kanc reference": on_reference(train_step(converted)),
    }


def ratios(results: dict[str, dict[str, float]]) -> dict[str, float]:
    med = {name: r["median_ms"] for name, r in results.items()}
    out = {}
    pairs = {
        "rational forward / GELU": ("rational forward (C kernel)", "GELU forward"),
        "rational fwd+bwd / GELU": ("rational fwd+bwd (C kernel)", "GELU fwd+bwd"),
        "rational forward, reference / GELU": ("rational forward (reference)", "GELU forward"),
        "rational fwd+bwd, reference / GELU": ("rational fwd+bwd (reference)", "GELU fwd+bwd"),
        "ViT forward": ("ViT forward, kanc C kernels", "ViT forward, original"),
        "ViT train step": ("ViT train step, kanc C kernels", "ViT train step, original"),
        "ViT forward, reference": ("ViT forward, kanc reference", "ViT forward, original"),
        "ViT train step, reference": ("ViT train step, kanc reference", "ViT train step, original"),
    }
    for label, (num, den) in pairs.items():
        if num in med and den in med:
            out[label] = med[num] / med[den]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=20, help="timed runs per case (medians over these)")
    parser.add_argument("--batch", type=int, default=8, help="ViT batch (images of 224 px: 197 tokens each)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--skip-vit", action="store_true", help="the rational part only")
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = parser.parse_args()
    os.environ.pop("TRITON_INTERPRET", None)  # the C kernels, not Triton's interpreter
    if args.threads:
        torch.set_num_threads(args.threads)
    if cpu.unavailable_reason() is not None:
        sys.exit(f"kanc's C kernels are not available here: {cpu.unavailable_reason()}")
    load = [os.getloadavg()[0]]
    results = timed(rational_cases(), args.reps)
    if not args.skip_vit:
        results.update(timed(vit_cases(args.batch), max(3, args.reps // 4), warmup=1))
    load.append(os.getloadavg()[0])
    print(f"CPU, {torch.get_num_threads()} threads, fp32, median of the runs (load average {load[0]:.1f} -> "
          f"{load[1]:.1f} on {os.cpu_count()} CPUs; compare rows of one run)")  # fmt: skip
    print(f"{'case':<36} {'median ms':>10} {'p20':>9} {'p80':>9}")
    for name, r in results.items():
        print(f"{name:<36} {r['median_ms']:>10.3f} {r['p20_ms']:>9.3f} {r['p80_ms']:>9.3f}")
    print()
    found = ratios(results)
    for label, value in found.items():
        target = f"  (target <= {TARGETS[label]}x)" if label in TARGETS else ""
        print(f"{label:<36} {value:>6.2f}x{target}")
    if args.out is not None:
        payload = {"benchmark": "cpu_rational", "torch": torch.__version__, "threads": torch.get_num_threads(),
                   "command": " ".join(sys.argv), "library_flags": list(cpu.library().flags), "load_average": load,
                   "results": results, "ratios": found}  # fmt: skip
        args.out.write_text(json.dumps(payload, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
