"""``find_mlp_blocks``: trace the model hierarchically and match the pattern table around every activation."""

from __future__ import annotations

import fnmatch
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import networkx as nx
import torch
from torch import fx, nn

from kanc.frontend.dataflow import dataflow_graph, node_id
from kanc.frontend.leaves import is_activation_module, is_kanc_layer, linear_kind
from kanc.frontend.recording import module_site, record_execution, site_of
from kanc.frontend.tracing import Trace, TracedPart, is_aten_graph, trace_hierarchical
from kanc.passes.checks import Linear, Miss, MLPBlock, View, describe, metadata_read, walk_to_fc2
from kanc.passes.surgery import lca
from kanc.passes.table import PATTERNS

ROOT = "<root>"


@dataclass
class Skip:
    """Something that looked like (part of) an MLP block and was not converted, and why."""

    name: str
    code: str
    message: str
    pattern: str | None = None
    scope: str = field(default="", repr=False)  # the module whose code holds the activation
    site: str | None = None  # file:line (function) of the code the skip is about
    near_miss: bool = field(default=False, repr=False)  # about something that is not an MLP block (see near_miss)

    def as_dict(self) -> dict:
        info = {"name": self.name, "code": self.code, "message": self.message, "pattern": self.pattern}
        return {**info, "site": self.site}

    def line(self) -> str:
        """``name: [code] message (at site)``, as reports print it."""
        return f"{self.name}: [{self.code}] {self.message}" + (f" (at {self.site})" if self.site else "")


# Activations that gate or squash rather than act in an MLP: SE gates, poolers, GLU-style gates of other layers.
GATE_ACTIVATIONS = ("sigmoid", "hardsigmoid", "tanh", "softmax", "logsigmoid")


def near_miss(code: str, activation: str) -> bool:
    """A skip about something that is not an MLP block, hidden unless asked (``near_misses=True``): an activation
    that feeds a linear layer with none in front (AdaLN modulation, ``linear(silu(emb))``), or a gate-like one that
    feeds none or multiplies something other than a linear's output (an SE gate's sigmoid, a pooler's tanh)."""
    if code == "no_fc1":
        return True
    gate_like = activation.split("(")[0].lower() in GATE_ACTIVATIONS  # a module class name: Hardsigmoid
    return code in ("no_fc2", "ends_module", "hidden_reused", "gate_partner") and gate_like


@dataclass
class FindResult:
    """The blocks found (after include/exclude), the skips with reasons, and hit/skip counters.

    ``counters`` keys: ``found:<pattern>`` per matched block, ``skip:<code>`` per skip. ``converted`` counts kanc
    layers already in the model (a converted model has no blocks left to find).
    """

    model: nn.Module
    trace: Trace
    graph: nx.DiGraph
    blocks: list[MLPBlock] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    counters: Counter = field(default_factory=Counter)
    near_misses: list[Skip] = field(default_factory=list)  # skips about things that are not MLP blocks (hidden)
    converted: Counter = field(default_factory=Counter)
    alternates: dict = field(default_factory=dict)  # block key -> the same block found in the recorded execution
    untraced: dict[str, str] = field(default_factory=dict)  # path -> why: modules that did not trace and hide linears

    def block(self, name: str) -> MLPBlock:
        return next(b for b in self.blocks if b.name == name)

    def weights_read(self, lin: Linear, values: bool = False, kept: tuple[str, ...] = ()) -> str | None:
        """Where code other than the layer itself reads ``lin``'s weight or bias (in a traced graph or the recorded
        run: PyTorch's fused paths, open_clip's ``get_weight_dtype``), or None. With ``values``, only reads of the
        values count (a read of the dtype, device or shape is no obstacle to a layer that keeps its weight); reads
        of the weight's metadata named in ``kept`` never count (what a stand-in answers the same: KeepsDtype)."""
        if lin.module is None:  # an aten.linear: its parameters' other readers in the graph
            for arg in lin.node.args[1:3]:
                others = [u for u in getattr(arg, "users", ()) if u is not lin.node]
                if others:
                    return f"{arg.target} is also read by {others[0].name}"
            return None
        names = {f"{lin.path}.weight", f"{lin.path}.bias"}
        for part in self.trace.parts:
            for node in part.graph_module.graph.nodes:
                if node.op != "get_attr" or part.absolute(str(node.target)) not in names:
                    continue
                here = kept if part.absolute(str(node.target)).endswith(".weight") else ()  # a stand-in has no bias
                readers = [u for u in node.users if not ((values and _harmless(lin, u)) or metadata_read(u) in here)]
                if readers:
                    site = next((site for u in readers if (site := site_of(u))), None)
                    return f"{part.absolute(str(node.target))} is read at {site or part.path or ROOT}"
        return None

    def as_dict(self) -> dict:
        return {
            "blocks": [block_info(b) for b in self.blocks],
            "skipped": [s.as_dict() for s in self.skipped],
            "counters": dict(sorted(self.counters.items())),
            "already_converted": dict(self.converted),
            "not_traced": dict(self.untraced),
        }


def _harmless(lin: Linear, reader: fx.Node) -> bool:
    """A read a fused layer answers the same: its weight's dtype or device (and shape, unless stored transposed)."""
    attr = metadata_read(reader)
    return attr is not None and not (lin.kind == "conv1d" and attr in ("shape", "size"))


def block_info(block: MLPBlock) -> dict:
    info = {
        "name": block.name,
        "pattern": block.pattern,
        "fc1": block.fc1.path,
        "fc2": block.fc2.path,
        "activation": block.act.spec.name,
        "in_features": block.in_features,
        "hidden": block.hidden,
        "out_features": block.out_features,
        "shape": block.shape_text(),
    }
    if block.up is not None:
        info["up"] = block.up.path
    if block.between:
        info["between"] = [p.kind for p in block.between]
    return info


def find_mlp_blocks(
    model: nn.Module,
    *,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
    inputs: Any = None,
    near_misses: bool = False,
) -> FindResult:
    """Find every MLP block of ``model`` (no change to the model).

    Before: any nn.Module (or an aten-level GraphModule from ``ExportedProgram.module()``).
    After: ``blocks`` in graph order, each named by its owner module; every near miss, every class of modules that
    did not trace and left linear layers unexamined (one skip per class and reason) and every block left out by
    ``include``/``exclude`` is a counted skip naming its file:line. Skips about things that are not MLP blocks
    (AdaLN modulation, SE gates, poolers: see ``near_miss``) are counted as ``near_miss:<code>`` and kept in
    ``near_misses``; listed too with ``near_misses``, as are modules that did not trace but hide nothing
    (``trace_note``: their linear layers ran in the recorded run, or they have none), which are never counted.

    With ``inputs`` the model also runs once on them, recorded (kanc.frontend.recording): blocks inside modules
    that do not trace are found on what really ran; where a module traced, its symbolic graph is used.
    """
    trace = trace_hierarchical(model, read_source=inputs is None or is_aten_graph(model))
    if inputs is not None and not trace.aten:
        trace.parts.append(_recorded_part(model, inputs))
    result = FindResult(model, trace, dataflow_graph(trace))
    aliased = _aliased(model)
    traced = [p.path for p in trace.parts if not (p.recorded or p.source)]
    recorded = FindResult(model, trace, result.graph)
    for part in trace.parts:
        view = View(part, trace, result.graph, aliased)
        into, hits = recorded if part.recorded else result, []
        for node in list(part.graph_module.graph.nodes):
            act = view.act(node)
            if act is not None:
                _match(view, act, into, hits)
        _group_calls(view, hits, into)
    _merge_recorded(result, recorded, traced)
    _name_blocks(result)
    _skip_untraced(result)
    _skip_stacked_experts(result)
    _filter(result, include, exclude)
    _set_near_misses(result, near_misses)
    result.converted = Counter(type(m).__name__ for m in model.modules() if is_kanc_layer(m))
    for block in result.blocks:
        result.counters[f"found:{block.pattern}"] += 1
    for skip in result.skipped:
        if not trace_note(skip):
            result.counters[f"skip:{skip.code}"] += 1
    for skip in result.near_misses:
        if not trace_note(skip):
            result.counters[f"near_miss:{skip.code}"] += 1
    return result


def _set_near_misses(result: FindResult, listed: bool) -> None:
    hidden = [s for s in result.skipped if s.near_miss]
    result.near_misses = hidden
    if not listed:
        result.skipped = [s for s in result.skipped if not s.near_miss]


def _recorded_part(model: nn.Module, inputs: Any) -> TracedPart:
    from kanc.passes.calibrate import call_model, does_not_run, eval_mode

    def run() -> Any:
        with torch.no_grad(), eval_mode(model):
            return call_model(model, inputs)

    try:
        recording = record_execution(model, run)
    except Exception as e:  # noqa: BLE001 - the user's model on the user's inputs
        raise does_not_run(e) from None
    return TracedPart("", model, recording.graph_module, recorded=True, boundaries=recording.boundaries)


def _merge_recorded(result: FindResult, recorded: FindResult, traced: list[str]) -> None:
    """Where a module traced and its symbolic graph holds the block, that graph speaks for it (the recorded twin is
    kept as the alternate, used when the symbolic rewrite is refused); elsewhere the recording does: a block only
    the run shows (the symbolic graph hid it behind shape arithmetic) replaces the symbolic skip at its call site."""
    symbolic = {lin.path: b for b in result.blocks for lin in b.linears()}
    for block in recorded.blocks:
        twin = next((symbolic[lin.path] for lin in block.linears() if lin.path in symbolic), None)
        if twin is not None:
            if twin.key[1:] == block.key[1:]:
                result.alternates[twin.key] = block
                if len(twin.chain) == len(block.chain):  # the symbolic graph has no shapes: the run's say
                    twin.chain_rowwise = block.chain_rowwise
            continue
        result.blocks.append(block)
        if _covered(block.owner, traced):
            site = site_of(block.act.node)
            result.skipped = [s for s in result.skipped if s.site is None or s.site != site]
    result.skipped += [s for s in recorded.skipped if not _covered(s.scope, traced)]


def _covered(scope: str, traced: list[str]) -> bool:
    return any(p == "" or scope == p or scope.startswith(p + ".") for p in traced)


def _aliased(model: nn.Module) -> set[int]:
    seen = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    return {k for k, v in seen.items() if v > 1}


def _match(view: View, act, result: FindResult, hits: list[MLPBlock]) -> None:
    best: tuple[Miss, str] | None = None
    for row in PATTERNS:
        outcome = row.check(view, act)
        if isinstance(outcome, MLPBlock):
            outcome.pattern = row.name
            outcome.owner = _owner(view, outcome)
            hits.append(outcome)
            return
        if isinstance(outcome, Miss) and (best is None or outcome.depth > best[0].depth):
            best = (outcome, row.name)
    if best is None:
        best = _half_block(view, act)
    if best is not None:
        scope = view.scope(act.node)
        where = act.path or f"{scope or ROOT}:{act.node.name}"
        miss, row = best
        hidden = near_miss(miss.code, act.spec.name)
        result.skipped.append(Skip(where, miss.code, miss.message, row, scope, site_of(act.node), hidden))


def _group_calls(view: View, hits: list[MLPBlock], result: FindResult) -> None:
    """One block per key. A block whose modules are called k times, each call matched as this same block (one MLP
    module applied twice, DiT's timestep embedder reused for the final layer), is kept once with ``calls = k``;
    a linear layer called more often than its block ran (its other calls do something else) is a shared_module
    skip. An activation module called by other blocks too is marked shared: it is replaced in the graph, not swapped.
    """
    groups: dict[tuple, list[MLPBlock]] = {}
    for block in hits:
        groups.setdefault(block.key, []).append(block)
    for group in groups.values():
        block, k = group[0], len(group)
        counted = [lin.node.target for lin in block.linears() if lin.module is not None]
        other = next((t for t in counted if view.calls[t] != k), None)  # (an activation module may be shared)
        if other is None:
            block.calls = k
            act = view.module(block.act.node)
            block.act.shared = act is not None and (view.calls[block.act.node.target] != k or id(act) in view.aliased)
            result.blocks.append(block)
            continue
        scope = view.scope(block.act.node)
        message = f"{view.part.absolute(str(other))} is called {view.calls[other]} times, the block runs {k}: " \
            "converting it would change the other uses"  # fmt: skip
        name = block.owner or ROOT
        result.skipped.append(Skip(name, "shared_module", message, block.pattern, scope, site_of(block.act.node)))


def _half_block(view: View, act) -> tuple[Miss, str] | None:
    """An activation that feeds a linear layer (fc2) but is not fed by one: an MLP with something else in front
    (SegFormer's Mix-FFN puts a depthwise conv between fc1 and the activation). Reported, never converted."""
    walked = walk_to_fc2(view, act.node, 0)
    if isinstance(walked, Miss):
        return None
    source = act.input
    what = describe(view, source) if isinstance(source, fx.Node) else repr(source)
    message = f"{act.node.name} feeds {walked[0].path} but its input comes from {what}, not from a linear layer"
    return Miss("no_fc1", message), "plain"


def _owner(view: View, block: MLPBlock) -> str:
    if block.split is not None:
        return lca(list(block.split))
    return lca([view.scope(n) for n in block.nodes()])


def _name_blocks(result: FindResult) -> None:
    owners = Counter(b.owner for b in result.blocks)
    for block in result.blocks:
        base = block.owner or ROOT
        if owners[block.owner] > 1 or not block.owner:
            fc1 = block.fc1.path[len(block.owner) + 1 :] if block.owner else block.fc1.path
            block.name = f"{base}/{fc1}" if owners[block.owner] > 1 else base
        else:
            block.name = base
        for node in block.nodes():
            result.graph.nodes[node_id(block.fc1.part, node)]["block"] = block.name


def _skip_untraced(result: FindResult) -> None:
    """Report the modules that did not trace. One whose own linear layers were all examined another way (they ran
    in the recorded run, its inline MLP was read from its source, or it has none: its children were visited one by
    one) hides no block: a trace note, listed only with the near misses. Where linear layers stayed unexamined an
    MLP may hide: one skip per class, reason and place (``model.layers.*.self_attn``) says so, naming every such
    module, and ``untraced`` keeps them."""
    recorded = any(p.recorded for p in result.trace.parts)
    groups: dict[tuple[str, str, str, str], list[tuple[str, nn.Module]]] = {}
    for failure in result.trace.failures:
        if failure.container:
            continue
        module = result.model.get_submodule(failure.path) if failure.path else result.model
        linears = [n for n, c in module.named_children() if linear_kind(c) is not None]
        read = _read_from_source(result.trace, failure.path) | _ran(result.trace, failure.path)
        unread = [n for n in linears if n not in read]
        if not unread:
            message = f"did not trace ({failure.reason}); {_examined(linears, recorded)}"
            note = Skip(failure.path or ROOT, "not_traced", message, site=module_site(module), near_miss=True)
            result.skipped.append(note)
            continue
        message = f"{_unexamined(len(unread), len(linears))} not examined"
        if recorded:
            message += " (they did not run on the example inputs)"
        elif read:
            message += " (its inline MLP was read from its source)"
        key = (failure.type_name, failure.reason, message, _indexless(failure.path))
        groups.setdefault(key, []).append((failure.path, module))
    for (type_name, reason, message, _), members in groups.items():
        paths = [p for p, _ in members]
        result.untraced.update(dict.fromkeys(paths, reason))
        site = module_site(members[0][1])
        if len(members) == 1:
            text = f"did not trace ({reason}); {message}"
        else:
            text = f"{len(paths)} {type_name} modules did not trace ({reason}); in each, {message}: {_listed(paths)}"
        result.skipped.append(Skip(_common_name(paths), "not_traced", text, site=site))


def trace_note(skip: Skip) -> bool:
    """A module that did not trace but hides no block (its linear layers were examined another way): not counted."""
    return skip.code == "not_traced" and skip.near_miss


def _examined(linears: list[str], recorded: bool) -> str:
    if not linears:
        return "it has no linear layer of its own (its children were examined one by one)"
    how = "ran in the recorded run" if recorded else "were read from its source"
    return f"its {len(linears)} linear layer(s) {how}"


def _indexless(path: str) -> str:
    """``model.layers.3.self_attn`` -> ``model.layers.*.self_attn``: the modules one skip speaks for."""
    return ".".join("*" if part.isdigit() else part for part in path.split(".")) if path else ROOT


def _common_name(paths: list[str]) -> str:
    """Paths of one place (``_indexless``) as one name, ``*`` only where their indices differ."""
    columns = zip(*(p.split(".") for p in paths), strict=True)
    return ".".join(c[0] if len(set(c)) == 1 else "*" for c in columns) if paths[0] else ROOT


def _listed(paths: list[str], shown: int = 4) -> str:
    names = [p or ROOT for p in paths]
    more = len(names) - shown
    return ", ".join(names[:shown]) + (f" and {more} more" if more > 0 else "")


def _skip_stacked_experts(result: FindResult) -> None:
    """Mixture-of-experts layers that keep their experts' weights as 3-D parameters (transformers 5's Mixtral,
    Qwen-MoE, ...) have no linear layers to match: say so rather than pass over them in silence."""
    for path, module in result.model.named_modules():
        if _stacked_experts(module):
            message = (
                f"{type(module).__name__} applies its activation to expert weights stacked as 3-D parameters "
                "(a mixture of experts): kanc converts MLPs built from linear layers"
            )
            result.skipped.append(Skip(path or ROOT, "stacked_experts", message, site=module_site(module)))


def _stacked_experts(module: nn.Module) -> bool:
    acts = any(is_activation_module(c) for c in module.children())
    return acts and any(p.dim() == 3 for p in module.parameters(recurse=False))


def _read_from_source(trace: Trace, path: str) -> set[str]:
    """Children of the module at ``path`` that its source-derived part (if any) calls."""
    part = next((p for p in trace.parts if p.source and p.path == path), None)
    if part is None:
        return set()
    return {str(n.target) for n in part.graph_module.graph.nodes if n.op == "call_module"}


def _ran(trace: Trace, path: str) -> set[str]:
    """Children of the module at ``path`` that ran as recorded leaves."""
    part = next((p for p in trace.parts if p.recorded), None)
    if part is None:
        return set()
    prefix = f"{path}." if path else ""
    seen = set()
    for n in part.graph_module.graph.nodes:
        if n.op == "call_module":
            seen.add(str(n.target))
        elif n.op == "get_attr":  # a linear whose weights a function read (attention's out_proj) ran too
            seen.add(str(n.target).rpartition(".")[0])
    return {t[len(prefix) :] for t in seen if t.startswith(prefix) and "." not in t[len(prefix) :]}


def _unexamined(unread: int, total: int) -> str:
    if unread == total:
        return f"its {total} linear layer(s) were"
    return f"{unread} of its {total} linear layers were"


def matches(name: str, globs: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, g) for g in globs)


def _filter(result: FindResult, include: Iterable[str] | None, exclude: Iterable[str] | None) -> None:
    include, exclude = list(include or []), list(exclude or [])
    kept = []
    for block in result.blocks:
        left_out = partial(Skip, block.name, pattern=block.pattern, site=site_of(block.act.node))
        if include and not matches(block.name, include):
            result.skipped.append(left_out("not_included", "not matched by --include"))
        elif exclude and matches(block.name, exclude):
            result.skipped.append(left_out("excluded", "matched by --exclude"))
        else:
            kept.append(block)
    result.blocks = kept
