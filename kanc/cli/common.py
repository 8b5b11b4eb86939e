"""What the commands share: the options that say how to read MODEL, loading it, the paths a command reads (which
its outputs must never touch), and example inputs (kanc.frontend.inputs, the same for every command)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from kanc.errors import KancError

MODEL = click.Path(path_type=Path)


def model_options(f):
    """--trust-pickle, --arch and --arch-kwargs: how to read MODEL (the same for every command)."""
    f = click.option("--arch-kwargs", default=None, help="JSON object of keyword arguments for --arch.")(f)
    f = click.option(
        "--arch", default=None, help="package.module:Class (or file.py:Class) when MODEL holds weights (imports it)."
    )(f)
    return click.option(
        "--trust-pickle",
        is_flag=True,
        help="Trust MODEL (and its manifest): allow pickles and the architecture the manifest names (runs code).",
    )(f)


@dataclass
class Loaded:
    """A model read for a command: the module, the format of its file, and every path read to get it."""

    module: Any
    format: str
    reads: list[Path]
    manifest: dict | None = None


def load_model_file(path: Path, trust_pickle: bool, arch: str | None, arch_kwargs: str | None) -> Loaded:
    """The model at ``path`` (kanc.load: a kanc output with a manifest comes back converted)."""
    from kanc.frontend.loading import detect_format
    from kanc.saving import load, read_manifest

    if not path.exists() and not path.is_symlink():
        raise KancError(f"model file not found: {path}")
    fmt = detect_format(path)
    manifest = read_manifest(path)
    module = load(path, trust_pickle=trust_pickle, arch=arch, arch_kwargs=arch_kwargs)
    if manifest is not None:
        fmt = manifest["format"]
    elif fmt == "state_dict" and arch is None:
        fmt = "pickle"  # load() only returns a module for a weights file when --arch was given
    return Loaded(module, fmt, [p for p in reads_of(path, arch) if p.exists()], manifest)


def reads_of(model: Path, arch: str | None, *files: Path | None) -> list[Path]:
    """Every path a command reads (its outputs must never touch them): the model, its manifest, the --arch file."""
    from kanc.manifest import manifest_path

    return [model, manifest_path(model), *arch_files(arch), *(f for f in files if f is not None)]


def arch_files(arch: str | None) -> list[Path]:
    """The Python file an ``--arch path/file.py:Class`` imports (a path the command reads)."""
    if not arch or ":" not in arch:
        return []
    module = arch.rpartition(":")[0]
    return [Path(module)] if module.endswith(".py") else []


def read_inputs_file(path: Path | None, what: str) -> Any:
    """Model inputs ``torch.save``d at ``path`` (read weights-only), or None."""
    from kanc.frontend.loading import read_inputs

    return None if path is None else read_inputs(path, what)


def example_inputs(module: Any, shapes: Sequence[str], dtype: str | None, vocab: int | None) -> tuple:
    """Seeded example inputs inferred from the model (kanc.frontend.inputs), shaped by ``--input-shape``."""
    from kanc.frontend.inputs import example_inputs as infer

    return infer(module, shapes, dtype, vocab)


def input_dtype_option(*names: str):
    """--input-dtype: token ids or floats for inputs drawn from --input-shape (default: inferred from the model)."""
    from kanc.frontend.inputs import DTYPE_CHOICES

    return click.option(
        *(names or ("--input-dtype",)),
        "input_dtype",
        type=click.Choice(DTYPE_CHOICES),
        default=None,
        help="Example inputs: token ids (long) or floats [default: token ids when the model starts with an "
        "embedding, else floats in the model's dtype].",
    )


def vocab_option(f):
    return click.option(
        "--vocab",
        type=click.IntRange(min=1),
        default=None,
        help="Token ids are drawn below this [default: the model's].",
    )(f)
