"""Train a small ViT on scikit-learn's digits (8x8, bundled: nothing downloaded), convert it to GR-KAN and SNNK.

Part 1 (conversion): train the MLP ViT, convert with function-preserving init, fine-tune each model for the same
number of epochs as the MLP keeps training; table of parameters, accuracy before / right after conversion / after
fine-tuning, seconds per epoch. Part 2 (from scratch): the same ViT built as GR-KAN (KAT's variance-preserving init)
vs the MLP ViT, same budget, several seeds, mean +- std. Writes results.json and PNG curves to ``--out``.

    python examples/train_digits.py --epochs 20 --finetune-epochs 5 --seeds 3 --out runs/digits
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from digits_convert import convert  # noqa: E402
from digits_vit import ViT  # noqa: E402

Data = tuple[Tensor, Tensor, Tensor, Tensor]
BATCH = 32


def load_digits_split(seed: int = 0) -> Data:
    """(x_train, y_train, x_test, y_test): images (N, 1, 8, 8) scaled to [0, 1], a stratified 80/20 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    idx_train, idx_test = train_test_split(range(len(y)), test_size=0.2, random_state=seed, stratify=digits.target)
    return x[idx_train], y[idx_train], x[idx_test], y[idx_test]


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """Test accuracy in percent."""
    return 100.0 * float((model.eval()(x).argmax(-1) == y).float().mean())


def _progress(label: str, epoch: int, epochs: int, loss: float, acc: float) -> None:
    if not sys.stderr.isatty():  # quiet in logs and tests
        return
    filled = int(30 * epoch / epochs)
    bar = "#" * filled + "." * (30 - filled)
    end = "\n" if epoch == epochs else ""
    sys.stderr.write(f"\r{label:<18} [{bar}] {epoch}/{epochs} loss {loss:.3f} acc {acc:5.1f}%{end}")
    sys.stderr.flush()


def train(model: nn.Module, data: Data, epochs: int, seed: int, label: str, lr: float = 3e-3) -> dict:
    """AdamW + cosine schedule, batch BATCH; returns per-epoch train loss, test accuracy and seconds."""
    x_train, y_train, x_test, y_test = data
    gen = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, epochs * (-(-len(y_train) // BATCH))))
    history: dict[str, list[float]] = {"loss": [], "acc": [], "seconds": []}
    for epoch in range(1, epochs + 1):
        model.train()
        start, total, seen = time.perf_counter(), 0.0, 0
        for idx in torch.randperm(len(y_train), generator=gen).split(BATCH):
            loss = nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total, seen = total + loss.item() * len(idx), seen + len(idx)
        history["seconds"].append(time.perf_counter() - start)
        history["loss"].append(total / seen)
        history["acc"].append(accuracy(model, x_test, y_test))
        _progress(label, epoch, epochs, history["loss"][-1], history["acc"][-1])
    return history


def n_params(model: nn.Module) -> int:
    """Trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def conversion_run(data: Data, epochs: int, finetune: int, seed: int = 0) -> dict:
    """Train the MLP ViT, convert to grkan / snnk, fine-tune each; the MLP keeps training for the same epochs."""
    torch.manual_seed(seed)
    base = ViT(mlp="mlp")
    pretrain = train(base, data, epochs, seed, "pretrain mlp")
    before = accuracy(base, data[2], data[3])
    rows, curves = {}, {"pretrain": pretrain}
    calibration = data[0][:256]
    for target in ("mlp", "grkan", "snnk"):
        model = copy.deepcopy(base)
        if target != "mlp":
            model = convert(model, target, calibration=calibration)
        after = accuracy(model, data[2], data[3])
        hist = train(model, data, finetune, seed + 1, f"finetune {target}", lr=1e-3)
        curves[target] = hist
        rows[target] = {
            "params": n_params(model),
            "acc_before": before,
            "acc_after_conversion": after,
            "acc_after_finetune": hist["acc"][-1] if hist["acc"] else after,
            "sec_per_epoch": statistics.mean(hist["seconds"]) if hist["seconds"] else 0.0,
        }
    return {"rows": rows, "curves": curves}


def scratch_run(data: Data, epochs: int, seeds: int) -> dict:
    """MLP ViT vs GR-KAN ViT (variance-preserving init) from scratch, same epochs, ``seeds`` seeds."""
    out: dict = {}
    for kind in ("mlp", "grkan"):
        finals, curves = [], []
        for seed in range(seeds):
            torch.manual_seed(100 + seed)
            model = ViT(mlp=kind)
            hist = train(model, data, epochs, 100 + seed, f"scratch {kind} s{seed}")
            finals.append(hist["acc"][-1])
            curves.append(hist)
        spread = statistics.stdev(finals) if len(finals) > 1 else 0.0
        out[kind] = {"params": n_params(model), "acc": finals, "mean": statistics.mean(finals), "std": spread}
        out[kind]["curves"] = curves
    return out


def plot(results: dict, out: Path) -> list[Path]:
    """Training curves (loss and test accuracy per epoch) as PNG files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    curves = results["conversion"]["curves"]
    start = len(curves["pretrain"]["loss"])  # fine-tuning continues from the end of pretraining
    for name, hist in curves.items():
        first = 1 if name == "pretrain" else start + 1
        axes[0].plot(range(first, first + len(hist["loss"])), hist["loss"], label=name)
        axes[1].plot(range(first, first + len(hist["acc"])), hist["acc"], label=name)
    _label(axes, "conversion: pretrain (MLP) then fine-tune")
    paths.append(_save(fig, out / "conversion_curves.png"))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for kind, res in results["scratch"].items():
        for i, hist in enumerate(res["curves"]):
            axes[0].plot(hist["loss"], color="C0" if kind == "mlp" else "C1", label=kind if i == 0 else None)
            axes[1].plot(hist["acc"], color="C0" if kind == "mlp" else "C1", label=kind if i == 0 else None)
    _label(axes, "from scratch: MLP vs GR-KAN (variance init)")
    paths.append(_save(fig, out / "scratch_curves.png"))
    return paths


def _label(axes, title: str) -> None:
    axes[0].set(xlabel="epoch", ylabel="train loss", title=title)
    axes[1].set(xlabel="epoch", ylabel="test accuracy (%)")
    for ax in axes:
        ax.legend()


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def format_table(results: dict) -> str:
    """The conversion table and the from-scratch summary as plain text."""
    lines = [
        f"{'model':<8}{'params':>9}{'before':>9}{'converted':>11}{'finetuned':>11}{'s/epoch':>9}",
    ]
    for name, r in results["conversion"]["rows"].items():
        lines.append(
            f"{name:<8}{r['params']:>9}{r['acc_before']:>9.2f}{r['acc_after_conversion']:>11.2f}"
            f"{r['acc_after_finetune']:>11.2f}{r['sec_per_epoch']:>9.2f}"
        )
    lines.append("")
    lines.append(f"from scratch ({results['config']['epochs']} epochs, {results['config']['seeds']} seeds):")
    for kind, r in results["scratch"].items():
        lines.append(f"{kind:<8}{r['params']:>9}  test acc {r['mean']:.2f} +- {r['std']:.2f}  ({r['acc']})")
    return "\n".join(lines)


def run(epochs: int, finetune: int, seeds: int, out: Path, threads: int | None = None) -> dict:
    """Both experiments; writes results.json and the PNG plots to ``out``; returns the results."""
    if threads:
        torch.set_num_threads(threads)
    out.mkdir(parents=True, exist_ok=True)
    data = load_digits_split()
    results = {
        "config": {"epochs": epochs, "finetune_epochs": finetune, "seeds": seeds, "batch": BATCH},
        "machine": {
            "device": "cpu",
            "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "command": " ".join(["python", *sys.argv]),
            "torch": torch.__version__,
        },
        "conversion": conversion_run(data, epochs, finetune),
        "scratch": scratch_run(data, epochs, seeds),
    }
    plot(results, out)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return results


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20, help="pretraining / from-scratch epochs")
    parser.add_argument("--finetune-epochs", type=int, default=5, help="epochs after conversion")
    parser.add_argument("--seeds", type=int, default=3, help="seeds for the from-scratch comparison")
    parser.add_argument("--out", type=Path, default=Path("runs/digits"), help="output directory")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--quick", action="store_true", help="a short run for tests: 6 epochs, 1 fine-tune, 1 seed")
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs, args.finetune_epochs, args.seeds = 6, 1, 1
    results = run(args.epochs, args.finetune_epochs, args.seeds, args.out, args.threads)
    print(format_table(results))
    return results


if __name__ == "__main__":
    main()
