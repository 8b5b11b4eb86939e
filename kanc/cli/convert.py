"""``kanc convert`` and ``kanc inspect``.

    kanc convert model.pt --target grkan [-o OUT] [--groups 8] [--json] [--force]
    kanc convert model.pt --target snnk --features 256 --calibration inputs.pt
    kanc inspect model.pt [--inputs x.pt] [--near-misses] [--json] [--graph blocks.graphml]

convert writes OUT in the input's format plus a JSON manifest (``OUT.kanc.json``, or ``kanc.json`` inside a
folder), atomically; it never overwrites the input, refuses an existing OUT without --force, and exits 3 when
the model has no MLP block to convert. A model that is already converted is left alone (exit 0, nothing written).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import click

from kanc.cli.common import read_inputs
from kanc.errors import CheckFailedError, KancError

_MODEL = click.Path(path_type=Path)


def _load_options(f):
    f = click.option("--arch-kwargs", default=None, help="JSON object of keyword arguments for --arch.")(f)
    f = click.option("--arch", default=None, help="package.module:Class (or file.py:Class) when MODEL holds weights.")(
        f
    )
    f = click.option("--trust-pickle", is_flag=True, help="Allow loading a pickled whole model (this runs its code).")(
        f
    )
    return f


def _load(model: Path, trust_pickle: bool, arch: str | None, arch_kwargs: str | None) -> tuple[Any, str]:
    """(module, format of the file); a kanc output (with manifest) comes back converted."""
    from kanc.api import load, read_manifest
    from kanc.frontend.loading import detect_format

    fmt = detect_format(model)
    manifest = read_manifest(model)
    module = load(model, trust_pickle=trust_pickle, arch=arch, arch_kwargs=arch_kwargs)
    if manifest is not None:
        return module, manifest.get("format") or fmt
    if fmt == "state_dict" and arch is None:
        fmt = "pickle"  # load() only returns a module for a weights file when --arch was given
    return module, fmt


def _read_inputs(path: Path | None, what: str) -> Any:
    return None if path is None else read_inputs(path, what)


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


def _check_output(model: Path, out: Path, force: bool) -> None:
    from kanc.api import manifest_path

    if out.resolve() == model.resolve() or (model.is_dir() and model.resolve() in out.resolve().parents):
        raise KancError(f"refusing to write into the input {model}: choose another -o")
    existing = [p for p in (out, manifest_path(out)) if p.exists()]
    if existing and not force:
        raise KancError(f"{existing[0]} exists: pass --force to overwrite it")
    if not out.parent.is_dir():
        raise KancError(f"output directory does not exist: {out.parent}")


def _options(target: str, **given: Any) -> dict[str, Any]:
    """Only the options the user gave; check_options says which do not apply to the target."""
    options = {k: v for k, v in given.items() if v is not None}
    if "degrees" in options:
        options["degrees"] = _parse_degrees(options["degrees"])
    return options


def _parse_degrees(text: str) -> tuple[int, int]:
    try:
        m, n = (int(s) for s in text.replace("/", ",").split(","))
    except ValueError:
        raise KancError(f"bad --degrees {text!r}: expected two integers like 5,4") from None
    return m, n


@click.command("convert")
@click.argument("model", type=_MODEL)
@click.option("--target", "-t", required=True, type=click.Choice(["grkan", "snnk"], case_sensitive=False))
@click.option("-o", "--output", "out", type=_MODEL, default=None, help="Output path (default: MODEL_<target>).")
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
    type=_MODEL,
    default=None,
    help="torch.save'd model inputs (tensor, tuple or dict): each block is fitted on what it sees.",
)
@click.option("--inputs", type=_MODEL, default=None, help="torch.save'd model inputs to measure fidelity on.")
@_load_options
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
@click.option("--force", is_flag=True, help="Overwrite an existing output.")
@click.option("--keep-failed", is_flag=True, help="Write the output even when a fidelity check fails (still reported).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def convert(
    model: Path, target: str, out: Path | None, include: tuple[str, ...], exclude: tuple[str, ...],
    calibration: Path | None, inputs: Path | None, trust_pickle: bool, arch: str | None, arch_kwargs: str | None,
    as_json: bool, force: bool, keep_failed: bool, quiet: bool, **given: Any,
) -> None:  # fmt: skip
    """Rewrite the MLP blocks of MODEL into GR-KAN or SNNK layers; write OUT in MODEL's format plus a manifest."""
    import kanc
    from kanc.api import check_options, require_blocks, save

    target = target.lower()
    options = _options(target, **given)
    check_options(target, options)
    out = out or _default_output(model, target)
    _check_output(model, out, force)
    calib, example = _read_inputs(calibration, "calibration"), _read_inputs(inputs, "inputs")
    module, fmt = _load(model, trust_pickle, arch, arch_kwargs)
    progress = _Progress(not quiet)
    converted = kanc.compile(
        module, target, calibration=calib, example_inputs=example, include=include, exclude=exclude,
        progress=progress, **options,
    )  # fmt: skip
    report = kanc.report(converted)
    require_blocks(report)
    _check_fidelity(report, keep_failed)
    if not report.converted:
        _finish(as_json, report, model, None, None, fmt, "already converted: nothing written")
        return
    manifest = save(converted, out, format=fmt, arch=arch, arch_kwargs=json.loads(arch_kwargs) if arch_kwargs else None)
    _finish(as_json, report, model, out, manifest, fmt, f"wrote {out} ({fmt}) and {manifest.name}")


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


def _finish(as_json: bool, report: Any, model: Path, out: Path | None, manifest: Path | None, fmt: str, line: str):
    if as_json:
        payload = {
            "input": str(model),
            "output": str(out) if out else None,
            "manifest": str(manifest) if manifest else None,
            "format": fmt,
            "report": report.as_dict(),
        }
        click.echo(json.dumps(payload, indent=1))
        return
    click.echo(str(report))
    click.echo(line)


@click.command("inspect")
@click.argument("model", type=_MODEL)
@_load_options
@click.option("--include", multiple=True, help="Only blocks whose name matches this glob (repeatable).")
@click.option("--exclude", multiple=True, help="Leave out blocks whose name matches this glob (repeatable).")
@click.option("--graph", "graph_file", type=_MODEL, default=None, help="Write the dataflow graph (.graphml or .dot).")
@click.option("--inputs", type=_MODEL, default=None, help="torch.save'd model inputs: find blocks on a run.")
@click.option("--near-misses", is_flag=True, help="Also list what is not an MLP block (AdaLN, SE gates, poolers).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
def inspect_cmd(
    model: Path, trust_pickle: bool, arch: str | None, arch_kwargs: str | None, include: tuple[str, ...],
    exclude: tuple[str, ...], graph_file: Path | None, inputs: Path | None, near_misses: bool, as_json: bool,
) -> None:  # fmt: skip
    """List the MLP blocks kanc finds in MODEL (shapes, patterns) and what it would skip, where and why."""
    from kanc.api import inspect
    from kanc.frontend.dataflow import write_graph

    if graph_file is not None and not str(graph_file).endswith((".graphml", ".dot", ".gv")):
        raise KancError(f"--graph must end in .graphml or .dot, got {graph_file}")
    example = _read_inputs(inputs, "inputs")
    module, fmt = _load(model, trust_pickle, arch, arch_kwargs)
    found = inspect(module, include=include, exclude=exclude, example_inputs=example, near_misses=near_misses)
    if graph_file is not None:
        from kanc.frontend.loading import atomic_write

        atomic_write(graph_file, lambda tmp: write_graph(found.graph, str(tmp)))
    if as_json:
        click.echo(json.dumps({"model": str(model), "format": fmt, **found.as_dict()}, indent=1))
        return
    click.echo("\n".join(_inspect_lines(model, fmt, found)))


def _inspect_lines(model: Path, fmt: str, found: Any) -> list[str]:
    from kanc.passes.report import _table

    lines = [f"{model} ({fmt}): {len(found.blocks)} MLP block(s), {len(found.skipped)} skipped"]
    if found.converted:
        layers = ", ".join(f"{n} x{c}" for n, c in sorted(found.converted.items()))
        lines.append(f"already converted: {layers}")
    if found.blocks:
        rows = [[b.name, b.pattern, b.shape_text(), b.act.spec.name, b.fc1.path, b.fc2.path] for b in found.blocks]
        lines += ["", *_table(rows, ["block", "pattern", "shape", "act", "fc1", "fc2"])]
    if found.skipped:
        lines += ["", "skipped:"] + [f"  {s.line()}" for s in found.skipped]
    counts = ", ".join(f"{k}={v}" for k, v in sorted(found.counters.items()))
    lines += ["", f"counters: {counts or '-'}"]
    return lines
