"""The manifest of a conversion: what ``kanc.compile`` keeps on the model it returns, and the JSON ``kanc.save``
writes beside it (``OUT.kanc.json`` beside a file, ``kanc.json`` inside a folder).

A compiled model carries three attributes in its ``__dict__`` (never in its state_dict): the conversion report
(``REPORT_ATTR``), how to rebuild the unconverted architecture (``MANIFEST_ATTR``, see :func:`manifest_source`) and,
for a model loaded from ``.pt2``, the ExportedProgram it came from (``EXPORTED_ATTR``). The manifest file is data,
exactly as untrusted as the model beside it: :func:`read_manifest` validates every field before anyone uses it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from kanc.errors import KancError, one_line
from kanc.frontend.loading import read_json

if TYPE_CHECKING:
    from kanc.passes.report import ConversionReport

MANIFEST_SUFFIX = ".kanc.json"
DIR_MANIFEST = "kanc.json"
MANIFEST_VERSION = 1
SAVE_FORMATS = ("state_dict", "safetensors", "pickle", "pt2", "hf_dir")
MAX_DEGREE = 16  # rational degrees beyond this overflow fp32 powers and only cost memory
_LIMITS = {"groups": (1, 1 << 16), "num_features": (1, 1 << 20), "seed": (0, 2**63 - 1)}

REPORT_ATTR = "_kanc_report"
MANIFEST_ATTR = "_kanc_manifest"
EXPORTED_ATTR = "_kanc_exported"  # the ExportedProgram a .pt2 model came from (re-export keeps its dynamic dims)


# ---- on the model --------------------------------------------------------------------------------------------------


def attach(model: nn.Module, report: ConversionReport, source: dict) -> None:
    """Keep the conversion ``report`` and the architecture ``source`` on ``model`` (for kanc.report and kanc.save)."""
    model.__dict__[REPORT_ATTR] = report
    model.__dict__[MANIFEST_ATTR] = source


def manifest_source(model: nn.Module) -> dict:
    """How to rebuild the unconverted architecture later (kept on the compiled model for kanc.save)."""
    previous = model.__dict__.get(MANIFEST_ATTR) or {}
    if previous:
        return dict(previous)
    source: dict[str, Any] = {"arch": None, "arch_kwargs": {}}
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict") and type(model).__module__.startswith("transformers."):
        source["hf"] = {"class": type(model).__name__, "config": config.to_dict()}
    else:
        source["arch_guess"] = f"{type(model).__module__}:{type(model).__qualname__}"
    return source


def attach_manifest(module: nn.Module, manifest: dict, where: Path) -> None:
    """Put a read (validated) manifest's report and architecture source back on the loaded ``module``."""
    from kanc.passes.report import ConversionReport

    if manifest.get("report"):
        try:
            module.__dict__[REPORT_ATTR] = ConversionReport(**manifest["report"])
        except TypeError as e:
            raise KancError(f"{where} is not a valid kanc manifest: report {one_line(e)}") from None
    module.__dict__[MANIFEST_ATTR] = {k: manifest[k] for k in ("arch", "arch_kwargs", "hf") if k in manifest}


# ---- the file ------------------------------------------------------------------------------------------------------


def manifest_path(path: str | os.PathLike) -> Path:
    """Where the manifest of a model file (or folder) lives."""
    path = Path(path)
    return path / DIR_MANIFEST if path.is_dir() else path.with_name(path.name + MANIFEST_SUFFIX)


def is_kanc_folder(path: Path) -> bool:
    """A folder kanc wrote (it holds a kanc manifest): --force may replace it."""
    return (path / DIR_MANIFEST).is_file()


def make_manifest(model: nn.Module, fmt: str, path: Path, arch: str | None, arch_kwargs: dict | None) -> dict:
    """The manifest of ``model`` saved at ``path`` in ``fmt``."""
    rep = model.__dict__.get(REPORT_ATTR)
    source = dict(model.__dict__.get(MANIFEST_ATTR) or manifest_source(model))
    if arch is not None:
        source.update(arch=arch, arch_kwargs=dict(arch_kwargs or {}))
    return {
        "kanc": {"version": _version(), "manifest": MANIFEST_VERSION},
        "format": fmt,
        "file": path.name,
        "target": rep.target if rep is not None else None,
        "options": rep.options if rep is not None else {},
        "blocks": rep.blocks if rep is not None else [],
        **source,
        "report": rep.as_dict() if rep is not None else None,
    }


def _version() -> str:
    from kanc import __version__

    return __version__


def manifest_text(manifest: dict) -> str:
    """The manifest as the JSON text kanc writes."""
    return json.dumps(manifest, indent=1) + "\n"


def read_manifest(path: str | os.PathLike) -> dict | None:
    """The validated manifest beside (or inside) the model at ``path``, or None when there is none."""
    mpath = manifest_path(path)
    if not mpath.exists():
        return None
    manifest = read_json(mpath, "kanc manifest")
    check_manifest(manifest, mpath)
    return manifest


def check_manifest(manifest: Any, where: Path) -> None:
    """Raise KancError naming the first field of ``manifest`` that is not what kanc writes."""

    def bad(field: str, why: str) -> KancError:
        return KancError(f"{where} is not a valid kanc manifest: {field} {why}")

    if not isinstance(manifest, dict) or "target" not in manifest or "blocks" not in manifest:
        raise KancError(f"{where} is not a kanc manifest (no target/blocks)")
    version = (manifest.get("kanc") or {}).get("manifest") if isinstance(manifest.get("kanc"), dict) else None
    if isinstance(version, int) and version > MANIFEST_VERSION:
        raise bad("version", f"{version} is newer than this kanc reads ({MANIFEST_VERSION}): upgrade kanc")
    if manifest.get("format") not in SAVE_FORMATS:
        raise bad("format", f"must be one of {', '.join(SAVE_FORMATS)}")
    blocks = manifest["blocks"]
    if not isinstance(blocks, list) or not all(isinstance(b, str) for b in blocks):
        raise bad("blocks", "must be a list of block names")
    for key, kind in (("options", dict), ("arch_kwargs", dict), ("hf", dict), ("report", dict), ("arch", str)):
        if manifest.get(key) is not None and not isinstance(manifest[key], kind):
            raise bad(key, f"must be a {'JSON object' if kind is dict else 'string'}")
    check_option_values(manifest.get("options") or {}, lambda field, why: bad(f"options.{field}", why))


def check_option_values(options: dict, bad) -> None:
    """Bounds on conversion options that would otherwise cost unbounded memory or time (``bad(field, why)``)."""
    degrees = options.get("degrees")
    if degrees is not None:
        ok = isinstance(degrees, list | tuple) and len(degrees) == 2 and all(type(d) is int for d in degrees)
        if not ok or not (1 <= degrees[0] <= MAX_DEGREE and 0 <= degrees[1] <= MAX_DEGREE):
            raise bad("degrees", f"must be two integers m in 1..{MAX_DEGREE}, n in 0..{MAX_DEGREE}")
    for name, (lo, hi) in _LIMITS.items():
        value = options.get(name)
        if value is not None and not (type(value) is int and lo <= value <= hi):
            raise bad(name, f"must be an integer in {lo}..{hi}")
