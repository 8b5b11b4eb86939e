"""A character-level GPT on the Python standard library's sources: conversion to GR-KAN / SNNK, and GR-KAN from scratch.

Per seed (the seed sets the initialisation, the batch order and SNNK's random features; the data split is fixed):

(a) conversion: train the MLP GPT for ``--steps`` steps, convert it with ``kanc.compile`` to GR-KAN and to SNNK,
    measure the validation loss right after conversion, then fine-tune each for ``--finetune-steps`` steps while
    a copy of the MLP trains for the same extra steps (same schedule, same batches). Every GroupRational of every
    converted block must move during fine-tuning (relative change of numerator and denominator reported; a
    coefficient tensor that stays exactly still stops the run).
(b) from scratch: the GR-KAN GPT (``kanc.nn.GRKANMlp``, KAT's variance init) with its hidden width chosen so its
    parameter count is closest to the MLP GPT's, trained for the same steps on the same batches as the MLP of (a).

Results are mean, standard deviation and 95% t-interval over seeds, with paired differences (runs that share a
seed). results JSON first, then the figures. The committed results come from (1 thread, ~7 CPU-minutes):

    python examples/train_char_gpt.py --out examples/results
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from char_gpt import CharGPT, Corpus, GPTConfig, fixed_windows, load_corpus, random_windows  # noqa: E402
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

SCRIPT = "train_char_gpt.py"
TARGETS = ("mlp", "grkan", "snnk")  # fine-tuned rows of (a): the MLP keeps training, the others are converted
SCRATCH = ("mlp", "grkan")  # (b)
RESULTS = "char_gpt.json"


# ---- sizes and schedule --------------------------------------------------------------------------------------


def matched_grkan_config(config: GPTConfig) -> GPTConfig:
    """The GR-KAN GPT config whose parameter count is closest to the MLP GPT's (hidden width a multiple of groups)."""
    target = n_params(CharGPT(config, "mlp"))
    g = config.groups
    widths = range(g, 2 * config.hidden + g, g)
    return min((replace(config, hidden=h) for h in widths), key=lambda c: abs(n_params(CharGPT(c, "grkan")) - target))


def learning_rate(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to a tenth of ``peak`` at ``total``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress))))


# ---- training ------------------------------------------------------------------------------------------------


def lm_loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Mean next-character cross-entropy (nats)."""
    return nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())


@torch.no_grad()
def val_loss(model: nn.Module, val: tuple[Tensor, Tensor], chunk: int = 64) -> float:
    """Validation loss on the fixed windows (evaluated in chunks); NaN or inf stops the run."""
    model.eval()
    x, y = val
    total = sum(float(lm_loss(model, xs, ys)) * len(xs) for xs, ys in zip(x.split(chunk), y.split(chunk)))
    model.train()
    loss = total / len(x)
    if not math.isfinite(loss):
        raise FloatingPointError(f"validation loss is {loss}")
    return loss


def train(model: nn.Module, corpus: Corpus, val, steps: int, peak: float, seed: int, args) -> dict:
    """AdamW (decay on matrices only), warm-up + cosine from ``peak``, clip 1.0; validation every ``eval_every`` steps.

    Returns {"step": [...], "val_loss": [...], "train_loss": [...] (mean since the previous point), "timing"}.
    """
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.95))
    curve: dict = {"step": [0], "val_loss": [val_loss(model, val)], "train_loss": [None]}
    timing, running = {"wall_s": 0.0, "cpu_s": 0.0, "steps": steps}, []
    for step in range(steps):
        wall, cpu = time.perf_counter(), time.process_time()
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, steps, peak, args.warmup)
        x, y = random_windows(corpus.train, args.batch, args.context, gen)
        loss = lm_loss(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        running.append(loss.item())
        timing["wall_s"] += time.perf_counter() - wall  # training steps only, not the evaluations
        timing["cpu_s"] += time.process_time() - cpu
        if (step + 1) % args.eval_every == 0 or step + 1 == steps:
            curve["step"].append(step + 1)
            curve["val_loss"].append(val_loss(model, val))
            curve["train_loss"].append(sum(running) / len(running))
            running = []
    curve["timing"] = timing
    return curve


def calibration(corpus: Corpus, seed: int, args) -> Tensor:
    """Training windows kanc.compile fits each block on (rows that block really sees)."""
    gen = torch.Generator().manual_seed(10_000 + seed)
    return random_windows(corpus.train, args.calibration, args.context, gen)[0]


# ---- one seed ------------------------------------------------------------------------------------------------


def conversion_run(base: nn.Module, corpus: Corpus, val, seed: int, args) -> dict:
    """(a) for one seed, from the trained MLP GPT ``base``: losses after conversion and after fine-tuning."""
    calib = calibration(corpus, seed, args)
    out: dict = {"after_conversion": {}, "after_finetune": {}, "finetune": {}, "params": {}}
    for target in TARGETS:
        if target == "mlp":
            model = copy.deepcopy(base)
        else:
            model = convert(base, target, calib, seed, args.snnk_features, blocks=len(base.blocks))
        out["after_conversion"][target] = val_loss(model, val)
        out["params"][target] = n_params(model)
        before = rational_snapshot(model)
        curve = train(model, corpus, val, args.finetune_steps, args.finetune_lr, 20_000 + seed, args)
        out["finetune"][target] = curve
        out["after_finetune"][target] = curve["val_loss"][-1]
        if target == "grkan":
            out["rational_motion"] = rational_motion(model, before)
    return out


def seed_run(corpus: Corpus, val, seed: int, args) -> dict:
    """Both experiments for one seed; the MLP pretraining run is also (b)'s MLP from scratch."""
    config = gpt_config(args)
    torch.manual_seed(seed)
    base = CharGPT(config, "mlp")
    pretrain = train(base, corpus, val, args.steps, args.lr, seed, args)
    log(f"seed {seed}: MLP trained, val loss {pretrain['val_loss'][-1]:.4f}")
    conversion = conversion_run(base, corpus, val, seed, args)
    conversion["pretrain"] = pretrain
    conversion["before"] = pretrain["val_loss"][-1]
    matched = matched_grkan_config(config)
    torch.manual_seed(seed)
    model = CharGPT(matched, "grkan")
    grkan = train(model, corpus, val, args.steps, args.lr, seed, args)
    log(f"seed {seed}: GR-KAN from scratch, val loss {grkan['val_loss'][-1]:.4f}")
    conversion["params"]["scratch_grkan"] = n_params(model)
    return {"seed": seed, "conversion": conversion, "scratch": {"mlp": pretrain, "grkan": grkan}}


# ---- statistics ----------------------------------------------------------------------------------------------


def summarize_seeds(runs: list[dict]) -> dict:
    """Per-row summaries over seeds and the paired differences, with verdicts in words."""
    conv = [r["conversion"] for r in runs]
    rows = {"before": summarize([c["before"] for c in conv])}
    for target in TARGETS:
        rows[f"{target}_converted"] = summarize([c["after_conversion"][target] for c in conv])
        rows[f"{target}_finetuned"] = summarize([c["after_finetune"][target] for c in conv])
    scratch = {k: summarize([r["scratch"][k]["val_loss"][-1] for r in runs]) for k in SCRATCH}
    pairs = {
        "grkan_converted - before": ([c["before"] for c in conv], [c["after_conversion"]["grkan"] for c in conv]),
        "snnk_converted - before": ([c["before"] for c in conv], [c["after_conversion"]["snnk"] for c in conv]),
        "grkan_finetuned - mlp_finetuned": _finetuned(conv, "grkan"),
        "snnk_finetuned - mlp_finetuned": _finetuned(conv, "snnk"),
        "grkan_scratch - mlp_scratch": tuple([r["scratch"][k]["val_loss"][-1] for r in runs] for k in SCRATCH),
    }
    diffs = {name: paired(a, b) for name, (a, b) in pairs.items()}
    words = [verdict(d, *name.split(" - ")[::-1], "val loss", higher_is_better=False) for name, d in diffs.items()]
    return {"conversion": rows, "scratch": scratch, "paired": diffs, "verdicts": words}


def _finetuned(conv: list[dict], target: str) -> tuple[list[float], list[float]]:
    return [c["after_finetune"]["mlp"] for c in conv], [c["after_finetune"][target] for c in conv]


def format_report(results: dict) -> str:
    """The tables and verdicts as plain text."""
    s, cfg, params, n = results["summary"], results["config"], results["params"], len(results["seeds"])
    rows = [
        [t, str(params["converted"][t])]
        + [fmt_summary(s["conversion"][f"{t}_{k}"], 4) for k in ("converted", "finetuned")]
        for t in TARGETS
    ]
    lines = [
        f"(a) conversion, validation loss (nats/char), mean +- std [95% interval] over {n} seeds: MLP GPT trained "
        f"{cfg['steps']} steps, converted, then {cfg['finetune_steps']} fine-tuning steps each",
        *table(rows, ["model", "params", "right after conversion", "after fine-tuning"]),
        "",
        f"(b) from scratch, {cfg['steps']} steps, validation loss over {n} seeds",
    ]
    rows = [[k, str(params["hidden"][k]), str(params["scratch"][k]), fmt_summary(s["scratch"][k], 4)] for k in SCRATCH]
    lines += table(rows, ["model", "hidden", "params", "validation loss"])
    lines += ["", "paired differences (same seed), 95% interval:", *(f"  {v}" for v in s["verdicts"])]
    first = results["seeds"][0]
    lines += ["", f"rationals of the GR-KAN-converted GPT, change over fine-tuning (seed {first['seed']}):"]
    lines += motion_lines(first["conversion"]["rational_motion"])
    smallest = ", ".join(f"{k} {v:.2e}" for k, v in results["rational_motion_min"].items())
    return "\n".join([*lines, f"smallest change over all seeds and blocks: {smallest}", timing_line(results["timing"])])


# ---- plots ---------------------------------------------------------------------------------------------------


def plot(results: dict, out: Path) -> list[Path]:
    """Validation loss vs step with 95% seed bands, and the paired differences to the MLP: (a) and (b)."""
    plt = pyplot()
    runs, label = results["seeds"], "validation loss (nats/char)"
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    pre = [r["conversion"]["pretrain"] for r in runs]
    band(axes[0], pre[0]["step"], [c["val_loss"] for c in pre], "mlp (pretraining)", "C7")
    offset = pre[0]["step"][-1]
    tuned = {t: [r["conversion"]["finetune"][t]["val_loss"] for r in runs] for t in TARGETS}
    steps = [offset + s for s in runs[0]["conversion"]["finetune"]["mlp"]["step"]]
    for i, target in enumerate(TARGETS):
        band(axes[0], steps, tuned[target], f"{target} fine-tuned", f"C{i}")
        if target != "mlp":
            diff_band(axes[1], steps, tuned["mlp"], tuned[target], f"{target} - mlp", f"C{i}")
    axes[0].set(xlabel="step", ylabel=label, title="(a) MLP GPT trained, converted, fine-tuned")
    axes[1].set(xlabel="step", ylabel="difference in validation loss", title="(a) converted - MLP, same seed")
    paths = [save_figure(fig, axes, out / "char_gpt_conversion.png")]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    scratch = {k: [r["scratch"][k]["val_loss"] for r in runs] for k in SCRATCH}
    steps = runs[0]["scratch"]["mlp"]["step"]
    for i, kind in enumerate(scratch):
        band(axes[0], steps, scratch[kind], f"{kind} ({results['params']['scratch'][kind]:,} params)", f"C{i}")
    diff_band(axes[1], steps, scratch["mlp"], scratch["grkan"], "grkan - mlp", "C1")
    axes[0].set(xlabel="step", ylabel=label, title="(b) from scratch, equal parameter count")
    axes[1].set(xlabel="step", ylabel="difference in validation loss", title="(b) GR-KAN - MLP, same seed")
    paths.append(save_figure(fig, axes, out / "char_gpt_scratch.png"))
    return paths


# ---- the run -------------------------------------------------------------------------------------------------


def gpt_config(args) -> GPTConfig:
    return GPTConfig(context=args.context, dim=args.dim, depth=args.depth, heads=args.heads, hidden=args.hidden)


def sizes(runs: list[dict], args) -> dict:
    """Parameter counts of every model trained (the same for every seed) and the two hidden widths of (b)."""
    counts = runs[0]["conversion"]["params"]
    assert all(r["conversion"]["params"] == counts for r in runs), "parameter counts differ between seeds"
    hidden = {"mlp": args.hidden, "grkan": matched_grkan_config(gpt_config(args)).hidden}
    scratch = {"mlp": counts["mlp"], "grkan": counts["scratch_grkan"]}
    return {"converted": {t: counts[t] for t in TARGETS}, "scratch": scratch, "hidden": hidden}


def run(args, argv: list[str]) -> dict:
    """Every seed, the summary, the JSON (written first), then the figures."""
    wall, cpu, load = time.perf_counter(), time.process_time(), os.getloadavg()
    corpus = load_corpus(max_chars=args.max_chars)
    val = fixed_windows(corpus.val, args.val_windows, args.context)
    seeds = list(range(args.seed, args.seed + args.seeds))
    results = {
        "experiment": "char-level GPT on the Python standard library, MLP vs GR-KAN vs SNNK",
        "run": run_record(SCRIPT, argv, args.threads) | {"seeds": seeds},
        "config": vars(args) | {"out": str(args.out), "model": asdict(gpt_config(args))},
        "data": corpus.describe() | {"val_windows": args.val_windows, "val_tokens": args.val_windows * args.context},
        "seeds": [seed_run(corpus, val, seed, args) for seed in seeds],
    }
    results["params"] = sizes(results["seeds"], args)
    results["summary"] = summarize_seeds(results["seeds"])
    motion = [row for r in results["seeds"] for row in r["conversion"]["rational_motion"]]
    results["rational_motion_min"] = motion_minimum(motion)
    results["timing"] = timing(results["seeds"], wall, cpu, load)
    write_json(args.out / RESULTS, results)
    if not args.no_plot:
        plot(results, args.out)
    return results


def timing(runs: list[dict], wall: float, cpu: float, load: tuple) -> dict:
    """Wall and CPU seconds of the whole run and per training step of each model, and the machine's load."""

    def per_step(curves: list[dict], key: str) -> float:
        return sum(c["timing"][key] for c in curves) / sum(c["timing"]["steps"] for c in curves)

    curves = {
        "mlp": [r["conversion"]["pretrain"] for r in runs],
        "grkan_scratch": [r["scratch"]["grkan"] for r in runs],
        **{f"{t}_finetune": [r["conversion"]["finetune"][t] for r in runs] for t in TARGETS},
    }
    return {
        "wall_s": time.perf_counter() - wall,
        "cpu_s": time.process_time() - cpu,
        "loadavg_start": list(load),
        "loadavg_end": list(os.getloadavg()),
        "sec_per_step": {k: {"wall": per_step(v, "wall_s"), "cpu": per_step(v, "cpu_s")} for k, v in curves.items()},
    }


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=5, help="number of seeds")
    p.add_argument("--seed", type=int, default=0, help="first seed")
    p.add_argument("--steps", type=int, default=500, help="MLP pretraining = from-scratch steps")
    p.add_argument("--finetune-steps", type=int, default=100, help="steps after conversion")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--context", type=int, default=64, help="characters per window")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256, help="MLP hidden width (GR-KAN's is matched by parameters)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate of pretraining / from scratch")
    p.add_argument("--finetune-lr", type=float, default=1e-3, help="peak learning rate of fine-tuning")
    p.add_argument("--warmup", type=int, default=20, help="warm-up steps of each schedule")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--eval-every", type=int, default=50, help="steps between validation points")
    p.add_argument("--val-windows", type=int, default=128, help="fixed validation windows")
    p.add_argument("--calibration", type=int, default=32, help="training windows kanc.compile fits on")
    p.add_argument("--snnk-features", type=int, default=256, help="SNNK random features per block")
    p.add_argument("--max-chars", type=int, default=None, help="keep only this many characters per split")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (results depend on it)")
    p.add_argument("--out", type=Path, default=Path("runs/char_gpt"), help="output folder")
    p.add_argument("--no-plot", action="store_true", help="write the JSON only (no matplotlib needed)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    needs = {} if args.no_plot else {"matplotlib": "for the figures (or pass --no-plot)"}
    results = run_experiment(SCRIPT, run, args, argv, needs)
    print(format_report(results))
    return results


if __name__ == "__main__":
    main()
