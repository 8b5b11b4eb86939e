"""Where conversion time goes: cProfile of ``kanc.compile`` on a whole model, and of the streaming conversion.

    python benchmarks/profile_convert.py --models gpt2-small,llama-1.1b-fp32 --target grkan

For each model (configs from benchmarks/scale.py, random weights): ``kanc.compile(model)`` as ``kanc convert``
calls it (a copy, then fidelity on token ids), under cProfile; then the same weights saved as a checkpoint and
converted by ``kanc.convert_checkpoint`` under cProfile. Prints the kanc functions (and torch ops) with the most
cumulative time, and writes the rows to JSON. The whole model must fit in memory for the first part.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scale  # noqa: E402

WATCH = ("kanc/", "copy.py", "{method 'double'", "{built-in method torch._C._nn.linear}", "{built-in method torch.cat}")


def profile(fn) -> tuple[float, pstats.Stats]:
    prof = cProfile.Profile()
    start = time.perf_counter()
    prof.runcall(fn)
    return time.perf_counter() - start, pstats.Stats(prof)


def hot_spots(stats: pstats.Stats, total: float, top: int) -> list[dict]:
    """The watched functions by cumulative time: where in kanc (or which torch op) the time goes."""
    rows = []
    for (file, line, name), (_, calls, tottime, cumtime, _) in stats.stats.items():
        where = f"{file}:{line}({name})"
        if any(w in where for w in WATCH) and cumtime > 0.01 * total:
            short = where.split("kanc/", 1)[-1] if "kanc/" in where else where
            rows.append({"function": short, "calls": calls, "cum_s": round(cumtime, 2), "self_s": round(tottime, 2)})
    rows.sort(key=lambda r: -r["cum_s"])
    return rows[:top]


def build(name: str):
    """The model ``name`` of benchmarks/scale.py with seeded random weights, whole."""
    import torch
    import transformers

    cls_name, kwargs, dtype = scale.MODELS[name]
    torch.manual_seed(0)
    model = getattr(transformers, cls_name)(getattr(transformers, cls_name).config_class(**kwargs))
    return model.to(getattr(torch, dtype)).eval()


def whole_model(name: str, target: str) -> tuple[object, float, list[dict]]:
    import kanc

    model = build(name)
    seconds, stats = profile(lambda: kanc.compile(model, target))
    return model, seconds, stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="gpt2-small,llama-1.1b-fp32")
    parser.add_argument("--target", default="grkan", choices=["grkan", "snnk"])
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--stream-only", action="store_true", help="skip the whole-model kanc.compile profile")
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "kanc-bench" / "profile.json")
    args = parser.parse_args()
    import kanc

    results = {}
    for name in args.models.split(","):
        if args.stream_only:
            model, entry = build(name), {}
        else:
            model, seconds, stats = whole_model(name, args.target)
            entry = {"compile_s": round(seconds, 1), "compile": hot_spots(stats, seconds, args.top)}
            _print(f"{name}: kanc.compile {seconds:.1f} s", entry["compile"])
        work = Path(tempfile.mkdtemp(prefix="kanc-profile-"))
        try:
            model.config.architectures = [type(model).__name__]
            model.save_pretrained(work / "src")
            del model
            seconds, stats = profile(lambda w=work: kanc.convert_checkpoint(w / "src", w / "out", args.target))
            entry["stream_phases_s"] = json.loads((work / "out" / "kanc.json").read_text())["stream"]["seconds"]
        finally:
            shutil.rmtree(work, ignore_errors=True)
        entry.update(stream_s=round(seconds, 1), stream=hot_spots(stats, seconds, args.top))
        _print(f"{name}: kanc.convert_checkpoint {seconds:.1f} s", entry["stream"])
        print("  phases: " + ", ".join(f"{k} {v:.1f} s" for k, v in entry["stream_phases_s"].items()))
        results[name] = entry
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"results: {args.out}")


def _print(title: str, rows: list[dict]) -> None:
    print(title)
    for r in rows:
        print(f"  {r['cum_s']:8.2f} s cum {r['self_s']:8.2f} s self {r['calls']:>7} calls  {r['function']}")


if __name__ == "__main__":
    main()
