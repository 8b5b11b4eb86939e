"""``kanc.save`` / ``kanc.load`` (re-exported by ``kanc.api``); the manifest itself is :mod:`kanc.manifest`.

A converted model is saved in a model format (weights, a whole-module pickle, ``.pt2`` or a ``save_pretrained``
folder) plus a JSON manifest: ``OUT.kanc.json`` beside a file, ``kanc.json`` inside a folder. The manifest is data:
it records the target, options and converted blocks, and how to rebuild the unconverted architecture. It is exactly
as untrusted as the model beside it, so ``load`` validates every field, and imports an architecture the manifest
names only when the caller names the same one (``arch=``) or trusts the file (``trust_pickle=True``).

Writing goes through :mod:`kanc.writing` (the model and its manifest are published together, only once both are
complete); reading through :mod:`kanc.frontend.loading`.
"""

from __future__ import annotations

import dataclasses
import glob
import inspect
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kanc.errors import KancError, one_line, printable
from kanc.frontend.loading import (
    arch_to_build,
    build_arch,
    check_hf_config,
    hf_model_class,
    load_model,
    load_weights,
    parse_kwargs,
    read_weights,
)
from kanc.manifest import (  # noqa: F401 - the manifest's names stay importable from kanc.saving
    DIR_MANIFEST,
    EXPORTED_ATTR,
    MANIFEST_SUFFIX,
    MANIFEST_VERSION,
    MAX_DEGREE,
    SAVE_FORMATS,
    attach_manifest,
    check_manifest,
    check_option_values,
    is_kanc_folder,
    make_manifest,
    manifest_path,
    manifest_text,
    read_manifest,
)
from kanc.writing import Output, check_outputs, write_outputs

_NOT_OPTIONS = ("include", "exclude", "discovery_inputs")  # recorded beside the options in the manifest


# ---- save ----------------------------------------------------------------------------------------------------------


def infer_format(path: Path, model: nn.Module) -> str:
    """The save format a path asks for: ``.pt2``, ``.safetensors``, a folder for HF models, else a state_dict."""
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
    force: bool = False,
    protect: Iterable[str | os.PathLike] = (),
) -> Path:
    """Write ``model`` to ``path`` plus a JSON manifest beside it; returns the manifest's path.

    format: "state_dict" (default; torch.save of the weights), "safetensors", "pickle" (the whole module; loading it
    runs code), "pt2" (torch.export; needs ``example_inputs`` unless the model came from a .pt2) or "hf_dir" (a
    save_pretrained folder). ``arch``/``arch_kwargs`` name the unconverted architecture for weights-only formats.
    An existing output is replaced only with ``force``; ``protect``: paths it must never touch (what was read).
    The model and its manifest appear together, atomically, or not at all (see :mod:`kanc.writing`).
    """
    path = Path(path)
    fmt = format or infer_format(path, model)
    if fmt not in SAVE_FORMATS:
        raise KancError(f"unknown format {fmt!r}: use one of {', '.join(SAVE_FORMATS)}")
    manifest = make_manifest(model, fmt, path, arch, arch_kwargs)
    write_outputs(_outputs(model, path, fmt, manifest, example_inputs), inputs=protect, force=force)
    return path / DIR_MANIFEST if fmt == "hf_dir" else manifest_path(path)


def check_save(path: str | os.PathLike, fmt: str, *, protect: Iterable = (), force: bool = False) -> None:
    """The checks ``save`` makes before writing (outputs vs what was read, existing outputs), to fail early."""
    check_outputs(_outputs(None, Path(path), fmt, {}, None), inputs=protect, force=force)


def _outputs(model: Any, path: Path, fmt: str, manifest: dict, example_inputs: Any) -> list[Output]:
    if fmt == "hf_dir":
        return [Output(path, lambda tmp: _write_hf_dir(model, tmp, manifest), True, is_kanc_folder)]
    writer = _WRITERS[fmt]
    text = manifest_text(manifest) if manifest else ""
    return [
        Output(path, lambda tmp: writer(model, tmp, example_inputs)),
        Output(path.with_name(path.name + MANIFEST_SUFFIX), lambda tmp: tmp.write_text(text, encoding="utf-8")),
    ]


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

    torch.export.save(reexport(model, example_inputs, model.__dict__.get(EXPORTED_ATTR)), tmp)


def _write_hf_dir(model: nn.Module, tmp: Path, manifest: dict) -> None:
    if not hasattr(model, "save_pretrained"):
        raise KancError("format 'hf_dir' needs a Hugging Face model (save_pretrained)")
    kwargs: dict[str, Any] = {"safe_serialization": True}
    if "save_original_format" in inspect.signature(model.save_pretrained).parameters:
        # the model's own tensor names, which kanc.load reads: transformers 5 would otherwise save some architectures
        # under their hub names (GPT-NeoX's lm_head as embed_out, ...) and rename them only in its own from_pretrained
        kwargs["save_original_format"] = False
    model.save_pretrained(tmp, **kwargs)
    (tmp / DIR_MANIFEST).write_text(manifest_text(manifest), encoding="utf-8")


_WRITERS = {
    "state_dict": _write_state_dict,
    "safetensors": _write_safetensors,
    "pickle": _write_pickle,
    "pt2": _write_pt2,
}


# ---- load ----------------------------------------------------------------------------------------------------------


def load(
    path: str | os.PathLike,
    trust_pickle: bool = False,
    arch: str | None = None,
    arch_kwargs: dict | str | None = None,
) -> nn.Module:
    """Load a model file; one kanc wrote (weights + manifest) is rebuilt converted.

    Without a manifest this is kanc.frontend.load_model (pickles need ``trust_pickle``, weights need ``arch``).
    With one, weights-only files are loaded into ``arch`` (or, with ``trust_pickle``, the architecture the manifest
    names; a Hugging Face class it names is built from its recorded config) after the recorded conversion is
    re-applied to it; pickles and .pt2 files hold the converted model itself.
    """
    manifest = read_manifest(path)
    if manifest is None:
        return _with_exported(load_model(path, trust_pickle=trust_pickle, arch=arch, arch_kwargs=arch_kwargs))
    path = Path(path)
    if manifest["format"] in ("pickle", "pt2"):
        module = _with_exported(load_model(path, trust_pickle=trust_pickle))
    else:
        weights = read_weights(path)
        base = _base_model(path, manifest, arch, arch_kwargs, trust_pickle)
        module = reapply(base, manifest, manifest_path(path))
        on_meta = any(p.is_meta for p in module.parameters())  # built without memory: the weights are assigned
        load_weights(module, weights, path, "the converted architecture", ignore=_tied_names(module), assign=on_meta)
        if hasattr(module, "tie_weights"):
            module.tie_weights()
        if on_meta:
            _check_materialised(module, path)
    attach_manifest(module, manifest, manifest_path(path))
    return module


def _with_exported(loaded: Any) -> nn.Module:
    if loaded.exported is not None:
        loaded.module.__dict__[EXPORTED_ATTR] = loaded.exported
    return loaded.module


def _base_model(path: Path, manifest: dict, arch: str | None, arch_kwargs: Any, trust: bool) -> nn.Module:
    """The unconverted architecture: the user's ``arch``, else what the manifest records (see ``arch_to_build``)."""
    mpath = manifest_path(path)
    name = arch_to_build(arch, manifest.get("arch"), trust, mpath)
    if name:
        kwargs = parse_kwargs(arch_kwargs if arch_kwargs is not None else manifest.get("arch_kwargs"))
        return build_arch(name, kwargs).eval()
    if manifest.get("hf"):
        return _hf_model(mpath, manifest["hf"], on_meta=_rebuilds_without_running(manifest))
    guess = manifest.get("arch_guess")
    hint = f" (it was {printable(guess)})" if isinstance(guess, str) else ""
    raise KancError(f"{path} holds converted weights: pass --arch package.module:Class to rebuild the model{hint}")


def _rebuilds_without_running(manifest: dict) -> bool:
    """Whether the recorded conversion is found again without running the model (no recorded discovery inputs): the
    model may then be built with its parameters on the meta device and the saved weights assigned, dtype kept."""
    return (manifest.get("options") or {}).get("discovery_inputs") is None


def _check_materialised(module: nn.Module, path: Path) -> None:
    """After assigning the weights to a model built on meta: nothing may be left there (the folder lacks it)."""
    left = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if left:
        raise KancError(f"the weights in {path} do not fit the converted architecture: missing {', '.join(left[:4])}")


def _hf_model(where: Path, hf: dict, on_meta: bool = False) -> nn.Module:
    """A transformers model class the manifest names, built from the config it recorded (library code only); with
    ``on_meta``, its parameters on the meta device (no memory, no random init; buffers stay real)."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise KancError(f"{where} records a Hugging Face model: install transformers to load it") from None
    cls = hf_model_class(hf.get("class"))
    if cls is None:
        raise KancError(f"{where}: transformers has no model class '{printable(str(hf.get('class')))}'")
    check_hf_config(hf.get("config"), where)
    try:
        config = cls.config_class.from_dict(hf["config"])
        if not on_meta:
            return cls(config).eval()
        from kanc.checkpoint.meta import meta_parameters

        with meta_parameters():
            return cls(config).eval()
    except Exception as e:  # noqa: BLE001 - a tampered config fails inside transformers in many ways
        raise KancError(f"{where}: cannot build {cls.__name__} from the recorded config: {one_line(e)}") from None


def reapply(model: nn.Module, manifest: dict, where: Path | None = None) -> nn.Module:
    """Re-apply a recorded conversion to the unconverted ``model`` (structure only: weights are loaded after)."""
    from kanc.api import TARGETS, check_options
    from kanc.passes.calibrate import inputs_from_spec
    from kanc.passes.pipeline import run_pipeline

    where = where or Path("the manifest")
    target = manifest.get("target")
    if target not in TARGETS:
        raise KancError(f"{where} names no known target ('{printable(str(target))}')")
    recorded = manifest.get("options") or {}
    options = {k: v for k, v in recorded.items() if k not in _NOT_OPTIONS}
    spec = recorded.get("discovery_inputs")  # blocks found on a run are found again on inputs of those shapes
    options["init"] = "variance"  # weights are loaded afterwards: skip the fits
    if target == "grkan":
        options["fit"] = "table"
    names = list(manifest["blocks"])
    include = [glob.escape(n) for n in names] or ["\0nothing"]
    opts = dataclasses.asdict(check_options(target, options))
    discovery = inputs_from_spec(spec, where) if spec is not None else None
    try:
        conv = run_pipeline(model, target, include=include, discovery_inputs=discovery, measure=False, **opts)
    except KancError:
        raise
    except Exception as e:  # noqa: BLE001 - recorded options are untrusted data: any failure is one line
        raise KancError(f"{where}: the recorded conversion does not apply: {one_line(e)}") from None
    got = [c.name for c in conv.result.converted]
    if sorted(got) != sorted(names):
        missing = sorted(set(names) - set(got))
        raise KancError(
            f"the architecture does not match the manifest: blocks {', '.join(missing) or got} were not found"
        )
    return conv.model


def _tied_names(module: nn.Module) -> set[str]:
    """Names of parameters that share their tensor with another name (saved once by save_pretrained)."""
    by_id: dict[int, list[str]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return {n for names in by_id.values() if len(names) > 1 for n in names}
