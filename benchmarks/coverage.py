"""Conversion coverage of third-party model code (issue 11), measured independently of kanc's own report.

Builds each family tiny with seeded random weights (torch.nn, torchvision, timm, diffusers, x-transformers,
vit-pytorch, open_clip, sentence-transformers, peft, the Hugging Face families of convert_zoo.py, handwritten
stress cases), converts it with ``kanc.compile`` for both targets on the family's own example inputs, and
measures: the expected MLP blocks (from the library's code and config), the blocks converted (kanc layers in the
converted model, cross-checked against kanc.report), the output error against the original in no_grad and in
grad mode, and the silent changes (see families/measure.py). Prints a table and the totals and writes JSON.

    python benchmarks/coverage.py                          # every family, grkan and snnk
    python benchmarks/coverage.py --family 'nn_*' --target grkan
    python benchmarks/coverage.py --list

Needs the "zoo" extra (make test installs it). CPU, fp32.
"""

from __future__ import annotations

import argparse
import fnmatch
import importlib.metadata
import math
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

import common  # noqa: E402
from families import all_families  # noqa: E402
from families.measure import failures, measure_family, silent_changes, totals  # noqa: E402
from families.tvshim import SKIPPED, import_torchvision  # noqa: E402

from kanc.text import json_safe  # noqa: E402

TARGETS = ("grkan", "snnk")
LIBRARIES = (
    "torch", "torchvision", "timm", "diffusers", "x-transformers", "vit-pytorch", "open-clip-torch",
    "sentence-transformers", "peft", "transformers", "triton",
)  # fmt: skip
DEFAULT_OUT = common.RESULTS_DIR / "coverage.json"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", action="append", default=[], help="family name or glob (repeatable, or a,b)")
    parser.add_argument("--target", default=",".join(TARGETS), help="comma-separated targets (grkan,snnk)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON path (default {DEFAULT_OUT})")
    parser.add_argument("--list", action="store_true", help="list the families and exit")
    args = parser.parse_args(argv)
    args.targets = [t for t in args.target.split(",") if t]
    unknown = sorted(set(args.targets) - set(TARGETS))
    if unknown:
        parser.error(f"unknown target(s) {unknown}; known: {list(TARGETS)}")
    args.patterns = [p for arg in args.family for p in arg.split(",") if p]
    return args


def select(patterns: list[str]) -> list:
    families = all_families()
    if not patterns:
        return families
    chosen = [f for f in families if any(fnmatch.fnmatchcase(f.name, p) for p in patterns)]
    if not chosen:
        sys.exit(f"no family matches {patterns} (see --list)")
    return chosen


# ---- table -----------------------------------------------------------------------------------------------------


def _err(value: float | None) -> str:
    if value is None:
        return "-"
    return "inf" if math.isinf(value) else ("nan" if math.isnan(value) else f"{value:.1e}")


def _target_cells(t: dict | None) -> tuple[str, str]:
    if t is None:
        return "", ""
    if t["status"] != "ok":
        return "CRASH", "-"
    extra = len(t.get("reported_extra", []))
    converted = f"{t['converted']}" + (f"+{extra}" if extra else "")
    return converted, f"{_err(t['error_no_grad'])}/{_err(t['error_grad'])}"


HEADER = (
    f"{'family':<30}{'exp':>4} {'grkan':>5} {'snnk':>5}  {'grkan err ng/g':<17} {'snnk err ng/g':<17} "
    f"{'silent':>6} {'skips':>5}  verdict"
)
LEGEND = (
    "exp: MLP blocks the library's code holds; grkan/snnk: those holding kanc layers (+N: other modules the report "
    "converts); err: output error vs the original, no_grad/grad; silent: silent changes; skips: grkan/snnk"
)


def line(row: dict) -> str:
    head = f"{row['family']:<30}"
    if row["status"] != "ok":
        return f"{head}{'-':>4} {row['status'].upper()}: {row.get('error', '')[:120]}"
    targets = row["targets"]
    g_conv, g_err = _target_cells(targets.get("grkan"))
    s_conv, s_err = _target_cells(targets.get("snnk"))
    skips = "/".join(str(t.get("skips", "-")) for t in targets.values())
    bad = failures(row)
    verdict = "ok" if not bad else f"FAIL ({len(bad)}): {bad[0][:90]}"
    silent = len(silent_changes(row))
    return (
        f"{head}{row['expected']:>4} {g_conv:>5} {s_conv:>5}  {g_err:<17} {s_err:<17} {silent:>6} {skips:>5}  {verdict}"
    )


def print_totals(summary: dict, targets: list[str]) -> None:
    libraries = ", ".join(
        f"{lib} " + "/".join(str(v[t]) for t in targets) + f" of {v['expected']}"
        for lib, v in summary["by_library"].items()
    )
    print(f"by library ({'/'.join(targets)} of expected): {libraries}")
    for scope, label in (("named", "issue 11's families"), ("all", "all families")):
        entry = summary[scope]
        parts = []
        for target in targets:
            done, frac = entry[target]["converted"], entry[target]["fraction"]
            parts.append(f"{target} {done}/{entry['expected']}" + (f" ({frac:.0%})" if frac is not None else ""))
        print(
            f"{label} ({entry['families']}): " + ", ".join(parts) + f"; silent changes {entry['silent_changes']}; "
            f"failing families {len(entry['failed_families'])}"
        )


# ---- JSON ------------------------------------------------------------------------------------------------------


def versions() -> dict:
    out = {"python": platform.python_version()}
    for dist in LIBRARIES:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    import kanc

    out["kanc"] = kanc.__version__
    out["kanc_commit"] = _git("rev-parse", "HEAD")
    out["kanc_tree_dirty"] = bool(_git("status", "--porcelain", "--untracked-files=no")) if out["kanc_commit"] else None
    return out


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def write_json(path: Path, rows: list[dict], summary: dict, args: argparse.Namespace, seconds: float) -> Path:
    import torch

    payload = {
        "benchmark": "coverage",
        "device": "cpu",
        "dtype": "float32",
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "versions": versions(),
        "torchvision_shim_skipped": list(SKIPPED),
        "targets": args.targets,
        "seconds": seconds,
        "totals": summary,
        "families": rows,
    }
    return common.write("coverage", json_safe(payload, nonfinite=str), SimpleNamespace(out=path), torch.device("cpu"))


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    families = select(args.patterns)
    if args.list:
        for f in families:
            print(f"{f.name:<32}{f.library:<22}{'issue 11' if f.named else 'not named in issue 11'}")
        return []
    import_torchvision()  # before timm: its CUDA build's extension does not load beside a CPU torch
    start = time.perf_counter()
    print(LEGEND)
    print(HEADER)
    rows = []
    for family in families:
        rows.append(measure_family(family, args.targets))
        print(line(rows[-1]), flush=True)
    seconds = time.perf_counter() - start
    summary = totals(rows, args.targets)
    print()
    print_totals(summary, args.targets)
    path = write_json(args.out, rows, summary, args, seconds)
    print(f"{len(rows)} families in {seconds:.0f} s; wrote {path}")
    return rows


if __name__ == "__main__":
    main()
