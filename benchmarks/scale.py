"""Big checkpoints on the CPU: streaming conversion (kanc.convert_checkpoint) against load + save and `kanc convert`.

For each model it writes a Hugging Face ``save_pretrained`` folder with random weights from a config, tensor by
tensor (the model is never materialised), then times three child processes on it, each with its peak RSS
(``os.wait4``): the baseline ``from_pretrained`` + ``save_pretrained``; ``kanc convert DIR --target T`` (which streams
a save_pretrained folder since issue 15; before, it held the whole model); and ``kanc.convert_checkpoint`` (layer by
layer, in Python). The streamed output is then checked with
``kanc.checkpoint.compare_checkpoints``: a forward on a few tokens, layer by layer, against the original.

    python benchmarks/scale.py                                  # GPT-2 small/medium/large, LLaMA-style 1.1B
    python benchmarks/scale.py --models llama-7b-bf16 --skip kanc-convert
    python benchmarks/scale.py --smoke                          # a tiny 2-layer checkpoint in several shards
    python benchmarks/scale.py --repeat 3                       # three rounds: median walls, per-round ratios

Not a test: it writes GBs (``--workdir``, default a temp folder; removed after each model unless ``--keep``). Big
runs that would not fit in memory are skipped and say so. Timings on a shared machine are noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GPT2 = {"vocab_size": 50257, "n_positions": 1024}
LLAMA_1B = {
    "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
    "num_key_value_heads": 4, "vocab_size": 32000, "max_position_embeddings": 2048,
}  # fmt: skip
LLAMA_7B = {
    "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 32, "vocab_size": 32000, "max_position_embeddings": 4096,
}  # fmt: skip
TINY_LLAMA = {
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
    "num_key_value_heads": 2, "vocab_size": 100, "max_position_embeddings": 64,
}  # fmt: skip
# name -> (transformers class, config kwargs, dtype)
MODELS: dict[str, tuple[str, dict, str]] = {
    "gpt2-small": ("GPT2LMHeadModel", {**GPT2, "n_layer": 12, "n_embd": 768, "n_head": 12}, "float32"),
    "gpt2-medium": ("GPT2LMHeadModel", {**GPT2, "n_layer": 24, "n_embd": 1024, "n_head": 16}, "float32"),
    "gpt2-large": ("GPT2LMHeadModel", {**GPT2, "n_layer": 36, "n_embd": 1280, "n_head": 20}, "float32"),
    "llama-1.1b-fp32": ("LlamaForCausalLM", LLAMA_1B, "float32"),
    "llama-1.1b-bf16": ("LlamaForCausalLM", LLAMA_1B, "bfloat16"),
    "llama-7b-bf16": ("LlamaForCausalLM", LLAMA_7B, "bfloat16"),
    "tiny-llama": ("LlamaForCausalLM", TINY_LLAMA, "float32"),
}
DEFAULT_MODELS = ["gpt2-small", "gpt2-medium", "gpt2-large", "llama-1.1b-fp32", "llama-1.1b-bf16"]
# baseline-synced: the baseline, then its files synced to disk, as kanc's outputs are before they are published
RUNS = ("baseline", "baseline-synced", "kanc-convert", "stream")
# peak memory of each run, GB = a * model size + b, to skip what cannot fit (from issue 15's table)
MEMORY_NEED = {"baseline": (1.2, 1.0), "baseline-synced": (1.2, 1.0), "kanc-convert": (0.0, 0.0), "stream": (0.0, 0.0)}


# ---- building a checkpoint without materialising the model ------------------------------------------------------


def build_checkpoint(name: str, folder: Path, shard_size: str, seed: int = 0) -> dict[str, Any]:
    """A save_pretrained folder of ``name`` with random weights, written tensor by tensor; what it holds."""
    import torch
    import transformers

    from kanc.checkpoint import meta
    from kanc.checkpoint.shards import ShardWriter

    cls_name, kwargs, dtype = MODELS[name]
    cls = getattr(transformers, cls_name)
    config = cls.config_class(**kwargs)
    config.architectures = [cls_name]
    config.dtype = dtype
    model = meta.empty_model(config, cls)
    folder.mkdir(parents=True)
    writer = ShardWriter(folder, shard_size)
    gen = torch.Generator().manual_seed(seed)
    for key, tensor in _saved_tensors(model).items():
        writer.add(key, _random_like(key, tensor, getattr(torch, dtype), config, gen))
    writer.finish()
    config.save_pretrained(folder)
    return {"params": sum(t.numel() for t in _saved_tensors(model).values()), "dtype": dtype}


def _saved_tensors(model) -> dict:
    """What save_pretrained writes: the state_dict without the tied copies (lm_head tied to the embedding)."""
    tied = model.get_expanded_tied_weights_keys(all_submodels=True) if model.config.tie_word_embeddings else {}
    return {k: v for k, v in model.state_dict().items() if k not in tied}


def _random_like(key: str, like, dtype, config, gen):
    import torch

    if like.dim() == 1 and ("norm" in key or "ln_" in key) and key.endswith("weight"):
        t = 1 + 0.02 * torch.randn(like.shape, generator=gen)
    else:
        t = torch.randn(like.shape, generator=gen) * getattr(config, "initializer_range", 0.02)
    return t.to(dtype if like.is_floating_point() else like.dtype)


# ---- the runs, each in a child process -------------------------------------------------------------------------


def child(run: str, src: str, out: str, target: str, shard_size: str) -> None:
    """What one measured child process does (called with --child)."""
    if run in ("baseline", "baseline-synced"):
        import transformers

        config = transformers.AutoConfig.from_pretrained(src)
        cls = getattr(transformers, config.architectures[0])
        model = cls.from_pretrained(src, dtype="auto")
        model.save_pretrained(out, max_shard_size=shard_size)
        if run == "baseline-synced":
            from kanc.writing import _sync  # kanc's own fsync of an output folder (8 ms to import after torch)

            _sync(Path(out))
    elif run == "stream":
        import kanc

        report = kanc.convert_checkpoint(src, out, target=target, max_shard_size=shard_size)
        print(json.dumps({"worst_layer_error": max(report.fidelity["layers"].values())}))
    else:
        raise SystemExit(f"unknown run {run}")


def measure(cmd: list[str], timeout: float) -> dict[str, Any]:
    """Wall time, peak RSS (``_with_rusage``) and the JSON lines a child process printed."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        stdout, stderr = proc.communicate()
    result: dict[str, Any] = {"wall_s": round(time.perf_counter() - start, 2), "rc": proc.returncode}
    if proc.returncode != 0:
        result["error"] = (stderr.strip().splitlines() or ["?"])[-1][:300]
    for line in stdout.splitlines():
        if line.startswith("{"):
            result.update(json.loads(line))
    return result


def main() -> None:
    args = _args()
    if args.child:
        child(*args.child)
        return
    work = Path(args.workdir or tempfile.mkdtemp(prefix="kanc-scale-"))
    results = {"environment": _environment(args), "models": []}
    for name in args.models:
        results["models"].append(bench_model(name, work / name, args))
        _write(results, args.out)
        _print_row(results["models"][-1])
    if not args.workdir and not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    print(f"results: {args.out}")


def bench_model(name: str, folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    from kanc.checkpoint.shards import CheckpointReader

    src = folder / "src"
    shutil.rmtree(folder, ignore_errors=True)
    start = time.perf_counter()
    info = build_checkpoint(name, src, args.source_shard_size)
    reader = CheckpointReader(src)
    row: dict[str, Any] = {
        "model": name, **info, "build_s": round(time.perf_counter() - start, 1),
        "size_gb": reader.nbytes() / 1e9, "largest_shard_gb": reader.largest_shard() / 1e9,
        "shards": len(reader.files), "layer_gb": _largest_layer(reader) / 1e9,
        "load_average": os.getloadavg()[0],  # other users' work slows every run: say how busy the machine was
    }  # fmt: skip
    row["uptime"] = _output(["uptime"])
    rounds: dict[str, list[dict[str, Any]]] = {run: [] for run in RUNS if run not in args.skip}
    for run in RUNS:
        if run in args.skip:
            row[run] = {"skipped": "--skip"}
    for _ in range(args.repeat):  # round by round: a slower stretch of the machine hits every run alike
        for run, done in rounds.items():
            shutil.rmtree(folder / run, ignore_errors=True)
            done.append(_run(run, src, folder / run, args, row))
            if run != "stream":
                shutil.rmtree(folder / run, ignore_errors=True)
    for run, done in rounds.items():
        row[run] = _summary(done)
    for base, key in (("baseline", "paired_ratio"), ("baseline-synced", "paired_ratio_synced")):
        if base not in rounds or args.repeat < 2:
            continue
        for run in rounds:
            ratios = [r["wall_s"] / b["wall_s"] for r, b in zip(rounds[run], rounds[base]) if _ran(r, b)]
            if ratios and not run.startswith("baseline"):
                row[run][key] = round(statistics.median(ratios), 3)
    if row["stream"].get("rc") == 0:
        row["check"] = _check(src, folder / "stream")
    if not args.keep:
        shutil.rmtree(folder, ignore_errors=True)
    return row


def _run(run: str, src: Path, out: Path, args: argparse.Namespace, row: dict) -> dict[str, Any]:
    a, b = MEMORY_NEED[run]
    need = a * row["size_gb"] + b
    avail = _available_gb()
    if need > 0.8 * avail and not args.smoke:
        return {"skipped": f"needs about {need:.1f} GB, {avail:.1f} GB available"}
    if run == "kanc-convert":
        cmd = [sys.executable, "-m", "kanc", "convert", str(src), "--target", args.target, "-o", str(out)]
    else:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", run, str(src), str(out), args.target]
        cmd.append(args.shard_size)
    return measure(_with_rusage(cmd), args.timeout)


def _summary(done: list[dict[str, Any]]) -> dict[str, Any]:
    """One run's rounds as one result: the median wall time (each round's too), the highest peak RSS, the first
    failure; a run skipped for memory says so."""
    if "skipped" in done[0]:
        return done[0]
    out = dict(done[-1])
    if len(done) > 1:
        walls = [r["wall_s"] for r in done]
        out.update(wall_s=round(statistics.median(walls), 2), walls_s=walls)
        out["peak_rss_gb"] = max(r.get("peak_rss_gb", 0.0) for r in done)
        for key in ("user_s", "sys_s"):  # CPU seconds: the median, and each round's
            if all(key in r for r in done):
                out.update(
                    {key: round(statistics.median(r[key] for r in done), 2), f"{key}_rounds": [r[key] for r in done]}
                )
        failed = next((r for r in done if r["rc"] != 0), None)
        if failed is not None:
            out.update(rc=failed["rc"], error=failed.get("error", ""))
    return out


def _ran(*results: dict[str, Any]) -> bool:
    return all(r.get("rc") == 0 and r.get("wall_s") for r in results)


def _with_rusage(cmd: list[str]) -> list[str]:
    """The command run under a tiny Python parent that prints the child's own rusage as the last JSON line: peak RSS,
    and CPU seconds in user space and in the kernel (on this machine's VM, writing a GB into page-cache pages that
    were not in use costs about 2 s of kernel time: the system time says how much of a wall was that)."""
    code = (
        "import json,os,subprocess,sys,resource;p=subprocess.Popen(sys.argv[1:]);"
        "_,s,r=os.wait4(p.pid,0);print(json.dumps({'peak_rss_gb':r.ru_maxrss*1024/1e9,"
        "'user_s':round(r.ru_utime,2),'sys_s':round(r.ru_stime,2)}));"
        "sys.exit(os.waitstatus_to_exitcode(s))"
    )
    return [sys.executable, "-c", code, *cmd]


def _check(src: Path, out: Path) -> dict[str, Any]:
    from kanc.checkpoint import compare_checkpoints

    start = time.perf_counter()
    manifest = json.loads((out / "kanc.json").read_text())
    stream, report = manifest["stream"], manifest["report"]
    result = compare_checkpoints(src, out)
    layers = result["layers"]
    return {
        "seconds": round(time.perf_counter() - start, 1),
        "inputs": result["inputs"],
        "worst_layer_error": max(r["layer_error"] for r in layers),
        "final_drift": layers[-1]["drift"],
        "outside_different": result["outside_different"],
        "manifest_seconds": stream["seconds"],
        "stream_fidelity": report["fidelity"].get("streamed"),  # what the stream itself measured (both modes)
    }


def _largest_layer(reader) -> int:
    """Bytes of the biggest layer (tensors named ``<stack>.<i>.``)."""
    sizes: dict[str, int] = {}
    for key in reader.keys():
        parts = key.split(".")
        digits = [i for i, p in enumerate(parts) if p.isdigit()]
        if digits:
            layer = ".".join(parts[: digits[0] + 1])
            sizes[layer] = sizes.get(layer, 0) + reader.nbytes([key])
    return max(sizes.values(), default=0)


def _available_gb() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 / 1e9
    return float("inf")


def _print_row(row: dict[str, Any]) -> None:
    base = row.get("baseline", {})
    print(f"{row['model']}: {row['size_gb']:.2f} GB on disk, {row['shards']} shard(s), layer {row['layer_gb']:.3f} GB")
    for run in RUNS:
        r = row.get(run, {})
        if "skipped" in r:
            print(f"  {run:<15} skipped: {r['skipped']}")
            continue
        ratio = f" ({r['wall_s'] / base['wall_s']:.2f}x baseline)" if base.get("wall_s") else ""
        if "paired_ratio" in r:
            ratio += f", {r['paired_ratio']:.2f}x paired"
        if "paired_ratio_synced" in r:
            ratio += f", {r['paired_ratio_synced']:.2f}x the synced baseline"
        walls = f" of {', '.join(f'{w:.1f}' for w in r['walls_s'])}" if "walls_s" in r else ""
        peak = r.get("peak_rss_gb")
        cpu = f"  CPU user {r['user_s']:.1f} s, sys {r['sys_s']:.1f} s" if "sys_s" in r else ""
        error = r.get("error", "")
        print(f"  {run:<15} rc {r['rc']}  {r['wall_s']:7.1f} s{walls}{ratio}  peak RSS {peak:.2f} GB{cpu}  {error}")
    if "check" in row:
        c = row["check"]
        print(f"  check: worst layer error {c['worst_layer_error']:.2e}, final drift {c['final_drift']:.2e}")


def _environment(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import transformers

    import kanc

    return {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {_available_gb():.1f} GB available at start",
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "kanc": kanc.__version__},
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "uptime_at_start": _output(["uptime"]),
        "git_commit": _output(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"]),
        "target": args.target,
    }  # fmt: skip


def _output(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _write(results: dict, path: Path) -> None:
    from kanc.writing import write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(results, indent=1) + "\n", force=True)  # kanc's atomic writer; rewritten per model


def _args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=None, help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument("--target", default="grkan", choices=["grkan", "snnk"])
    parser.add_argument("--skip", default="", help=f"comma-separated runs to skip, of {', '.join(RUNS)}")
    parser.add_argument("--source-shard-size", default="5GB", help="shard size of the generated checkpoints")
    parser.add_argument("--shard-size", default="5GB", help="shard size of the converted and re-saved outputs")
    parser.add_argument("--workdir", default=None, help="where the checkpoints go (default: a temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints")
    parser.add_argument("--timeout", type=float, default=7200, help="seconds per run")
    parser.add_argument(
        "--repeat", type=int, default=1, help="rounds of the runs, one after another (median wall; per-round ratios)"
    )
    parser.add_argument("--out", type=Path, default=None, help="JSON path")
    parser.add_argument("--smoke", action="store_true", help="a tiny 2-layer checkpoint in several shards")
    parser.add_argument("--child", nargs=5, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smoke:
        args.models = args.models or "tiny-llama"
        args.source_shard_size = args.shard_size = "40KB"
    args.models = args.models.split(",") if args.models else DEFAULT_MODELS
    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        parser.error(f"unknown models {unknown}; known: {', '.join(MODELS)}")
    args.skip = [s for s in args.skip.split(",") if s]
    default_out = Path(tempfile.gettempdir()) / "kanc-bench" / "scale_smoke.json"
    args.out = args.out or (default_out if args.smoke else ROOT / "benchmarks" / "results" / "scale_cpu.json")
    return args


if __name__ == "__main__":
    main()
