"""``kanc export onnx MODEL -o OUT.onnx``: export a (converted) model to ONNX, verified with onnxruntime."""

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
    reads_of,
    vocab_option,
)


@click.group("export")
def export() -> None:
    """Export a model to another runtime's format."""


@export.command("onnx")
@click.argument("model", type=MODEL)
@click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="OUT.onnx")
@click.option("--force", is_flag=True, help="Replace an existing OUT (once the new file is complete and checked).")
@click.option(
    "--input-shape", "shapes", multiple=True, help="Example input shape (repeatable) [default: the model's own]."
)
@input_dtype_option("--input-dtype", "--dtype")
@vocab_option
@click.option("--dynamic", default="batch,seq", help="Symbolic axes: batch,seq | batch | none.")
@click.option("--opset", type=int, default=None, help="ONNX opset (default: the exporter's).")
@click.option("--atol", type=float, default=1e-4, help="Max abs difference onnxruntime vs PyTorch.")
@model_options
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
def onnx_cmd(
    model: Path, out: Path, force: bool, shapes: tuple[str, ...], input_dtype: str | None, vocab: int | None,
    dynamic: str, opset: int | None, atol: float, trust_pickle: bool, arch: str | None, arch_kwargs: str | None,
    as_json: bool,
) -> None:  # fmt: skip
    """Export MODEL to OUT.onnx and check it with onnxruntime at the example shape and a second shape."""
    from kanc.export import export_onnx
    from kanc.writing import Output, check_outputs

    axes = tuple(a.strip() for a in dynamic.split(",") if a.strip() and a.strip() != "none")
    check_outputs([Output(out)], inputs=reads_of(model, arch), force=force)  # before loading: fail fast
    loaded = load_model_file(model, trust_pickle, arch, arch_kwargs)
    inputs = example_inputs(loaded.module, shapes, input_dtype, vocab)
    click.echo(f"exporting {model} -> {out}", err=True)
    result = export_onnx(
        loaded.module, inputs, out, dynamic=axes or None, opset=opset, atol=atol, force=force, protect=loaded.reads
    )
    if result.note:
        click.echo(f"note: {result.note}", err=True)
    if as_json:
        payload = {"path": str(result.path), "dynamic": list(result.dynamic), "checks": result.checks}
        click.echo(json.dumps({**payload, "max_abs_diff": result.worst, "note": result.note}))
        return
    for check in result.checks:
        click.echo(f"shapes {check['shapes']}: max abs diff {max(check['max_abs_diff'].values()):.3g}")
    click.echo(f"wrote {out} (max abs diff {result.worst:.3g} <= atol {atol:g})")
