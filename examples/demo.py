"""kanc's main job, end to end, on a fresh CPU-only machine (``make demo``, about a minute).

1. Train a small ViT on scikit-learn's digits (8x8 images, shipped with scikit-learn: nothing is downloaded).
2. Save its weights (a state_dict) like any training script would.
3. ``kanc convert`` it to GR-KAN and to SNNK from the command line, with calibration images, and load the results.
4. Print the fidelity table: how far each converted model's logits are from the original's, block by block,
   and what that does to test accuracy, before any fine-tuning.

    python examples/demo.py [--epochs 12] [--out DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from digits_vit import ViT  # noqa: E402
from train_digits import accuracy, load_digits_split, train  # noqa: E402

import kanc  # noqa: E402
from kanc.cli import cli  # noqa: E402
from kanc.numerics import rel_error  # noqa: E402

ARCH = f"{HERE / 'digits_vit.py'}:ViT"


def kanc_cli(*args: str, show: bool = True) -> None:
    """Run one ``kanc`` command in this process (what a shell would run); ``show=False`` hides its output."""
    print("$ kanc " + " ".join(_short(a) for a in args), flush=True)
    with contextlib.redirect_stdout(sys.stdout if show else io.StringIO()):
        cli.main(list(args), prog_name="kanc", standalone_mode=False)


def _short(arg: str) -> str:
    return Path(arg).name if "/" in arg and ":" not in arg else (f"examples/{Path(arg).name}" if "/" in arg else arg)


def logits(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(images)


def row(name: str, model: torch.nn.Module, base_logits: torch.Tensor, data, seconds: float | None) -> list[str]:
    out = logits(model, data[2])
    err = rel_error(out, base_logits)
    agree = float((out.argmax(-1) == base_logits.argmax(-1)).float().mean()) * 100
    params = sum(p.numel() for p in model.parameters())
    took = f"{seconds:.1f}" if seconds is not None else "-"
    return [name, f"{params:,}", f"{err:.2e}", f"{agree:.1f}", f"{accuracy(model, data[2], data[3]):.2f}", took]


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--out", type=Path, default=None, help="keep the model files here (default: a temp dir)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        return run(out, args.epochs, start)


def run(out: Path, epochs: int, start: float) -> dict:
    data = load_digits_split()
    torch.manual_seed(0)
    model = ViT(dim=64, depth=4, heads=4, mlp="mlp")
    print(f"1. training a ViT (4 blocks, dim 64, MLP hidden 256) on digits for {epochs} epochs ...", flush=True)
    train(model, data, epochs, seed=0, label="train")
    base = logits(model, data[2])
    print(f"   test accuracy {accuracy(model, data[2], data[3]):.2f}%\n")

    weights, calib, held_out = out / "vit.pt", out / "calib.pt", out / "test_images.pt"
    torch.save(model.state_dict(), weights)
    torch.save(data[0][:512], calib)  # 512 training images: what each block really sees
    torch.save(data[2], held_out)
    print(f"2. saved {weights.name} (a state_dict); the blocks kanc finds in it:")
    kanc_cli("inspect", str(weights), "--arch", ARCH)
    print()

    print("3. converting with the kanc CLI (fidelity measured on the held-out test images; first report shown):")
    runs = {
        "grkan": ["-t", "grkan"],
        "snnk m=h/8": ["-t", "snnk", "--features", "32"],
        "snnk m=h/4": ["-t", "snnk"],
        "snnk m=h": ["-t", "snnk", "--features", "256"],
    }
    rows, reports = [row("original MLP", model, base, data, None)], {}
    for i, (name, flags) in enumerate(runs.items()):
        dest = out / f"vit_{name.replace(' ', '_').replace('=', '').replace('/', '')}.pt"
        t0 = time.perf_counter()
        kanc_cli("convert", str(weights), *flags, "--arch", ARCH, "--calibration", str(calib),
                 "--inputs", str(held_out), "-o", str(dest), "--force", "--quiet", show=i == 0)  # fmt: skip
        seconds = time.perf_counter() - t0
        converted = kanc.load(dest, arch=ARCH)  # weights + manifest: the conversion re-applied to ARCH
        reports[name] = kanc.report(converted).as_dict()
        rows.append(row(name, converted, base, data, seconds))
    print("\n4. fidelity (no fine-tuning): relative logit error vs the original, prediction agreement, accuracy\n")
    print(table(rows, ["model", "params", "logit rel err", "same pred %", "test acc %", "convert s"]))
    print("\nper-block relative error on the test images:")
    blocks = list(reports["grkan"]["fidelity"]["blocks"])
    brows = [[n, *(f"{reports[n]['fidelity']['blocks'][b]:.2e}" for b in blocks)] for n in runs]
    print(table(brows, ["model", *blocks]))
    total = time.perf_counter() - start
    print(
        f"\nGR-KAN keeps the function (identity rational before fc1, fitted rational before fc2); SNNK replaces each "
        f"block by random features and a fitted readout, approximate and closer as m grows. Done in {total:.0f} s."
    )
    summary = {"rows": rows, "reports": reports, "seconds": total}
    (out / "demo.json").write_text(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
