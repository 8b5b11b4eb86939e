"""The rewrite passes: ``rewrite_to_grkan`` and ``rewrite_to_snnk``, over the blocks ``find_mlp_blocks`` found.

Both run the same three steps: build each block's rewrite from its table row (fits happen here, once), apply
the graph edits owner by owner (deepest first, each owner traced afresh and its nodes mapped), then the
module swaps. Each converted block is measured at once against the original block on rows (the user's
calibration inputs when given, else synthetic N(0, 1)).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from kanc.frontend.recording import site_of
from kanc.numerics import rel_error
from kanc.passes import calibrate
from kanc.passes.builders import GRKANOptions, Rewrite, RewriteContext, SNNKOptions
from kanc.passes.callsite import PatchCall, SetAttr, function_edit, install_patches
from kanc.passes.checks import Miss, MLPBlock, node_scope
from kanc.passes.find import ROOT, FindResult, Skip, find_mlp_blocks
from kanc.passes.surgery import (
    DropNode,
    Edit,
    NodeMap,
    ReplaceNode,
    ReplaceSpan,
    SetModule,
    apply_node_edit,
    finish_graph,
    get_module,
    graph_safe,
    lca,
    map_edit,
    retrace_owner,
    set_module,
    swap_module,
)
from kanc.passes.table import pattern

EVAL_ROWS = 512
CODE_EDIT_MISSES = ("owner_signature", "source_edit")  # refused graph edits a recorded block may do by other means
Progress = Callable[[str, int, int], None]


@dataclass
class ConvertedBlock:
    """One converted block: what it was, what it became, and how close the new block is to the old one."""

    name: str
    pattern: str
    target: str
    shape: str
    activation: str
    mode: str  # "swap" (modules replaced, code kept) or "graph" (its owner replaced by an edited GraphModule)
    owner: str
    params_before: int
    params_after: int
    error: float | None  # relative error vs the original block on ``error_inputs`` (None: not measured)
    error_inputs: str
    notes: list[str] = field(default_factory=list)
    options: dict = field(default_factory=dict)
    block: MLPBlock | None = field(default=None, repr=False)
    replacement: Callable[[Tensor], Tensor] | None = field(default=None, repr=False)
    entry: nn.Module | None = field(default=None, repr=False)  # hooked on the converted model to measure the block
    exit: nn.Module | None = field(default=None, repr=False)
    reference: Callable[[Tensor], Tensor] | None = field(default=None, repr=False)  # the original block on rows
    sites: list = field(default_factory=list, repr=False)  # FusionSites for fuse_rationals (GR-KAN)

    def as_dict(self) -> dict:
        keys = ("name", "pattern", "target", "shape", "activation", "mode", "owner", "params_before", "params_after")
        info = {k: getattr(self, k) for k in keys}
        info.update(error=self.error, error_inputs=self.error_inputs, notes=list(self.notes), options=self.options)
        return info


@dataclass
class PassResult:
    """What a rewrite pass did. ``model`` is the converted model (a new object only if its root was replaced)."""

    model: nn.Module
    target: str
    converted: list[ConvertedBlock] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    counters: Counter = field(default_factory=Counter)
    touched: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0


def rewrite_to_grkan(
    model: nn.Module,
    found: FindResult | None = None,
    *,
    calibration: Any = None,
    progress: Progress | None = None,
    measure: bool = True,
    **options: Any,
) -> PassResult:
    """Rewrite every found block into GR-KAN layers, in place (see GRKANOptions for ``options``).

    Before: ``found`` is ``find_mlp_blocks(model)`` (computed when None). After: plain/split blocks are
    GRKANLinear(identity) -> GRKANLinear(rational fitted to the activation) with the activation gone; gated
    blocks have their activation replaced by a fitted GroupRational; counters ``converted:grkan`` and
    ``skip:<code>`` say what happened to each block.
    """
    return _rewrite(model, found, "grkan", GRKANOptions(**options), calibration, progress, measure)


def rewrite_to_snnk(
    model: nn.Module,
    found: FindResult | None = None,
    *,
    calibration: Any = None,
    progress: Progress | None = None,
    measure: bool = True,
    **options: Any,
) -> PassResult:
    """Rewrite every found block into the bundled SNNK form, in place (see SNNKOptions for ``options``).

    ``calibration``: model inputs; each block's preserve fit then uses the rows that block really sees (topped up
    with Gaussian rows of the same per-channel mean and std when there are few), else synthetic N(0, 1) rows.
    """
    return _rewrite(model, found, "snnk", SNNKOptions(**options), calibration, progress, measure)


def _rewrite(
    model: nn.Module,
    found: FindResult | None,
    target: str,
    opts: Any,
    calibration: Any,
    progress: Progress | None,
    measure: bool,
) -> PassResult:
    start = time.perf_counter()
    found = found if found is not None else find_mlp_blocks(model)
    result = PassResult(model, target, skipped=list(found.skipped), counters=Counter(found.counters))
    if not found.blocks:
        if found.converted:
            layers = ", ".join(f"{n} x{c}" for n, c in sorted(found.converted.items()))
            result.notes.append(f"already converted ({layers}): nothing to do, the model is unchanged")
            result.counters["already_converted"] += 1
        return result
    ctx = RewriteContext(measure=measure, reads=found.weights_read)
    if calibration is not None:
        ctx.calibration, ctx.evaluation = _split_rows(calibrate.capture_block_inputs(model, found.blocks, calibration))
    with calibrate.eval_mode(model):  # fits and measurements see the eval-mode block (dropout off)
        planned = _plan(found, target, opts, ctx, result, progress)
    _apply(result, planned)
    for converted, _ in planned:
        result.converted.append(converted)
    result.counters[f"converted:{target}"] = len(result.converted)
    result.seconds = time.perf_counter() - start
    return result


def _split_rows(rows: dict) -> tuple[dict, dict]:
    """80% of each block's real rows for fitting, 20% held out for measuring (all for both when very few)."""
    fit, held = {}, {}
    for key, r in rows.items():
        cut = int(r.shape[0] * 0.8)
        fit[key], held[key] = (r[:cut], r[cut:]) if r.shape[0] >= 10 else (r, r)
    return fit, held


# ---- step 1: build -------------------------------------------------------------------------------------------


def _plan(
    found: FindResult, target: str, opts: Any, ctx: RewriteContext, result: PassResult, progress: Progress | None
) -> list[tuple[ConvertedBlock, list[Edit]]]:
    planned = []
    for i, block in enumerate(found.blocks):
        if progress is not None:
            progress(f"{target} {block.name}", i, len(found.blocks))
        ctx.index = i
        outcome = _build(found.model, block, target, opts, ctx)
        alternate = found.alternates.get(block.key)
        if isinstance(outcome, Miss) and outcome.code in CODE_EDIT_MISSES and alternate is not None:
            alternate.name, alternate.owner = block.name, block.owner
            outcome = _build(found.model, alternate, target, opts, ctx)  # the call-site edit of the recorded twin
        if isinstance(outcome, Miss):
            site = site_of(block.act.node)
            result.skipped.append(Skip(block.name, outcome.code, outcome.message, block.pattern, site=site))
            result.counters[f"skip:{outcome.code}"] += 1
            continue
        planned.append(outcome)
    if progress is not None:
        progress(target, len(found.blocks), len(found.blocks))
    return planned


def _build(
    model: nn.Module, block: MLPBlock, target: str, opts: Any, ctx: RewriteContext
) -> tuple[ConvertedBlock, list[Edit]] | Miss:
    topped = _top_up(block, target, opts, ctx)
    rewrite = getattr(pattern(block.pattern), target)(block, opts, ctx)
    if isinstance(rewrite, Miss):
        return rewrite
    normalised = _normalise(model, block, rewrite)
    if isinstance(normalised, Miss):
        return normalised
    edits, mode, owner = normalised
    hooked = rewrite.entry is not None and rewrite.exit is not None
    error, inputs = _measure(block, rewrite.replacement, ctx) if ctx.measure or not hooked else (None, "")
    notes = list(rewrite.notes)
    if block.fc1.part.source:
        notes.append(f"read from the source of {type(block.fc1.part.module).__name__}.forward (it does not trace)")
    if block.fc1.part.recorded:
        notes.append("found on a recorded run of the model (the module holding it does not trace)")
    if topped:
        notes.append("few calibration rows: topped up with Gaussian rows of the same mean and std")
    info = ConvertedBlock(
        block.name, block.pattern, target, block.shape_text(), block.act.spec.name, mode, owner,
        *_param_counts(block, rewrite, target), error, inputs, notes, {**rewrite.options}, block, rewrite.replacement,
        rewrite.entry, rewrite.exit, block.reference(_reference_dtype(block)), rewrite.sites,
    )  # fmt: skip
    return info, edits


def _reference_dtype(block: MLPBlock) -> torch.dtype:
    return torch.promote_types(block.fc1.weights.weight.dtype, torch.float32)


def _top_up(block: MLPBlock, target: str, opts: Any, ctx: RewriteContext) -> bool:
    """SNNK's ridge fit wants >= 4 rows per feature: add Gaussian rows shaped like the real ones when short."""
    if target != "snnk" or opts.init != "preserve" or block.key not in ctx.calibration:
        return False
    m = opts.features_for(block.hidden)
    rows = ctx.calibration[block.key]
    width = 2 * m if opts.kind == "cos" else m
    ctx.calibration[block.key] = calibrate.top_up(rows, max(4 * width, 1024), seed=int(opts.seed) + ctx.index)
    return rows.shape[0] < ctx.calibration[block.key].shape[0]


def _param_counts(block: MLPBlock, rewrite: Rewrite, target: str) -> tuple[int, int]:
    before = sum(lin.weights.weight.numel() + _numel(lin.weights.bias) for lin in block.linears())
    after = sum(p.numel() for m in rewrite.modules for p in m.parameters())
    if target == "grkan":
        after += before  # the linear layers stay (fused or not); the rationals are new (fc1's: see fuse_rationals)
    return before, after


def _numel(t: Tensor | None) -> int:
    return t.numel() if t is not None else 0


def _normalise(model: nn.Module, block: MLPBlock, rewrite: Rewrite) -> tuple[list[Edit], str, str] | Miss:
    """Turn node edits on activation modules into swaps; whatever node edits remain need the owner's graph."""
    edits: list[Edit] = []
    for edit in rewrite.edits:
        act = block.act
        if isinstance(edit, DropNode | ReplaceNode) and edit.node is act.node and act.path and not act.shared:
            edits.append(SetModule(block.act.path, nn.Identity() if isinstance(edit, DropNode) else edit.module))
        else:
            edits.append(edit)
    node_edits = [e for e in edits if not isinstance(e, SetModule)]
    if not node_edits:
        return edits, "swap", ""
    if block.fc1.part.recorded:
        return _code_edits(model, block, edits)
    if block.calls > 1:
        return Miss("shared_module", f"the block runs {block.calls} times in one graph: its rewrite needs an edit of "
                    "each call, and only module swaps change them all")  # fmt: skip
    if block.fc1.part.source:
        where = f"{type(block.fc1.part.module).__name__}.forward"
        return Miss("source_edit", f"the block was read from the source of {where}, which does not trace: "
                    "only module swaps are possible and this rewrite needs a code edit")  # fmt: skip
    if block.fc1.part.aten:
        return edits, "graph", ""
    part = block.act.part if block.split is not None else block.fc1.part
    nodes = [n for e in node_edits for n in (e.nodes if isinstance(e, ReplaceSpan) else [e.node])]
    owner = lca([node_scope(part, n) for n in nodes])
    reason = graph_safe(get_module(model, owner))
    if reason is not None:
        return Miss("owner_signature", f"cannot rewrite {owner or ROOT} as a graph: {reason}")
    return edits, "graph", owner


def _code_edits(model: nn.Module, block: MLPBlock, edits: list[Edit]) -> tuple[list[Edit], str, str] | Miss:
    """A block found in a recorded execution: its function activation is swapped as an attribute, or its one call
    site is rewritten (kanc.passes.callsite); nothing else of the model's code changes."""
    paths = {id(m): p for p, m in model.named_modules(remove_duplicate=False)}
    out: list[Edit] = []
    modes = set()
    for edit in edits:
        if isinstance(edit, SetModule):
            out.append(edit)
            continue
        if isinstance(edit, ReplaceSpan) or edit.node.op != "call_function":
            where = edit.node.meta.get("call_site") or "its module"
            return Miss("source_edit", f"{where}: an activation written as arithmetic or a method call in a module "
                        "that does not trace is not rewritten (only a function call or attribute is)")  # fmt: skip
        module = edit.module if isinstance(edit, ReplaceNode) else None
        found = function_edit(edit.node, module, paths)
        if isinstance(found, str):
            return Miss("source_edit", f"cannot rewrite the call of {edit.node.target.__name__}: {found}")
        modes.add("attribute" if isinstance(found, SetAttr) else "call site")
        out.append(found)
    return out, "+".join(sorted(modes)) or "swap", ""


def _measure(
    block: MLPBlock, replacement: Callable[[Tensor], Tensor] | None, ctx: RewriteContext
) -> tuple[float | None, str]:
    if replacement is None:
        return None, "not measured: fc2 also reads features from outside the block"
    weight = block.fc1.weights.weight
    if weight.is_meta:
        return None, "not measured: no weights yet (built on the meta device)"
    rows = ctx.evaluation.get(block.key) if block.rowwise else None
    label = "held-out calibration rows" if rows is not None else f"{EVAL_ROWS} synthetic N(0,1) rows"
    if not block.rowwise:
        label += " at the activation's input"
    if rows is None:
        rows = calibrate.synthetic_rows(block.reference_width, EVAL_ROWS, seed=12345, device=weight.device)
    with torch.no_grad():
        expected = block.reference()(rows.to(weight.device))
        actual = replacement(rows.to(device=weight.device, dtype=weight.dtype))
    return rel_error(actual, expected), label


# ---- steps 2 and 3: apply ------------------------------------------------------------------------------------


def _apply(result: PassResult, planned: list[tuple[ConvertedBlock, list[Edit]]]) -> None:
    by_owner: dict[str, list[tuple[ConvertedBlock, list[Edit]]]] = {}
    for converted, edits in planned:
        if converted.mode == "graph":
            by_owner.setdefault(converted.owner, []).append((converted, edits))
    for owner in sorted(by_owner, key=lambda p: (-p.count(".") - bool(p), p)):
        _commit_owner(result, owner, by_owner[owner])
    patches: list[PatchCall] = []
    for _, edits in planned:
        for edit in edits:
            if isinstance(edit, SetModule):
                swap_module(result.model, edit.path, edit.module)
                result.touched.append(edit.path.rpartition(".")[0])
            elif isinstance(edit, SetAttr):
                owner = get_module(result.model, edit.path)
                setattr(owner, edit.attr, edit.module.train(owner.training))
            elif isinstance(edit, PatchCall):
                patches.append(edit)
    install_patches(result.model, patches)
    result.touched = sorted(set(result.touched))


def _commit_owner(result: PassResult, owner: str, items: list[tuple[ConvertedBlock, list[Edit]]]) -> None:
    model = result.model
    module = get_module(model, owner)
    gm = retrace_owner(model, owner)
    for converted, edits in items:
        part = converted.block.fc1.part
        nodes = NodeMap(gm, "" if part.aten else part.path, owner) if gm is not part.graph_module else None
        for edit in edits:
            if isinstance(edit, SetModule):
                continue
            apply_node_edit(gm, map_edit(edit, nodes) if nodes is not None else edit)
    finish_graph(gm)
    if gm is not module:
        if owner:
            set_module(model, owner, gm)
        else:
            result.model = gm
    result.touched.append(owner)
