"""kanc's Python interface: ``compile``, ``report``, ``save``, ``load``, ``inspect``.

import kanc
kan = kanc.compile(model, target="grkan")     # or "snnk"; the original model is left untouched
print(kanc.report(kan))                        # converted, skipped and why, sizes, fidelity
kanc.save(kan, "model_grkan.pt")               # weights + a JSON manifest of the conversion
again = kanc.load("model_grkan.pt")            # rebuilds the architecture, re-applies the conversion
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kanc import __version__
from kanc.errors import KancError, NoMLPFoundError
from kanc.frontend.loading import atomic_write, build_arch, detect_format, load_model
from kanc.passes.builders import GRKANOptions, SNNKOptions
from kanc.passes.calibrate import input_spec, inputs_from_spec
from kanc.passes.find import FindResult, find_mlp_blocks
from kanc.passes.hazards import check_copy, copy_model
from kanc.passes.pipeline import REWRITES, Conversion, run_pipeline
from kanc.passes.report import ConversionReport, build_report, count_params
from kanc.passes.verify import snapshot

TARGETS = tuple(REWRITES)
OPTIONS = {"grkan": GRKANOptions, "snnk": SNNKOptions}
MANIFEST_SUFFIX = ".kanc.json"
DIR_MANIFEST = "kanc.json"
MANIFEST_VERSION = 1
_NOT_OPTIONS = ("include", "exclude", "discovery_inputs")  # recorded beside the options in the manifest
_REPORT_ATTR = "_kanc_report"
_MANIFEST_ATTR = "_kanc_manifest"
_EXPORTED_ATTR = "_kanc_exported"  # the ExportedProgram a .pt2 model came from (re-export keeps its dynamic dims)


# ---- compile / report / inspect ------------------------------------------------------------------------------


def check_options(target: str, options: dict[str, Any]) -> Any:
    """The target's option dataclass built from ``options``; KancError naming a bad option or value."""
    if target not in OPTIONS:
        raise KancError(f"unknown target {target!r}: use one of {', '.join(TARGETS)}")
    cls = OPTIONS[target]
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in options if k not in known]
    if unknown:
        raise KancError(f"unknown option {unknown[0]!r} for target {target}; options: {', '.join(known)}")
    try:
        return cls(**options)
    except (TypeError, ValueError) as e:
        raise KancError(f"bad option for target {target}: {e}") from None


def compile(  # noqa: A001 - kanc.compile mirrors torch.compile
    model: nn.Module,
    target: str = "grkan",
    *,
    inplace: bool = False,
    calibration: Any = None,
    example_inputs: Any = None,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
    verify: bool = True,
    progress: Callable[[str, int, int], None] | None = None,
    near_misses: bool = False,
    **options: Any,
) -> nn.Module:
    """Return ``model`` with its MLP blocks rewritten into GR-KAN (``target="grkan"``) or SNNK (``"snnk"``) layers.

    The result has the same call signature, is trainable, keeps the original's dtype and device, and its
    state_dict round-trips; ``kanc.report(result)`` says what was done. The original is deep-copied unless
    ``inplace``. A model with no block to convert comes back unchanged (the report says why).

    Args:
        calibration: model inputs (a tensor, a tuple of positional tensors, or a dict of keyword tensors) the
            SNNK fit and the GR-KAN rational fit use: each block is fitted on the rows it really sees.
        example_inputs: inputs to measure the converted model's outputs against the original's (default: the
            calibration inputs, or token ids for a Hugging Face model); ``verify=False`` skips the measurement.
        include, exclude: globs over block names (the owning module's path, e.g. ``"*.mlp"``).
        near_misses: also list, as skips, activations around things that are not MLP blocks (AdaLN modulation, SE
            gates, poolers); they are only counted otherwise.
        options: grkan: groups=8, degrees=(5, 4), init="preserve"|"variance", group_policy="adjust"|"skip",
            fit="data"|"table". snnk: num_features=None (hidden/4), feature_ratio=0.25, kind="relu"|"exp"|"cos",
            orthogonal=True, seed=0, init="preserve"|"warm"|"variance", ridge=1e-3.
    """
    opts = check_options(target, options)
    if not isinstance(model, nn.Module):
        raise KancError(f"kanc.compile takes an nn.Module, not {type(model).__name__}")
    inputs = _verify_inputs(model, example_inputs, calibration) if verify else None
    reference = snapshot(model, inputs) if inputs is not None else None
    exported = model.__dict__.pop(_EXPORTED_ATTR, None)  # shared, never deep-copied
    try:
        work = model if inplace else copy_model(model)
    finally:
        if exported is not None:
            model.__dict__[_EXPORTED_ATTR] = exported
    if reference is not None and not inplace:
        check_copy(work, inputs, reference.outputs["no_grad"])
    before = count_params(model)
    conv = run_pipeline(
        work, target, include=include, exclude=exclude, calibration=calibration,
        reference=reference, verify_inputs=inputs, progress=progress, near_misses=near_misses,
        **dataclasses.asdict(opts),
    )  # fmt: skip
    report = build_report(conv, type(model).__name__, dataclasses.asdict(opts), before)
    report.options.update(include=list(include or []), exclude=list(exclude or []))
    if inputs is not None:  # blocks found on a run of the model are found again on inputs of the same shapes
        report.options["discovery_inputs"] = input_spec(inputs)
    _attach(conv.model, report, _manifest_source(model))
    if exported is not None:
        conv.model.__dict__[_EXPORTED_ATTR] = exported
    return conv.model


def _verify_inputs(model: nn.Module, example_inputs: Any, calibration: Any) -> Any:
    if example_inputs is not None:
        return example_inputs
    if calibration is not None:
        return calibration
    return default_inputs(model)


def default_inputs(model: nn.Module) -> Any:
    """A .pt2 model's example inputs, token ids for a Hugging Face model that takes ``input_ids`` (seeded), or None."""
    exported = model.__dict__.get(_EXPORTED_ATTR)
    if exported is not None and not exported.example_inputs[1]:
        return tuple(exported.example_inputs[0])
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None)
    if getattr(model, "main_input_name", None) != "input_ids" or not isinstance(vocab, int):
        return None
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2, 16), generator=gen)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    return {"input_ids": ids.to(device)}


def _attach(model: nn.Module, report: ConversionReport, source: dict) -> None:
    model.__dict__[_REPORT_ATTR] = report
    model.__dict__[_MANIFEST_ATTR] = source


def _manifest_source(model: nn.Module) -> dict:
    """How to rebuild the unconverted architecture later (kept on the compiled model for kanc.save)."""
    previous = model.__dict__.get(_MANIFEST_ATTR) or {}
    if previous:
        return dict(previous)
    source: dict[str, Any] = {"arch": None, "arch_kwargs": {}}
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict") and type(model).__module__.startswith("transformers."):
        source["hf"] = {"class": type(model).__name__, "config": config.to_dict()}
    else:
        source["arch_guess"] = f"{type(model).__module__}:{type(model).__qualname__}"
    return source


def report(model: nn.Module) -> ConversionReport:
    """The conversion report of a model returned by kanc.compile (or loaded by kanc.load)."""
    found = model.__dict__.get(_REPORT_ATTR) if isinstance(model, nn.Module) else None
    if found is None:
        raise KancError("this model was not converted by kanc.compile (no conversion report attached)")
    return found


def inspect(
    model: nn.Module,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
    *,
    example_inputs: Any = None,
    near_misses: bool = False,
) -> FindResult:
    """The MLP blocks kanc would convert and everything it would skip (each with its file:line and reason), without
    changing ``model``. With ``example_inputs`` (default: token ids for a Hugging Face model) the model runs once,
    recorded, as kanc.compile does; ``near_misses`` also lists what is not an MLP block (AdaLN, SE gates, poolers)."""
    inputs = example_inputs if example_inputs is not None else default_inputs(model)
    return find_mlp_blocks(model, include=include, exclude=exclude, inputs=inputs, near_misses=near_misses)


# ---- save / load ---------------------------------------------------------------------------------------------


def manifest_path(path: str | os.PathLike) -> Path:
    """Where the manifest of a model file (or folder) lives."""
    path = Path(path)
    return path / DIR_MANIFEST if path.is_dir() else path.with_name(path.name + MANIFEST_SUFFIX)


def read_manifest(path: str | os.PathLike) -> dict | None:
    mpath = manifest_path(path)
    if not mpath.is_file():
        return None
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, ValueError) as e:
        raise KancError(f"{mpath} is not a valid kanc manifest: {e}") from None
    if not isinstance(manifest, dict) or "target" not in manifest or "blocks" not in manifest:
        raise KancError(f"{mpath} is not a kanc manifest (no target/blocks)")
    return manifest


def infer_format(path: Path, model: nn.Module) -> str:
    suffix = path.suffix.lower()
    if suffix == ".pt2":
        return "pt2"
    if suffix == ".safetensors":
        return "safetensors"
    if suffix == "" and hasattr(model, "save_pretrained"):
        return "hf_dir"
    return "state_dict"


def save(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    format: str | None = None,  # noqa: A002 - the natural name
    arch: str | None = None,
    arch_kwargs: dict | None = None,
    example_inputs: Any = None,
) -> Path:
    """Write ``model`` to ``path`` (atomically) plus a JSON manifest beside it; returns the manifest's path.

    format: "state_dict" (default; torch.save of the weights), "safetensors", "pickle" (the whole module; loading it
    runs code), "pt2" (torch.export; needs ``example_inputs`` unless the model came from a .pt2) or "hf_dir" (a
    save_pretrained folder). ``arch``/``arch_kwargs`` name the unconverted architecture for weights-only formats.
    """
    path = Path(path)
    fmt = format or infer_format(path, model)
    manifest = make_manifest(model, fmt, path, arch, arch_kwargs)
    if fmt not in _WRITERS:
        raise KancError(f"unknown format {fmt!r}: use one of {', '.join(_WRITERS)}")
    writer = _WRITERS[fmt]
    if fmt == "hf_dir":
        atomic_write(path, lambda tmp: _write_hf_dir(model, tmp, manifest), directory=True)
        return path / DIR_MANIFEST
    mpath = manifest_path(path)
    atomic_write(path, lambda tmp: writer(model, tmp, example_inputs))
    try:
        atomic_write(mpath, lambda tmp: tmp.write_text(json.dumps(manifest, indent=1) + "\n"))
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return mpath


def make_manifest(model: nn.Module, fmt: str, path: Path, arch: str | None, arch_kwargs: dict | None) -> dict:
    rep = model.__dict__.get(_REPORT_ATTR)
    source = dict(model.__dict__.get(_MANIFEST_ATTR) or _manifest_source(model))
    if arch is not None:
        source.update(arch=arch, arch_kwargs=dict(arch_kwargs or {}))
    return {
        "kanc": {"version": __version__, "manifest": MANIFEST_VERSION},
        "format": fmt,
        "file": path.name,
        "target": rep.target if rep is not None else None,
        "options": rep.options if rep is not None else {},
        "blocks": rep.blocks if rep is not None else [],
        **source,
        "report": rep.as_dict() if rep is not None else None,
    }


def _state_dict(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def _write_state_dict(model: nn.Module, tmp: Path, example_inputs: Any) -> None:
    torch.save(_state_dict(model), tmp)


def _write_safetensors(model: nn.Module, tmp: Path, example_inputs: Any) -> None:
    from safetensors.torch import save_file

    save_file({k: v.clone() for k, v in _state_dict(model).items()}, str(tmp))  # clone: tied weights share storage


def _write_pickle(model: nn.Module, tmp: Path, example_inputs: Any) -> None:
    torch.save(model, tmp)


def _write_pt2(model: nn.Module, tmp: Path, example_inputs: Any) -> None:
    from kanc.passes.exported import reexport

    torch.export.save(reexport(model, example_inputs, model.__dict__.get(_EXPORTED_ATTR)), tmp)


def _write_hf_dir(model: nn.Module, tmp: Path, manifest: dict) -> None:
    if not hasattr(model, "save_pretrained"):
        raise KancError("format 'hf_dir' needs a Hugging Face model (save_pretrained)")
    model.save_pretrained(tmp, safe_serialization=True)
    (tmp / DIR_MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")


_WRITERS = {
    "state_dict": _write_state_dict,
    "safetensors": _write_safetensors,
    "pickle": _write_pickle,
    "pt2": _write_pt2,
    "hf_dir": None,
}


def load(
    path: str | os.PathLike,
    trust_pickle: bool = False,
    arch: str | None = None,
    arch_kwargs: dict | str | None = None,
) -> nn.Module:
    """Load a model file; one kanc wrote (weights + manifest) is rebuilt converted.

    Without a manifest this is kanc.frontend.load_model (pickles need ``trust_pickle``, weights need ``arch``).
    With one, weights-only files are loaded into ``arch`` (or the architecture the manifest names) after the
    recorded conversion is re-applied to it; pickles and .pt2 files hold the converted model itself.
    """
    manifest = read_manifest(path)
    if manifest is None:
        return _with_exported(load_model(path, trust_pickle=trust_pickle, arch=arch, arch_kwargs=arch_kwargs))
    fmt = detect_format(path)
    if manifest.get("format") in ("pickle", "pt2"):
        module = _with_exported(load_model(path, trust_pickle=trust_pickle))
    else:
        weights = _read_weights(Path(path), fmt)
        base = _base_model(Path(path), manifest, arch, arch_kwargs)
        module = reapply(base, manifest)
        _load_weights(module, weights, path)
    if manifest.get("report"):
        module.__dict__[_REPORT_ATTR] = ConversionReport(**manifest["report"])
    module.__dict__[_MANIFEST_ATTR] = {k: manifest[k] for k in ("arch", "arch_kwargs", "hf") if k in manifest}
    return module


def _with_exported(loaded: Any) -> nn.Module:
    if loaded.exported is not None:
        loaded.module.__dict__[_EXPORTED_ATTR] = loaded.exported
    return loaded.module


def _read_weights(path: Path, fmt: str) -> dict[str, Tensor]:
    if fmt == "hf_dir":
        files = sorted(path.glob("*.safetensors")) or sorted(path.glob("pytorch_model*.bin"))
        if not files:
            raise KancError(f"{path} has no weight files")
        weights: dict[str, Tensor] = {}
        for f in files:
            weights.update(_read_weights(f, detect_format(f)))
        return weights
    if fmt == "safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # noqa: BLE001
            raise KancError(f"{path} is truncated or corrupt ({e})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises several types for bad files
        raise KancError(
            f"{path} is truncated or corrupt ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
        ) from None
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise KancError(f"{path} does not hold a state_dict")
    return obj


def _base_model(path: Path, manifest: dict, arch: str | None, arch_kwargs: Any) -> nn.Module:
    arch = arch or manifest.get("arch")
    if arch:
        kwargs = arch_kwargs if arch_kwargs is not None else manifest.get("arch_kwargs") or {}
        if isinstance(kwargs, str):
            kwargs = json.loads(kwargs) if kwargs else {}
        return build_arch(arch, kwargs).eval()
    hf = manifest.get("hf")
    if hf:
        return _hf_model(path, hf)
    guess = manifest.get("arch_guess")
    hint = f" (it was {guess})" if guess else ""
    raise KancError(f"{path} holds converted weights: pass --arch package.module:Class to rebuild the model{hint}")


def _hf_model(path: Path, hf: dict) -> nn.Module:
    try:
        import transformers
    except ImportError:
        raise KancError(f"{path} holds a Hugging Face model: install transformers to load it") from None
    cls = getattr(transformers, hf["class"], None)
    if cls is None:
        raise KancError(f"transformers has no class {hf['class']!r}")
    config = cls.config_class.from_dict(hf["config"])
    return cls(config).eval()


def reapply(model: nn.Module, manifest: dict) -> nn.Module:
    """Re-apply a recorded conversion to the unconverted ``model`` (structure only: weights are loaded after)."""
    target = manifest.get("target")
    if target not in TARGETS:
        raise KancError(f"the manifest names no known target ({target!r})")
    options = {k: v for k, v in (manifest.get("options") or {}).items() if k not in _NOT_OPTIONS}
    spec = (manifest.get("options") or {}).get("discovery_inputs")
    options["init"] = "variance"  # weights are loaded afterwards: skip the fits
    if target == "grkan":
        options["fit"] = "table"
    names = list(manifest["blocks"])
    include = [glob.escape(n) for n in names] or ["\0nothing"]
    conv: Conversion = run_pipeline(
        model, target, include=include, discovery_inputs=inputs_from_spec(spec) if spec else None,
        **dataclasses.asdict(check_options(target, options)),
    )  # fmt: skip
    got = [c.name for c in conv.result.converted]
    if sorted(got) != sorted(names):
        missing = sorted(set(names) - set(got))
        raise KancError(
            f"the architecture does not match the manifest: blocks {', '.join(missing) or got} were not found"
        )
    return conv.model


def _load_weights(module: nn.Module, weights: dict[str, Tensor], path: Any) -> None:
    result = module.load_state_dict(weights, strict=False)
    tied = _tied_names(module)
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        what = f"missing {missing[:4]}" if missing else f"unexpected {result.unexpected_keys[:4]}"
        raise KancError(f"the weights in {path} do not fit the converted architecture: {what}")
    if hasattr(module, "tie_weights"):
        module.tie_weights()


def _tied_names(module: nn.Module) -> set[str]:
    """Names of parameters that share their tensor with another name (saved once by save_pretrained)."""
    by_id: dict[int, list[str]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return {n for names in by_id.values() if len(names) > 1 for n in names}


def require_blocks(report_: ConversionReport) -> None:
    """Raise NoMLPFoundError (exit 3) when nothing was converted and the model was not already converted."""
    if report_.converted or report_.counters.get("already_converted"):
        return
    reasons = "; ".join(f"{s['name']}: {s['message']}" for s in report_.skipped[:3])
    raise NoMLPFoundError(f"no MLP block found to convert{': ' + reasons if reasons else ''}")
