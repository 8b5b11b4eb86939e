"""Train a small ViT on scikit-learn's digits (8x8, bundled: nothing downloaded), convert it to GR-KAN and SNNK.

Per seed (the seed sets the stratified 80/20 split, the initialisation, the batch order and SNNK's features):

- conversion: train the MLP ViT for ``--epochs``, convert it with ``kanc.compile`` (function-preserving init) to
  GR-KAN and to SNNK, fine-tune each for ``--finetune-epochs`` while a copy of the MLP trains for the same epochs
  (same schedule, same batches). Every GroupRational of every converted block must move during fine-tuning.
- from scratch: the GR-KAN ViT (KAT's variance-preserving init) trained like the MLP ViT above (same seed, epochs,
  batches); that MLP run is the baseline.

Test accuracy and test loss: mean, standard deviation and 95% t-interval over seeds, and paired differences
(runs that share a seed) that say which differences are within noise. results JSON first, then the figures.
The committed results come from:

    python examples/train_digits.py --out examples/results
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from digits_vit import ViT  # noqa: E402
from evidence import (  # noqa: E402
    band,
    convert,
    diff_band,
    fmt_summary,
    log,
    motion_lines,
    motion_minimum,
    n_params,
    paired,
    param_groups,
    pyplot,
    rational_motion,
    rational_snapshot,
    run_experiment,
    run_record,
    save_figure,
    summarize,
    table,
    timing_line,
    verdict,
    write_json,
)

Data = tuple[Tensor, Tensor, Tensor, Tensor]
BATCH = 32
SCRIPT = "train_digits.py"
TARGETS = ("mlp", "grkan", "snnk")
SCRATCH = ("mlp", "grkan")
RESULTS = "digits.json"


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
def evaluate(model: nn.Module, x: Tensor, y: Tensor) -> tuple[float, float]:
    """(test accuracy in percent, test cross-entropy in nats); NaN or inf stops the run."""
    model.eval()
    logits = model(x)
    model.train()
    loss = float(nn.functional.cross_entropy(logits, y))
    if not math.isfinite(loss):
        raise FloatingPointError(f"test loss is {loss}")
    return 100.0 * float((logits.argmax(-1) == y).float().mean()), loss


def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """Test accuracy in percent."""
    return evaluate(model, x, y)[0]


def _progress(label: str, epoch: int, epochs: int, loss: float, acc: float) -> None:
    if not sys.stderr.isatty():  # quiet in logs and tests
        return
    filled = int(30 * epoch / epochs)
    bar = "#" * filled + "." * (30 - filled)
    end = "\n" if epoch == epochs else ""
    sys.stderr.write(f"\r{label:<18} [{bar}] {epoch}/{epochs} loss {loss:.3f} acc {acc:5.1f}%{end}")
    sys.stderr.flush()


def train(model: nn.Module, data: Data, epochs: int, seed: int, label: str, lr: float = 3e-3) -> dict:
    """AdamW (decay 0.05 on matrices only) + cosine schedule, batch BATCH, batches from a ``seed`` generator.

    Returns per-epoch lists: train loss, test accuracy, test loss, seconds.
    """
    x_train, y_train, x_test, y_test = data
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(param_groups(model, 0.05), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, epochs * (-(-len(y_train) // BATCH))))
    history: dict[str, list[float]] = {"loss": [], "acc": [], "test_loss": [], "seconds": []}
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
        acc, test_loss = evaluate(model, x_test, y_test)
        history["acc"].append(acc)
        history["test_loss"].append(test_loss)
        _progress(label, epoch, epochs, history["loss"][-1], acc)
    return history


def conversion_run(base: nn.Module, data: Data, seed: int, args) -> dict:
    """From the trained MLP ViT ``base``: accuracy / loss right after conversion and after fine-tuning, per target."""
    rows, curves, motion = {}, {}, None
    before = evaluate(base, data[2], data[3])
    for target in TARGETS:
        if target == "mlp":
            model = copy.deepcopy(base)
        else:
            model = convert(
                base, target, data[0][: args.calibration], seed, args.snnk_features, blocks=len(base.blocks)
            )
        after = evaluate(model, data[2], data[3])
        snapshot = rational_snapshot(model)
        hist = train(model, data, args.finetune_epochs, 1000 + seed, f"finetune {target} s{seed}", lr=1e-3)
        if target == "grkan":
            motion = rational_motion(model, snapshot)
        curves[target] = hist
        final = (hist["acc"][-1], hist["test_loss"][-1]) if hist["acc"] else after
        rows[target] = {
            "params": n_params(model),
            "acc_before": before[0],
            "loss_before": before[1],
            "acc_after_conversion": after[0],
            "loss_after_conversion": after[1],
            "acc_after_finetune": final[0],
            "loss_after_finetune": final[1],
        }
    return {"rows": rows, "curves": curves, "rational_motion": motion}


def seed_run(seed: int, args) -> dict:
    """Both experiments for one seed; the MLP trained before conversion is also the from-scratch baseline."""
    x_train, y_train, x_test, y_test = load_digits_split(seed)
    data = (x_train[: args.train_limit], y_train[: args.train_limit], x_test, y_test)
    torch.manual_seed(seed)
    base = ViT(mlp="mlp")
    pretrain = train(base, data, args.epochs, seed, f"mlp s{seed}")
    conversion = conversion_run(base, data, seed, args) | {"pretrain": pretrain}
    torch.manual_seed(seed)
    model = ViT(mlp="grkan")
    grkan = train(model, data, args.epochs, seed, f"scratch grkan s{seed}")
    log(f"seed {seed}: MLP {pretrain['acc'][-1]:.2f}%, GR-KAN from scratch {grkan['acc'][-1]:.2f}%")
    scratch = {"mlp": pretrain | {"params": n_params(base)}, "grkan": grkan | {"params": n_params(model)}}
    return {"seed": seed, "conversion": conversion, "scratch": scratch}


# ---- statistics and the table --------------------------------------------------------------------------------


def column(runs: list[dict], target: str, key: str) -> list[float]:
    return [r["conversion"]["rows"][target][key] for r in runs]


def scratch_final(runs: list[dict], kind: str, key: str) -> list[float]:
    return [r["scratch"][kind][key][-1] for r in runs]


def summarize_seeds(runs: list[dict]) -> dict:
    """Per-row summaries over seeds, paired differences and their verdicts, for accuracy and test loss."""
    keys = ("after_conversion", "after_finetune")
    rows = {f"{m}_before": summarize(column(runs, "mlp", f"{m}_before")) for m in ("acc", "loss")}
    rows |= {
        f"{t}_{m}_{k}": summarize(column(runs, t, f"{m}_{k}")) for t in TARGETS for m in ("acc", "loss") for k in keys
    }
    scratch = {f"{k}_{m}": summarize(scratch_final(runs, k, m)) for k in SCRATCH for m in ("acc", "test_loss")}
    pairs = {**metric_pairs(runs, "acc"), **metric_pairs(runs, "loss")}
    diffs = {name: paired(a, b) for name, (a, b) in pairs.items()}
    words = [_verdict(name, d) for name, d in diffs.items()]
    return {"conversion": rows, "scratch": scratch, "paired": diffs, "verdicts": words}


def metric_pairs(runs: list[dict], metric: str) -> dict[str, tuple[list[float], list[float]]]:
    """The compared columns of one metric ("acc" or "loss"), named "b - a metric": (a, b) in seed order."""
    final = "acc" if metric == "acc" else "test_loss"
    mlp = {k: column(runs, "mlp", f"{metric}_{k}") for k in ("before", "after_finetune")}
    pairs = {}
    for t in ("grkan", "snnk"):
        pairs[f"{t}_converted - before {metric}"] = (mlp["before"], column(runs, t, f"{metric}_after_conversion"))
        pairs[f"{t}_finetuned - mlp_finetuned {metric}"] = (
            mlp["after_finetune"],
            column(runs, t, f"{metric}_after_finetune"),
        )
    pairs[f"grkan_scratch - mlp_scratch {metric}"] = tuple(scratch_final(runs, k, final) for k in SCRATCH)
    return pairs


def _verdict(name: str, diff: dict) -> str:
    pair, metric = name.rsplit(" ", 1)
    b, a = pair.split(" - ")
    label = "test accuracy (points)" if metric == "acc" else "test loss (nats)"
    return verdict(diff, a, b, label, higher_is_better=metric == "acc")


def format_table(results: dict) -> str:
    """The conversion table, the from-scratch summary and the verdicts as plain text."""
    s, cfg, n = results["summary"], results["config"], len(results["seeds"])
    first = results["seeds"][0]
    rows = [
        [t, str(first["conversion"]["rows"][t]["params"])]
        + [
            fmt_summary(s["conversion"][k])
            for k in ("acc_before", f"{t}_acc_after_conversion", f"{t}_acc_after_finetune")
        ]
        + [fmt_summary(s["conversion"][f"{t}_loss_after_finetune"], 4)]
        for t in TARGETS
    ]
    header = ["model", "params", "acc before", "acc right after conversion", "acc after fine-tuning", "test loss after"]
    lines = [
        f"conversion, mean +- std [95% interval] over {n} seeds: MLP ViT trained {cfg['epochs']} epochs, converted, "
        f"then {cfg['finetune_epochs']} fine-tuning epochs each (test accuracy %, test loss nats)",
        *table(rows, header),
        "",
        f"from scratch, {cfg['epochs']} epochs, {n} seeds",
    ]
    rows = [
        [
            k,
            str(first["scratch"][k]["params"]),
            fmt_summary(s["scratch"][f"{k}_acc"]),
            fmt_summary(s["scratch"][f"{k}_test_loss"], 4),
        ]
        for k in SCRATCH
    ]
    lines += table(rows, ["model", "params", "test accuracy", "test loss"])
    lines += ["", "paired differences (same seed), 95% interval:", *(f"  {v}" for v in s["verdicts"])]
    lines += ["", f"rationals of the GR-KAN-converted ViT, change over fine-tuning (seed {first['seed']}):"]
    lines += motion_lines(first["conversion"]["rational_motion"])
    smallest = ", ".join(f"{k} {v:.2e}" for k, v in results["rational_motion_min"].items())
    return "\n".join([*lines, f"smallest change over all seeds and blocks: {smallest}", timing_line(results["timing"])])


# ---- figures -------------------------------------------------------------------------------------------------


def plot(results: dict, out: Path) -> list[Path]:
    """Test accuracy per epoch with 95% seed bands and the paired differences to the MLP: conversion, scratch."""
    plt = pyplot()
    runs = results["seeds"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    pre = [r["conversion"]["pretrain"]["acc"] for r in runs]
    band(axes[0], range(1, len(pre[0]) + 1), pre, "mlp (pretraining)", "C7")
    tuned = {t: [r["conversion"]["curves"][t]["acc"] for r in runs] for t in TARGETS}
    epochs = range(len(pre[0]) + 1, len(pre[0]) + 1 + len(tuned["mlp"][0]))
    for i, t in enumerate(TARGETS):
        band(axes[0], epochs, tuned[t], f"{t} fine-tuned", f"C{i}")
        if t != "mlp":
            diff_band(axes[1], epochs, tuned["mlp"], tuned[t], f"{t} - mlp", f"C{i}")
    axes[0].set(xlabel="epoch", ylabel="test accuracy (%)", title="conversion: MLP ViT trained, converted, fine-tuned")
    axes[1].set(xlabel="epoch", ylabel="difference (points)", title="fine-tuning: converted - MLP, same seed")
    paths = [save_figure(fig, axes, out / "digits_conversion.png")]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    scratch = {k: [r["scratch"][k]["acc"] for r in runs] for k in SCRATCH}
    epochs = range(1, len(scratch["mlp"][0]) + 1)
    for i, kind in enumerate(scratch):
        band(axes[0], epochs, scratch[kind], f"{kind} ({runs[0]['scratch'][kind]['params']:,} params)", f"C{i}")
    diff_band(axes[1], epochs, scratch["mlp"], scratch["grkan"], "grkan - mlp", "C1")
    axes[0].set(xlabel="epoch", ylabel="test accuracy (%)", title="from scratch: MLP vs GR-KAN (variance init)")
    axes[1].set(xlabel="epoch", ylabel="difference (points)", title="from scratch: GR-KAN - MLP, same seed")
    paths.append(save_figure(fig, axes, out / "digits_scratch.png"))
    return paths


# ---- the run -------------------------------------------------------------------------------------------------


def run(args, argv: list[str]) -> dict:
    """Every seed, the summary, the JSON (written first), then the figures."""
    wall, cpu, load = time.perf_counter(), time.process_time(), os.getloadavg()
    seeds = list(range(args.seed, args.seed + args.seeds))
    results = {
        "experiment": "ViT on scikit-learn digits: MLP vs GR-KAN vs SNNK",
        "run": run_record(SCRIPT, argv, args.threads) | {"seeds": seeds},
        "config": vars(args) | {"out": str(args.out), "batch": BATCH},
        "seeds": [seed_run(seed, args) for seed in seeds],
    }
    results["summary"] = summarize_seeds(results["seeds"])
    motion = [row for r in results["seeds"] for row in r["conversion"]["rational_motion"]]
    results["rational_motion_min"] = motion_minimum(motion)
    results["timing"] = {
        "wall_s": time.perf_counter() - wall,
        "cpu_s": time.process_time() - cpu,
        "loadavg_start": list(load),
        "loadavg_end": list(os.getloadavg()),
    }
    write_json(args.out / RESULTS, results)
    if not args.no_plot:
        plot(results, args.out)
    return results


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=25, help="pretraining / from-scratch epochs")
    parser.add_argument("--finetune-epochs", type=int, default=5, help="epochs after conversion")
    parser.add_argument("--seeds", type=int, default=10, help="number of seeds")
    parser.add_argument("--seed", type=int, default=0, help="first seed")
    parser.add_argument("--snnk-features", type=int, default=256, help="SNNK random features per block")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (results depend on it)")
    parser.add_argument("--out", type=Path, default=Path("runs/digits"), help="output directory")
    parser.add_argument("--calibration", type=int, default=256, help="training images kanc.compile fits on")
    parser.add_argument("--train-limit", type=int, default=None, help="keep only this many training images (tests)")
    parser.add_argument("--no-plot", action="store_true", help="write the JSON only (no matplotlib needed)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    needs = {"sklearn": "for the digits data"}
    if not args.no_plot:
        needs["matplotlib"] = "for the figures (or pass --no-plot)"
    results = run_experiment(SCRIPT, run, args, argv, needs)
    print(format_table(results))
    return results


if __name__ == "__main__":
    main()
