"""``kanc profile MODEL`` and ``kanc tune MODEL``: where a model's time goes, and tuning kanc's kernels for it.

kanc profile model.pt --trust-pickle --input-shape 8,197,768 --train -o prof/
kanc tune model.pt --trust-pickle --input-shape 8,197,768 --dtype bfloat16
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from kanc.cli.common import (
    MODEL,
    example_inputs,
    input_dtype_option,
    load_model_file,
    model_options,
    read_inputs_file,
    reads_of,
    vocab_option,
)
from kanc.errors import KancError, UsageError

DTYPES = ("float32", "float16", "bfloat16")


def _example(module, shapes: tuple[str, ...], inputs_file: Path | None, input_dtype: str | None, vocab: int | None):
    """The inputs file, or inputs drawn for the model (floating ones are cast to --dtype with the model)."""
    if inputs_file is not None:
        return read_inputs_file(inputs_file, "inputs")
    return example_inputs(module, shapes, input_dtype, vocab)


def _check_example(shapes: tuple[str, ...], inputs_file: Path | None) -> None:
    if inputs_file is not None and shapes:
        raise UsageError("give either --input-shape or --inputs, not both")


def _device(device: str | None) -> str:
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise KancError("--device cuda but no CUDA GPU is available (use --device cpu)")
    return device


def _dtype(name: str | None):
    import torch

    return getattr(torch, name) if name else None


def _common(fn):
    """The options both commands share: the model file and how to load it, the example inputs, device and dtype."""
    options = [
        click.argument("model", type=MODEL),
        click.option(
            "--input-shape",
            "shapes",
            multiple=True,
            help="Example input shape, e.g. 8,197,768 (repeat for several positional inputs).",
        ),  # fmt: skip
        click.option(
            "--inputs",
            "inputs_file",
            type=click.Path(path_type=Path),
            default=None,
            help="A torch.save'd tensor, tuple/list (positional) or dict (keyword) of inputs.",
        ),  # fmt: skip
        input_dtype_option(),
        vocab_option,
        click.option(
            "--dtype",
            type=click.Choice(DTYPES),
            default=None,
            help="Cast the model and floating inputs to this dtype (default: keep the model's).",
        ),  # fmt: skip
        click.option(
            "--device",
            type=click.Choice(["cuda", "cpu"]),
            default=None,
            help="Where to run (default: cuda when available).",
        ),  # fmt: skip
        click.option("--warmup", type=click.IntRange(min=0), default=3, help="Warm-up steps before measuring."),
        click.option("--iters", type=click.IntRange(min=1), default=10, help="Measured steps."),
        model_options,
        click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


@click.command("profile")
@_common
@click.option("--train", is_flag=True, help="Profile forward and backward (default: forward only).")
@click.option("-o", "--output", "out", type=click.Path(path_type=Path), default=None,
              help="Write report.json, trace.json and report.html into this directory.")  # fmt: skip
@click.option("--stalls", type=click.Choice(["auto", "ncu", "proton", "none"]), default="auto",
              help="Memory-stall counters: Nsight Compute, Triton's proton, or none (GPU only).")  # fmt: skip
@click.option("--rows", type=click.IntRange(min=1), default=15, help="Layers shown in the terminal table.")
@click.option("--force", is_flag=True, help="Replace an earlier kanc report in the -o directory.")
def profile_cmd(model: Path, shapes, inputs_file, input_dtype, vocab, dtype, device, warmup, iters, trust_pickle,
                arch, arch_kwargs, as_json, train, out, stalls, rows, force) -> None:  # fmt: skip
    """Profile MODEL: time per layer and per kernel against the roofline, memory stalls, findings."""
    from kanc.runtime import profile
    from kanc.runtime.report import is_report_dir
    from kanc.writing import Output, check_outputs

    _check_example(shapes, inputs_file)
    device = _device(device)
    reads = reads_of(model, arch, inputs_file)
    if out is not None:
        check_outputs([Output(out, directory=True, replaceable=is_report_dir)], inputs=reads, force=force)
    loaded = load_model_file(model, trust_pickle, arch, arch_kwargs)
    example = _example(loaded.module, shapes, inputs_file, input_dtype, vocab)
    click.echo(f"profiling {model} on {device} ({'train step' if train else 'forward'}, {iters} steps)", err=True)
    report = profile(loaded.module, example, train=train, warmup=warmup, iters=iters, device=device,
                     dtype=_dtype(dtype), stalls=stalls, name=model.stem)  # fmt: skip
    report.model["source"] = str(model)
    if out is not None:
        report.write(out, force=force, protect=reads)
        click.echo(f"wrote {out}/report.json, trace.json, report.html", err=True)
    if as_json:
        click.echo(json.dumps({"output": str(out) if out else None, "report": report.to_json()}))
    else:
        click.echo(report.table(rows))


@click.command("tune")
@_common
@click.option("--train/--no-train", default=True, help="Tune the backward kernels too (forward and backward).")
def tune_cmd(model: Path, shapes, inputs_file, input_dtype, vocab, dtype, device, warmup, iters, trust_pickle,
             arch, arch_kwargs, as_json, train) -> None:  # fmt: skip
    """Autotune every kanc kernel at MODEL's shapes, write the per-device config cache, report before/after."""
    from kanc.runtime import tune

    _check_example(shapes, inputs_file)
    device = _device(device)
    loaded = load_model_file(model, trust_pickle, arch, arch_kwargs)
    example = _example(loaded.module, shapes, inputs_file, input_dtype, vocab)
    click.echo(f"tuning {model} on {device} ({'forward and backward' if train else 'forward'})", err=True)
    result = tune(loaded.module, example, train=train, warmup=warmup, iters=iters, device=device, dtype=_dtype(dtype))
    if not result.entries:
        raise KancError(result.notes[0] if result.notes else "nothing was tuned")
    if as_json:
        click.echo(json.dumps(result.to_json()))
    else:
        click.echo(result.table())
