"""What the learning examples share: reproducible runs, run records, seed statistics, the "rational moved" check.

- ``reproducible(threads)``: a fixed thread count and deterministic kernels for the duration of a run (restored
  after, with the global RNG state, so a run inside pytest leaves no trace).
- ``run_record(script, argv)``: versions, the exact command, the kanc commit; ``VOLATILE`` names what differs
  between two runs of one command (wall times, dates), ``deterministic_part`` drops it.
- ``summarize`` / ``paired``: mean, sample standard deviation and the 95% Student-t interval over seeds, and the
  same for paired differences (runs that share a seed); ``verdict`` says in words whether 0 is inside.
- ``rational_snapshot`` / ``rational_motion``: per converted block, how far each GroupRational's numerator and
  denominator moved; a coefficient tensor that stays exactly still raises ``FrozenRationalError``.

Only kanc's public API is used (``kanc.report``, ``kanc.nn``).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

import kanc
from kanc.nn import GroupRational
from kanc.writing import write_text

REPO = Path(__file__).resolve().parents[1]
# keys whose values differ between two runs of the same command: timings and the run's date
VOLATILE = frozenset({"seconds", "wall_s", "sec_per_epoch", "sec_per_step", "started", "timing"})


# ---- reproducibility and the run record ----------------------------------------------------------------------


@contextlib.contextmanager
def reproducible(threads: int) -> Iterator[None]:
    """Fixed thread count, deterministic algorithms and a saved global RNG, all restored on exit."""
    saved = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(), torch.get_rng_state())
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(saved[0])
        torch.use_deterministic_algorithms(saved[1], warn_only=warn_only)
        torch.set_rng_state(saved[2])


def require(modules: dict[str, str], script: str) -> None:
    """Exit with one line naming the first missing optional module ({import name: why it is needed})."""
    for name, why in modules.items():
        try:
            importlib.import_module(name)
        except ImportError:
            package = {"sklearn": "scikit-learn"}.get(name, name)
            raise SystemExit(f"{script}: {package} is needed {why}; pip install {package}") from None


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def run_record(script: str, argv: Sequence[str], threads: int) -> dict:
    """The command as typed, software versions, the kanc commit (and whether kanc/ or examples/ had edits)."""
    dirty = _git("status", "--porcelain", "--", "kanc", "examples")
    return {
        "command": shlex.join(["python", f"examples/{script}", *argv]),
        "threads": threads,
        "deterministic_algorithms": True,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "kanc": kanc.__version__,
            "numpy": _version("numpy"),
            "scikit-learn": _version("scikit-learn"),
            "matplotlib": _version("matplotlib"),
        },
        "kanc_commit": _git("rev-parse", "HEAD"),
        "uncommitted_changes": None if dirty is None else bool(dirty),
        "platform": {"machine": platform.machine(), "system": platform.system(), "cpus": os.cpu_count()},
    }


def deterministic_part(value: object) -> object:
    """``value`` without the VOLATILE keys, at any depth: what two runs of one command must share bit for bit."""
    if isinstance(value, dict):
        return {k: deterministic_part(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [deterministic_part(v) for v in value]
    return value


def write_json(path: Path, obj: object) -> Path:
    """Write ``obj`` as JSON atomically, replacing an earlier result (through :mod:`kanc.writing`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(obj, indent=1, allow_nan=False), force=True)
    return path


def run_experiment(script: str, run: Callable[..., dict], args, argv: list[str], needs: dict[str, str]) -> dict:
    """``run(args, argv)`` under ``reproducible(args.threads)``, after checking the optional modules ``needs``.

    A missing module or a rational that did not learn exits with one line naming it (nothing is saved).
    """
    require(needs, script)
    try:
        with reproducible(args.threads):
            return run(args, argv)
    except FrozenRationalError as e:
        raise SystemExit(f"{script}: a rational did not learn: {e}") from None


def log(message: str) -> None:
    """Progress on stderr (stdout holds the tables)."""
    print(message, file=sys.stderr, flush=True)


# ---- statistics over seeds -----------------------------------------------------------------------------------


def _t_central(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with integer ``df`` (Abramowitz & Stegun 26.7.3 and 26.7.4)."""
    theta = math.atan(t / math.sqrt(df))
    c2, s = math.cos(theta) ** 2, math.sin(theta)
    if df % 2 == 0:
        term = total = 1.0
        for k in range(1, (df - 2) // 2 + 1):
            term *= c2 * (2 * k - 1) / (2 * k)
            total += term
        return s * total
    term = total = math.cos(theta) if df > 1 else 0.0
    for k in range(1, (df - 3) // 2 + 1):
        term *= c2 * (2 * k) / (2 * k + 1)
        total += term
    return 2 / math.pi * (theta + s * total)


def t_quantile(level: float, df: int) -> float:
    """The t with P(|T| <= t) = ``level`` (two-sided), e.g. ``t_quantile(0.95, 9)`` = 2.2622."""
    if df < 1 or not 0 < level < 1:
        raise ValueError(f"need df >= 1 and 0 < level < 1, got df={df}, level={level}")
    lo, hi = 0.0, 1.0
    while _t_central(hi, df) < level:
        lo, hi = hi, 2 * hi
    for _ in range(200):  # bisection to the last bit
        mid = (lo + hi) / 2
        if mid in (lo, hi):
            break
        lo, hi = (mid, hi) if _t_central(mid, df) < level else (lo, mid)
    return (lo + hi) / 2


def summarize(values: Sequence[float], level: float = 0.95) -> dict:
    """n, mean, sample std and the ``level`` t-interval of the mean (std and interval None for one value)."""
    values = [float(v) for v in values]
    if not values or not all(math.isfinite(v) for v in values):
        raise ValueError(f"summarize needs finite values, got {values}")
    n, mean = len(values), statistics.fmean(values)
    if n == 1:
        return {"n": 1, "mean": mean, "std": None, "ci95": None, "values": values}
    std = statistics.stdev(values)
    half = t_quantile(level, n - 1) * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "ci95": [mean - half, mean + half], "values": values}


def paired(a: Sequence[float], b: Sequence[float]) -> dict:
    """Summary of the per-seed differences b - a (the two lists in the same seed order)."""
    if len(a) != len(b):
        raise ValueError(f"paired comparison of {len(a)} and {len(b)} runs")
    return summarize([y - x for x, y in zip(a, b)])


def verdict(diff: dict, a: str, b: str, metric: str, higher_is_better: bool) -> str:
    """One line: is ``b - a`` outside noise (its 95% interval excludes 0), and which way."""
    head, mean = f"{b} - {a} {metric}", diff["mean"]
    direction = f"{b} {'better' if (mean > 0) == higher_is_better else 'worse'}"
    if diff["ci95"] is None:
        return f"{head}: {mean:+.4g} from one seed, no interval: cannot tell"
    if diff["std"] == 0:  # every seed gave the same difference: the interval is a point
        return f"{head}: {mean:+.4g} in all {diff['n']} seeds, " + ("identical" if mean == 0 else direction)
    lo, hi = diff["ci95"]
    span = f"{mean:+.4g} [{lo:+.4g}, {hi:+.4g}]"
    if lo <= 0 <= hi:
        return f"{head}: {span}, within noise (the 95% interval includes 0)"
    return f"{head}: {span}, {direction} beyond noise"


def timing_line(timing: dict) -> str:
    """Wall and CPU minutes of a run and the machine's 1-minute load average at its start and end."""
    load = f"{timing['loadavg_start'][0]:.1f} -> {timing['loadavg_end'][0]:.1f}"
    return f"wall {timing['wall_s'] / 60:.1f} min, CPU {timing['cpu_s'] / 60:.1f} min, 1-min load average {load}"


def table(rows: list[list[str]], header: list[str]) -> list[str]:
    """Left-aligned text columns, two spaces apart."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]


def fmt_summary(s: dict, digits: int = 2) -> str:
    """'mean +- std [lo, hi]' for a table cell."""
    if s["std"] is None:
        return f"{s['mean']:.{digits}f}"
    lo, hi = s["ci95"]
    return f"{s['mean']:.{digits}f} +- {s['std']:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


# ---- optimisation and the rationals --------------------------------------------------------------------------


def rationals(model: nn.Module) -> dict[str, GroupRational]:
    """Every GroupRational of ``model`` by its module path."""
    return {name: m for name, m in model.named_modules() if isinstance(m, GroupRational)}


def n_params(model: nn.Module) -> int:
    """Trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def convert(
    model: nn.Module, target: str, calibration: Tensor, seed: int, snnk_features: int, blocks: int
) -> nn.Module:
    """A converted copy of ``model``: kanc.compile with the function-preserving init, fitted on ``calibration``.

    Raises RuntimeError unless exactly ``blocks`` MLP blocks were converted (a silent miss would make every later
    comparison one of the MLP against itself).
    """
    options = {"num_features": snnk_features, "seed": seed} if target == "snnk" else {}
    converted = kanc.compile(model, target=target, calibration=calibration, **options)
    done = kanc.report(converted).blocks
    if len(done) != blocks:
        raise RuntimeError(f"kanc.compile converted {len(done)} MLP blocks to {target}, expected {blocks}: {done}")
    return converted


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on matrices and embeddings only (not biases, norms, or rational coefficients)."""
    skip = {id(p) for r in rationals(model).values() for p in r.parameters()}
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2 and id(p) not in skip]
    ids = {id(p) for p in decay}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


class FrozenRationalError(RuntimeError):
    """A rational coefficient tensor of a converted block did not change during fine-tuning."""


def rational_snapshot(model: nn.Module) -> dict[str, tuple[Tensor, Tensor]]:
    """Copies of every rational's (numerator, denominator), to compare after training."""
    return {n: (r.numerator.detach().clone(), r.denominator.detach().clone()) for n, r in rationals(model).items()}


def _change(before: Tensor, after: Tensor) -> dict:
    delta = float((after.detach().double() - before.double()).norm())
    norm = float(before.double().norm())
    return {"abs": delta, "rel": delta / norm if norm > 0 else None}


def _owner(name: str, blocks: Sequence[str]) -> str | None:
    return next((b for b in blocks if name == b or name.startswith(b + ".")), None)


def rational_motion(model: nn.Module, before: dict[str, tuple[Tensor, Tensor]]) -> list[dict]:
    """Per rational of every converted block (``kanc.report(model).blocks``): the change of its coefficients.

    Each row: block, rational (module path), numerator and denominator as {"abs": |after - before|,
    "rel": |after - before| / |before| (None when before is all zero)}. Raises FrozenRationalError when a
    converted block has no rational or any coefficient tensor is bitwise unchanged.
    """
    blocks = kanc.report(model).blocks
    rows, seen = [], set()
    for name, r in rationals(model).items():
        block = _owner(name, blocks)
        if block is None:
            continue
        seen.add(block)
        num0, den0 = before[name]
        row = {"block": block, "rational": name, "numerator": _change(num0, r.numerator)}
        row["denominator"] = _change(den0, r.denominator)
        rows.append(row)
        still = [part for part in ("numerator", "denominator") if row[part]["abs"] == 0.0]
        if still:
            raise FrozenRationalError(f"{name}: {' and '.join(still)} did not move during fine-tuning")
    missing = [b for b in blocks if b not in seen]
    if missing:
        raise FrozenRationalError(f"converted block {missing[0]} has no GroupRational to check")
    return rows


def motion_minimum(rows: list[dict]) -> dict[str, float]:
    """The smallest change of each coefficient kind over ``rows`` (any blocks, any seeds): how close to frozen.

    Keys "numerator rel", "denominator rel" and, for coefficients that started at zero (relative change undefined),
    "denominator abs (from 0)" / "numerator abs (from 0)".
    """
    out: dict[str, float] = {}
    for row in rows:
        for part in ("numerator", "denominator"):
            c = row[part]
            key, value = (f"{part} rel", c["rel"]) if c["rel"] is not None else (f"{part} abs (from 0)", c["abs"])
            out[key] = min(out.get(key, value), value)
    return out


def motion_lines(rows: list[dict]) -> list[str]:
    """The motion rows as text: relative change (or absolute, from a zero start) of numerator and denominator."""

    def cell(c: dict) -> str:
        return f"{c['rel']:.2e} rel" if c["rel"] is not None else f"{c['abs']:.2e} abs (from 0)"

    width = max(len(r["rational"]) for r in rows)
    return [f"  {r['rational']:<{width}}  num {cell(r['numerator'])}  den {cell(r['denominator'])}" for r in rows]


# ---- figures -------------------------------------------------------------------------------------------------


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def band(ax, steps: Sequence[float], runs: Sequence[Sequence[float]], label: str, color: str) -> None:
    """The mean over seeds as a line and its 95% t-interval as a shaded band (a line only for one seed)."""
    columns = [summarize(values) for values in zip(*runs)]
    ax.plot(steps, [c["mean"] for c in columns], color=color, label=f"{label} (n={len(runs)})")
    if len(runs) > 1:
        ax.fill_between(steps, *zip(*(c["ci95"] for c in columns)), color=color, alpha=0.25, linewidth=0)


def diff_band(ax, steps: Sequence[float], base: Sequence[Sequence[float]], runs, label: str, color: str) -> None:
    """``band`` of the per-seed differences runs - base (paired by seed), with the zero line."""
    band(ax, steps, [[y - x for x, y in zip(a, b)] for a, b in zip(base, runs)], label, color)
    ax.axhline(0.0, color="black", linewidth=0.8)


def save_figure(fig, axes, path: Path) -> Path:
    """Legends, a tight layout, PNG at 100 dpi, and the figure closed."""
    for ax in axes:
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    pyplot().close(fig)
    return path
