"""``kanc convert`` and ``kanc inspect``.

    kanc convert model.pt --target grkan [-o OUT] [--groups 8] [--json] [--force]
    kanc convert model.pt --target snnk --features 256 --calibration inputs.pt
    kanc inspect model.pt [--inputs x.pt] [--near-misses] [--json] [--graph blocks.graphml]

convert writes OUT in the input's format plus a JSON manifest (``OUT.kanc.json``, or ``kanc.json`` inside a
folder) through kanc.writing: together and atomically, never into, over, above or below a file it read, replacing an
existing OUT only with --force, and exits 3 when the model has no MLP block to convert. A model that is already
converted is left alone (exit 0, nothing written).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

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
from kanc.errors import CheckFailedError, KancError, UsageError

_OPTION_FLAGS = {"degrees": "--degrees", "groups": "--groups", "num_features": "--features", "seed": "--seed"}


class _Progress:
    """A one-line progress bar on stderr, only when stderr is a terminal."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and sys.stderr.isatty()
        self.start = time.perf_counter()

    def __call__(self, label: str, done: int, total: int) -> None:
        if not self.enabled or total <= 0:
            return
        filled = int(24 * done / total)
        bar = "#" * filled + "." * (24 - filled)
        line = f"\r{label[:40]:<40} [{bar}] {done}/{total} {time.perf_counter() - self.start:5.1f}s"
        sys.stderr.write(line + ("\n" if done >= total else ""))
        sys.stderr.flush()


def _default_output(model: Path, target: str) -> Path:
    if model.is_dir():
        return model.with_name(f"{model.name}_{target}")
    return model.with_name(f"{model.stem}_{target}{model.suffix}")


def _options(target: str, **given: Any) -> dict[str, Any]:
    """Only the options the user gave, parsed and bounded; a bad one is a usage error (exit 2)."""
    from kanc.api import check_options
    from kanc.manifest import check_option_values

    options = {k: v for k, v in given.items() if v is not None}
    if "degrees" in options:
        options["degrees"] = _parse_degrees(options["degrees"])
    check_option_values(options, lambda name, why: UsageError(f"bad {_OPTION_FLAGS[name]}: {why}"))
    try:
        check_options(target, options)
    except KancError as e:
        raise UsageError(str(e)) from None
    return options


def _parse_degrees(text: str) -> tuple[int, int]:
    try:
        m, n = (int(s) for s in text.replace("/", ",").split(","))
    except ValueError:
        raise UsageError(f"bad --degrees {text!r}: expected two integers like 5,4") from None
    return m, n


def _recorded_conversion(model: Path) -> str | None:
    """Why MODEL is already converted, when its kanc manifest records a conversion (then it need not even load)."""
    from kanc.manifest import read_manifest

    manifest = read_manifest(model)
    if manifest and manifest.get("blocks"):
        return f"already converted ({manifest['target']}, recorded in its manifest): nothing written"
    return None


def _kanc_graph(module: Any) -> str | None:
    """Why a graph module is already converted: it calls kanc's ops (a converted model exported on a GPU)."""
    import torch

    for gm in module.modules():
        if isinstance(gm, torch.fx.GraphModule):
            if any(getattr(n.target, "namespace", None) == "kanc" for n in gm.graph.nodes):
                return "already converted (kanc ops in its graph): nothing written"
    return None


@click.command("convert")
@click.argument("model", type=MODEL)
@click.option("--target", "-t", required=True, type=click.Choice(["grkan", "snnk"], case_sensitive=False))
@click.option("-o", "--output", "out", type=MODEL, default=None, help="Output path (default: MODEL_<target>).")
@click.option("--groups", type=int, default=None, help="grkan: rational groups G [default: 8].")
@click.option("--degrees", default=None, help="grkan: numerator,denominator degrees [default: 5,4].")
@click.option(
    "--group-policy",
    type=click.Choice(["adjust", "skip"]),
    default=None,
    help="grkan: when G does not divide a width, use its largest divisor below G, or skip the block.",
)
@click.option(
    "--fit",
    type=click.Choice(["data", "table"]),
    default=None,
    help="grkan: refine each rational on its block's pre-activations, or use the shipped fit.",
)
@click.option(
    "--init",
    type=click.Choice(["preserve", "variance", "warm"]),
    default=None,
    help="preserve (default: same function), variance (fresh init), warm (snnk: W2 Psi(W1)).",
)
@click.option("--features", "-m", "num_features", type=int, default=None, help="snnk: features m [default: hidden/4].")
@click.option(
    "--feature-ratio", type=float, default=None, help="snnk: m = ratio x hidden when --features is not given."
)
@click.option(
    "--kind", type=click.Choice(["relu", "exp", "cos"]), default=None, help="snnk: feature map [default: relu]."
)
@click.option("--orthogonal/--iid", default=None, help="snnk: orthogonal random features [default: orthogonal].")
@click.option("--seed", type=int, default=None, help="snnk: seed of the random projections [default: 0].")
@click.option("--ridge", type=float, default=None, help="snnk: relative ridge of the preserve fit [default: 1e-3].")
@click.option("--include", multiple=True, help="Only blocks whose name matches this glob (repeatable).")
@click.option("--exclude", multiple=True, help="Skip blocks whose name matches this glob (repeatable).")
@click.option(
    "--calibration",
    type=MODEL,
    default=None,
    help="torch.save'd model inputs (tensor, tuple or dict): each block is fitted on what it sees.",
)
@click.option(
    "--inputs",
    type=MODEL,
    default=None,
    help="torch.save'd model inputs to measure the whole model's outputs on (a save_pretrained folder is then loaded "
    "whole, not streamed layer by layer; streaming checks every layer on the calibration tokens).",
)
@click.option(
    "--input-shape",
    "shapes",
    multiple=True,
    help="Measure fidelity on random inputs of this shape (repeatable; loads a save_pretrained folder whole).",
)
@input_dtype_option()
@vocab_option
@model_options
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
@click.option("--force", is_flag=True, help="Replace an existing output (once the new one is complete).")
@click.option(
    "--keep-failed", is_flag=True,
    help="Write the output even when a fidelity check fails (still reported); a streamed checkpoint folder never "
    "writes a layer with non-finite outputs.",
)  # fmt: skip
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def convert(
    model: Path, target: str, out: Path | None, include: tuple[str, ...], exclude: tuple[str, ...],
    calibration: Path | None, inputs: Path | None, shapes: tuple[str, ...], input_dtype: str | None,
    vocab: int | None, trust_pickle: bool, arch: str | None, arch_kwargs: str | None, as_json: bool, force: bool,
    keep_failed: bool, quiet: bool, **given: Any,
) -> None:  # fmt: skip
    """Rewrite the MLP blocks of MODEL into GR-KAN or SNNK layers; write OUT in MODEL's format plus a manifest."""
    import kanc
    from kanc.api import require_blocks
    from kanc.frontend.loading import parse_kwargs
    from kanc.saving import check_save, save

    target = target.lower()
    options = _options(target, **given)
    if inputs is not None and shapes:
        raise UsageError("give either --inputs or --input-shape, not both")
    out = out or _default_output(model, target)
    reads = reads_of(model, arch, calibration, inputs)
    check_save(out, "hf_dir" if model.is_dir() else "state_dict", protect=reads, force=force)  # fail before the work
    done = _recorded_conversion(model)
    if done:
        _finish(as_json, None, model, None, None, None, done)
        return
    calib, example = read_inputs_file(calibration, "calibration"), read_inputs_file(inputs, "inputs")
    whole_because = ""
    if _streams(model, include, exclude, inputs, shapes, arch):
        from kanc.checkpoint.meta import NeedsWeightConversion

        try:
            _convert_checkpoint(model, out, target, calib, force, quiet, as_json, options)
            return
        except NeedsWeightConversion as e:  # raised before any work: load it whole, as from_pretrained converts it
            whole_because = _whole_model_fallback(model, e)
    loaded = load_model_file(model, trust_pickle, arch, arch_kwargs)
    done = _kanc_graph(loaded.module)
    if done:
        _finish(as_json, None, model, None, None, loaded.format, done)
        return
    if shapes:
        example = example_inputs(loaded.module, shapes, input_dtype, vocab)
    # in place: the loaded model is this command's own, and a copy would double the memory
    converted = kanc.compile(
        loaded.module, target, inplace=True, calibration=calib, example_inputs=example, include=include,
        exclude=exclude, progress=_Progress(not quiet), **options,
    )  # fmt: skip
    report = kanc.report(converted)
    require_blocks(report)
    _check_fidelity(report, keep_failed)
    if not report.converted:
        _finish(as_json, report, model, None, None, loaded.format, "already converted: nothing written")
        return
    kwargs = parse_kwargs(arch_kwargs) if arch_kwargs else None
    manifest = save(converted, out, format=loaded.format, arch=arch, arch_kwargs=kwargs, force=force, protect=reads)
    how = f"{loaded.format}{whole_because or _whole_model_note(model, include, exclude, inputs, shapes, arch)}"
    _finish(as_json, report, model, out, manifest, loaded.format, f"wrote {out} ({how}) and {manifest.name}")


def _whole_model_fallback(model: Path, why: Exception) -> str:
    """The note for a folder loaded whole because its tensors need transformers' load-time conversion; an error when
    the whole model would not fit in the memory available."""
    from kanc.checkpoint.shards import CheckpointReader

    need, free = CheckpointReader(model).nbytes(), _available_memory()
    if free is not None and need > 0.8 * free:
        raise KancError(
            f"{why}; loading it whole instead needs about {need / 1e9:.1f} GB, and {free / 1e9:.1f} GB is available"
        )
    click.echo(f"note: {model} is loaded whole, not streamed: {why}", err=True)
    return ", the whole model loaded, not streamed layer by layer: transformers converts its tensors on load"


def _available_memory() -> int | None:
    """MemAvailable from /proc/meminfo in bytes; None where there is no such file."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _whole_model_note(model: Path, include: tuple, exclude: tuple, inputs: Any, shapes: tuple, arch: Any) -> str:
    """Which path a save_pretrained folder took when it was not streamed, and the options that chose it."""
    from kanc.checkpoint.stream import streams

    if not model.is_dir() or not streams(model):
        return ""
    given = [("--include", include), ("--exclude", exclude), ("--inputs", inputs), ("--input-shape", shapes),
             ("--arch", arch)]  # fmt: skip
    flags = ", ".join(flag for flag, value in given if value)
    return f", the whole model loaded, not streamed layer by layer: {flags} need{'s' if ',' not in flags else ''} it"


def _check_fidelity(report: Any, keep_failed: bool) -> None:
    """A failed fidelity check ends the command (exit 1, nothing written) unless --keep-failed."""
    failures = report.failed_checks
    if not failures:
        return
    if keep_failed:
        click.echo(f"warning: {len(failures)} fidelity check(s) failed; writing anyway (--keep-failed)", err=True)
        return
    click.echo(str(report), err=True)
    more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
    raise CheckFailedError(
        f"fidelity check failed: {failures[0]}{more}; nothing written (pass --keep-failed to write the output anyway)"
    )


def _streams(model: Path, include: tuple, exclude: tuple, inputs: Path | None, shapes: tuple, arch: str | None) -> bool:
    """A save_pretrained folder is converted layer by layer (kanc.convert_checkpoint), never loaded whole, unless an
    option needs the whole model (block globs, fidelity inputs, --arch)."""
    from kanc.checkpoint.stream import streams

    return streams(model) and not (include or exclude or inputs or shapes or arch)


def _convert_checkpoint(model: Path, out: Path, target: str, calib: Any, force: bool, quiet: bool, as_json: bool,
                        options: dict) -> None:  # fmt: skip
    import kanc

    report = kanc.convert_checkpoint(
        model, out, target, calibration=calib, force=force, progress=_Progress(not quiet), **options
    )
    manifest = out / "kanc.json"
    line = f"wrote {out} (hf_dir, streamed layer by layer) and {manifest.name}"
    _finish(as_json, report, model, out, manifest, "hf_dir", line)


def _finish(as_json: bool, report: Any, model: Path, out: Path | None, manifest: Path | None, fmt: str | None,
            line: str):  # fmt: skip
    if as_json:
        payload = {
            "input": str(model),
            "output": str(out) if out else None,
            "manifest": str(manifest) if manifest else None,
            "format": fmt,
            "report": report.as_dict() if report is not None else None,
        }
        click.echo(json.dumps(payload, indent=1))
        return
    if report is not None:
        click.echo(str(report))
    click.echo(line)


@click.command("inspect")
@click.argument("model", type=MODEL)
@model_options
@click.option("--include", multiple=True, help="Only blocks whose name matches this glob (repeatable).")
@click.option("--exclude", multiple=True, help="Leave out blocks whose name matches this glob (repeatable).")
@click.option("--graph", "graph_file", type=MODEL, default=None, help="Write the dataflow graph (.graphml or .dot).")
@click.option("--force", is_flag=True, help="Replace an existing --graph file.")
@click.option("--inputs", type=MODEL, default=None, help="torch.save'd model inputs: find blocks on a run.")
@click.option("--near-misses", is_flag=True, help="Also list what is not an MLP block (AdaLN, SE gates, poolers).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
def inspect_cmd(
    model: Path, trust_pickle: bool, arch: str | None, arch_kwargs: str | None, include: tuple[str, ...],
    exclude: tuple[str, ...], graph_file: Path | None, force: bool, inputs: Path | None, near_misses: bool,
    as_json: bool,
) -> None:  # fmt: skip
    """List the MLP blocks kanc finds in MODEL (shapes, patterns) and what it would skip, where and why."""
    from kanc.api import inspect
    from kanc.frontend.dataflow import write_graph
    from kanc.writing import Output, check_outputs, write_file

    if graph_file is not None:
        if not str(graph_file).endswith((".graphml", ".dot", ".gv")):
            raise UsageError(f"--graph must end in .graphml or .dot, got {graph_file}")
        check_outputs([Output(graph_file)], inputs=reads_of(model, arch, inputs), force=force)
    example = read_inputs_file(inputs, "inputs")
    loaded = load_model_file(model, trust_pickle, arch, arch_kwargs)
    found = inspect(loaded.module, include=include, exclude=exclude, example_inputs=example, near_misses=near_misses)
    if graph_file is not None:  # the temporary keeps the suffix: write_graph picks GraphML or DOT from it
        write_file(graph_file, lambda tmp: write_graph(found.graph, str(tmp)), inputs=loaded.reads, force=force)
    if as_json:
        click.echo(json.dumps({"model": str(model), "format": loaded.format, **found.as_dict()}, indent=1))
        return
    click.echo("\n".join(_inspect_lines(model, loaded.format, found)))


def _inspect_lines(model: Path, fmt: str, found: Any) -> list[str]:
    from kanc.text import table

    lines = [f"{model} ({fmt}): {len(found.blocks)} MLP block(s), {len(found.skipped)} skipped"]
    if found.converted:
        layers = ", ".join(f"{n} x{c}" for n, c in sorted(found.converted.items()))
        lines.append(f"already converted: {layers}")
    if found.blocks:
        rows = [[b.name, b.pattern, b.shape_text(), b.act.spec.name, b.fc1.path, b.fc2.path] for b in found.blocks]
        lines += ["", *table(rows, ["block", "pattern", "shape", "act", "fc1", "fc2"])]
    if found.skipped:
        lines += ["", "skipped:"] + [f"  {s.line()}" for s in found.skipped]
    counts = ", ".join(f"{k}={v}" for k, v in sorted(found.counters.items()))
    lines += ["", f"counters: {counts or '-'}"]
    return lines
