"""``kanc export onnx MODEL -o OUT.onnx``: export a (converted) model to ONNX, verified with onnxruntime."""

from __future__ import annotations

import json
from pathlib import Path

import click

from kanc.cli.common import load_module, random_inputs


@click.group("export")
def export() -> None:
    """Export a model to another runtime's format."""


@export.command("onnx")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="OUT.onnx")
@click.option("--input-shape", "shapes", multiple=True, default=("2,16",), help="Example input shape (repeatable).")
@click.option("--dtype", type=click.Choice(["long", "float"]), default="long", help="Example input dtype.")
@click.option("--vocab", type=int, default=100, help="Token ids are drawn below this (with --dtype long).")
@click.option("--dynamic", default="batch,seq", help="Symbolic axes: batch,seq | batch | none.")
@click.option("--opset", type=int, default=None, help="ONNX opset (default: the exporter's).")
@click.option("--atol", type=float, default=1e-4, help="Max abs difference onnxruntime vs PyTorch.")
@click.option("--trust-pickle", is_flag=True, help="Allow loading a pickled full model (runs code).")
@click.option("--arch", default=None, help="module:Class or file.py:Class when MODEL holds only weights.")
@click.option("--arch-kwargs", default=None, help="JSON object of keyword arguments for --arch.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
def onnx_cmd(
    model: Path,
    out: Path,
    shapes: tuple[str, ...],
    dtype: str,
    vocab: int,
    dynamic: str,
    opset: int | None,
    atol: float,
    trust_pickle: bool,
    arch: str | None,
    arch_kwargs: str | None,
    as_json: bool,
) -> None:
    """Export MODEL to OUT.onnx and check it with onnxruntime at the example shape and a second shape."""
    axes = tuple(a.strip() for a in dynamic.split(",") if a.strip() and a.strip() != "none")
    inputs = random_inputs(shapes, dtype, vocab)
    module = load_module(model, trust_pickle, arch, arch_kwargs)
    from kanc.export import export_onnx

    click.echo(f"exporting {model} -> {out}", err=True)
    result = export_onnx(module, inputs, out, dynamic=axes or None, opset=opset, atol=atol)
    if as_json:
        payload = {"path": str(result.path), "dynamic": list(result.dynamic), "checks": result.checks}
        click.echo(json.dumps({**payload, "max_abs_diff": result.worst}))
        return
    for check in result.checks:
        click.echo(f"shapes {check['shapes']}: max abs diff {max(check['max_abs_diff'].values()):.3g}")
    click.echo(f"wrote {out} (max abs diff {result.worst:.3g} <= atol {atol:g})")
