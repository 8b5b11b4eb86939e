"""How finely the data-aware rational fit needs its pre-activation samples: held-out error and time per bin count.

    python benchmarks/fit_samples.py --models gpt2-small,llama-1.1b-fp32 --layers 3

Each model (configs from benchmarks/scale.py, random weights, cut to ``--layers`` decoder layers) is saved as a
checkpoint and streamed through ``kanc.convert_checkpoint``; the pre-activation samples of every fitted block are
captured. Each block is then refitted with ``kanc.passes.ratfit.BINS`` set to each count (0: every sample its own
point, no bins), on all but a held-out set of values, and the fit's relative squared error is measured on the
held-out values.
Prints a table and writes it to JSON. Timings on a loaded machine are noisy.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scale  # noqa: E402

HELD_OUT = 20000


def capture(name: str, layers: int) -> list[tuple]:
    """(fn, start, samples) of every block fitted while streaming ``name`` cut to ``layers`` layers."""
    import kanc
    from kanc.passes import builders

    cls_name, kwargs, dtype = scale.MODELS[name]
    key = "n_layer" if "n_layer" in kwargs else "num_hidden_layers"
    scale.MODELS[name] = (cls_name, {**kwargs, key: layers}, dtype)
    seen, real = [], builders.fit_to_samples

    def spy(fn, start, samples):
        seen.append((fn, start, samples.detach().reshape(-1).double().clone()))
        return real(fn, start, samples)

    work = Path(tempfile.mkdtemp(prefix="kanc-fitsamples-"))
    builders.fit_to_samples = spy
    try:
        scale.build_checkpoint(name, work / "src", "2GB")
        kanc.convert_checkpoint(work / "src", work / "out", "grkan")
    finally:
        builders.fit_to_samples = real
        shutil.rmtree(work, ignore_errors=True)
    return seen


def refit(fn, start, z, bins: int) -> dict:
    """Fit with BINS = bins (0: no bins) on all but HELD_OUT values of z; the error on those, the time."""
    import torch

    from kanc.nn.fit import evaluate
    from kanc.passes import ratfit

    z = z[torch.isfinite(z)]
    perm = torch.randperm(z.numel(), generator=torch.Generator().manual_seed(1))
    held, pool = z[perm[:HELD_OUT]], z[perm[HELD_OUT:]]
    old, ratfit.BINS = ratfit.BINS, bins or z.numel()
    try:
        t = time.perf_counter()
        with torch.enable_grad():
            num, den = ratfit.fit_to_samples(fn, start, pool)
        seconds = time.perf_counter() - t
    finally:
        ratfit.BINS = old
    with torch.no_grad():
        want = fn(held).double()
        err = (evaluate(num.double(), den.double(), held) - want).square().mean() / want.square().mean()
    return {"bins": bins, "held_out_rel_mse": float(err), "seconds": seconds, "pool": pool.numel()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="gpt2-small,llama-1.1b-fp32")
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--bins", default="0,4096,2048,1024,512", help="bin counts; 0: every sample, no bins")
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "kanc-bench" / "fit_samples.json")
    args = parser.parse_args()
    counts = [int(c) for c in args.bins.split(",")]
    results = {}
    for name in args.models.split(","):
        rows = []
        for i, (fn, start, z) in enumerate(capture(name, args.layers)):
            for bins in counts:
                rows.append({"block": i, **refit(fn, start, z, bins)})
                r = rows[-1]
                err, secs = r["held_out_rel_mse"], r["seconds"]
                print(f"{name} block {i} bins {bins:>5}: held-out rel MSE {err:.3e} {secs:.3f} s")
        results[name] = rows
        for bins in counts:
            mine = [r for r in rows if r["bins"] == bins]
            worst = max(r["held_out_rel_mse"] for r in mine)
            secs = sum(r["seconds"] for r in mine) / len(mine)
            print(f"{name} bins {bins:>5}: worst held-out rel MSE {worst:.3e}, mean fit {secs:.3f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
