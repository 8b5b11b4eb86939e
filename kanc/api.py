"""kanc's Python interface: ``compile``, ``report``, ``save``, ``load`` (also as ``kanc.compile`` ...), and
``kanc.api.inspect`` (what ``kanc inspect`` lists: the blocks found and skipped, without converting; there is no
top-level ``kanc.inspect``).

import kanc
kan = kanc.compile(model, target="grkan")     # or "snnk"; the original model is left untouched
print(kanc.report(kan))                        # converted, skipped and why, sizes, fidelity
kanc.save(kan, "model_grkan.pt")               # weights + a JSON manifest of the conversion
again = kanc.load("model_grkan.pt")            # rebuilds the architecture, re-applies the conversion
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from kanc.codegen import fallbacks
from kanc.errors import KancError, NoMLPFoundError
from kanc.manifest import (  # noqa: F401 - kanc.api re-exports the manifest's public names too
    DIR_MANIFEST,
    EXPORTED_ATTR,
    MANIFEST_ATTR,
    MANIFEST_SUFFIX,
    MANIFEST_VERSION,
    REPORT_ATTR,
    attach,
    check_option_values,
    make_manifest,
    manifest_path,
    manifest_source,
    read_manifest,
)
from kanc.passes.builders import GRKANOptions, SNNKOptions
from kanc.passes.calibrate import input_spec
from kanc.passes.find import FindResult, find_mlp_blocks
from kanc.passes.hazards import check_copy, copy_model
from kanc.passes.pipeline import REWRITES, run_pipeline
from kanc.passes.report import ConversionReport, build_report, count_params
from kanc.passes.verify import snapshot
from kanc.saving import infer_format, load, reapply, save  # noqa: F401 - kanc.api re-exports save / load

TARGETS = tuple(REWRITES)
OPTIONS = {"grkan": GRKANOptions, "snnk": SNNKOptions}
# the old private names, for branches written before kanc.manifest (no module may import them: test_layering)
_attach, _manifest_source, _REPORT_ATTR, _EXPORTED_ATTR = attach, manifest_source, REPORT_ATTR, EXPORTED_ATTR
_MANIFEST_ATTR = MANIFEST_ATTR


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
    check_option_values(options, lambda name, why: KancError(f"bad option {name!r} for target {target}: {why}"))
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
    exported = model.__dict__.pop(EXPORTED_ATTR, None)  # shared, never deep-copied
    try:
        work = model if inplace else copy_model(model)
    finally:
        if exported is not None:
            model.__dict__[EXPORTED_ATTR] = exported
    if reference is not None and not inplace:
        check_copy(work, inputs, reference.outputs["no_grad"])
    before = count_params(model)
    discovery = inputs if inputs is not None else calibration  # without verification, the fit's run still finds
    conv = run_pipeline(
        work, target, include=include, exclude=exclude, calibration=calibration,
        reference=reference, verify_inputs=inputs, progress=progress, near_misses=near_misses,
        discovery_inputs=discovery if inputs is None else None,
        **dataclasses.asdict(opts),
    )  # fmt: skip
    report = build_report(conv, type(model).__name__, dataclasses.asdict(opts), before)
    report.options.update(include=list(include or []), exclude=list(exclude or []))
    if discovery is not None:  # blocks found on a run of the model are found again on inputs of the same shapes
        report.options["discovery_inputs"] = input_spec(discovery)
    attach(conv.model, report, manifest_source(model))
    if exported is not None:
        conv.model.__dict__[EXPORTED_ATTR] = exported
    return conv.model


def _verify_inputs(model: nn.Module, example_inputs: Any, calibration: Any) -> Any:
    if example_inputs is not None:
        return example_inputs
    if calibration is not None:
        return calibration
    return default_inputs(model)


def default_inputs(model: nn.Module) -> Any:
    """A .pt2 model's example inputs, token ids for a Hugging Face model that takes ``input_ids`` (seeded; the same
    ids as ``decoder_input_ids`` for an encoder-decoder), or None."""
    exported = model.__dict__.get(EXPORTED_ATTR)
    if exported is not None and not exported.example_inputs[1]:
        return tuple(exported.example_inputs[0])
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None)
    if getattr(model, "main_input_name", None) != "input_ids" or not isinstance(vocab, int):
        return None
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2, 16), generator=gen).to(next((p.device for p in model.parameters()), "cpu"))
    if getattr(config, "is_encoder_decoder", False):  # T5 runs its decoder only on decoder ids of its own
        return {"input_ids": ids, "decoder_input_ids": ids}
    return {"input_ids": ids}


def report(model: nn.Module) -> ConversionReport:
    """The conversion report of a model returned by kanc.compile (or loaded by kanc.load)."""
    found = model.__dict__.get(REPORT_ATTR) if isinstance(model, nn.Module) else None
    if found is None:
        raise KancError("this model was not converted by kanc.compile (no conversion report attached)")
    found.fallbacks = fallbacks.summary(fallbacks.of_model(model))  # live: the calls that ran the reference so far
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


def require_blocks(report_: ConversionReport) -> None:
    """Raise NoMLPFoundError (exit 3) when nothing was converted and the model was not already converted."""
    if report_.converted or report_.counters.get("already_converted"):
        return
    reasons = "; ".join(f"{s['name']}: {s['message']}" for s in report_.skipped[:3])
    raise NoMLPFoundError(f"no MLP block found to convert{': ' + reasons if reasons else ''}")
