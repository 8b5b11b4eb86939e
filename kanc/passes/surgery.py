"""Applying a rewrite: module swaps where the model's own code can stay, graph edits where it cannot.

A rewrite is a list of edits. ``SetModule`` swaps a submodule (the model keeps its classes, its forward code
and its state_dict names). Node edits (``DropNode``, ``ReplaceNode``, ``ReplaceSpan``) change code: they are
applied to the graph of the innermost module that contains the nodes (its "owner"), traced on its own, and
that module is replaced by the edited GraphModule. Only owners whose forward takes plain positional
arguments are rewritten this way: fx would freeze an optional argument's default into the graph.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

from torch import fx, nn

from kanc.errors import KancError
from kanc.frontend.tracing import trace_module


@dataclass
class SetModule:
    path: str  # model path of the module to replace
    module: nn.Module


@dataclass
class DropNode:
    """Remove an elementwise node: its users read its input instead."""

    node: fx.Node


@dataclass
class ReplaceNode:
    """Replace a node with a call of ``module`` on the node's first argument."""

    node: fx.Node
    module: nn.Module
    name: str


@dataclass
class ReplaceSpan:
    """Replace the subgraph ``nodes`` (input ``source`` -> value ``result``) with one call of ``module``, or with
    ``source`` itself when ``module`` is None (an activation region removed)."""

    nodes: list[fx.Node]
    source: fx.Node
    result: fx.Node
    module: nn.Module | None
    name: str


NodeEdit = DropNode | ReplaceNode | ReplaceSpan
Edit = SetModule | NodeEdit


def get_module(model: nn.Module, path: str) -> nn.Module:
    return model.get_submodule(path) if path else model


def set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    """Replace the submodule at ``path`` (not the root)."""
    parent_path, _, name = path.rpartition(".")
    setattr(get_module(model, parent_path), name, module)


def swap_module(model: nn.Module, path: str, module: nn.Module) -> None:
    """Replace the submodule at ``path`` by ``module``, which takes the old one's training flag."""
    module.train(get_module(model, path).training)
    set_module(model, path, module)


def relative(path: str, owner: str) -> str:
    if not owner:
        return path
    if path == owner or not path.startswith(owner + "."):
        raise ValueError(f"{path} is not inside {owner}")
    return path[len(owner) + 1 :]


def graph_safe(module: nn.Module) -> str | None:
    """None if ``module``'s forward can be replaced by its traced graph, else why not."""
    if isinstance(module, fx.GraphModule):
        return None
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return f"the signature of {type(module).__name__}.forward cannot be read"
    for p in params:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.default is not p.empty:
            return (
                f"{type(module).__name__}.forward has an optional argument {p.name!r}; its traced graph would "
                "freeze that argument"
            )
    return None


def lca(paths: list[str]) -> str:
    """Longest common module path of ``paths``."""
    if not paths:
        return ""
    split = [p.split(".") if p else [] for p in paths]
    common = []
    for parts in zip(*split):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    return ".".join(common)


# ---- mapping nodes of one trace to another trace of the owner ------------------------------------------------


class NodeMap:
    """Finds, in a fresh trace of ``owner``, the nodes that correspond to nodes of an earlier trace."""

    def __init__(self, graph_module: fx.GraphModule, old_prefix: str, owner: str) -> None:
        self.gm, self.old_prefix, self.owner = graph_module, old_prefix, owner
        self.by_target = {}
        for n in graph_module.graph.nodes:
            if n.op == "call_module":
                self.by_target.setdefault(n.target, []).append(n)
        self.memo: dict[fx.Node, fx.Node] = {}

    def __call__(self, old: fx.Node) -> fx.Node:
        if old not in self.memo:
            self.memo[old] = self._find(old)
        return self.memo[old]

    def _find(self, old: fx.Node) -> fx.Node:
        candidates = None
        if old.op == "get_attr":
            absolute = f"{self.old_prefix}.{old.target}" if self.old_prefix else old.target
            target = relative(absolute, self.owner)
            found = [n for n in self.gm.graph.nodes if n.op == "get_attr" and n.target == target]
            if found:
                return found[0]
        if old.op == "call_module":
            absolute = f"{self.old_prefix}.{old.target}" if self.old_prefix else old.target
            candidates = self.by_target.get(relative(absolute, self.owner), [])
            if len(candidates) == 1:
                return candidates[0]
        inputs = old.all_input_nodes
        if not inputs:
            raise KancError(f"cannot locate {old.name} in the trace of {self.owner or '<root>'}")
        mapped = [self(a) for a in inputs]  # a module called twice: told apart by what it is called on
        candidates = candidates if candidates is not None else list(mapped[0].users)
        for cand in candidates:
            same = cand.op == old.op and (cand.target == old.target or old.op == "call_module")
            if same and cand.all_input_nodes == mapped and _same_constants(cand, old):
                return cand
        raise KancError(f"cannot locate {old.name} in the trace of {self.owner or '<root>'}")


def _same_constants(a: fx.Node, b: fx.Node) -> bool:
    consts = lambda n: (
        [x for x in n.args if not isinstance(x, fx.Node)],
        {k: v for k, v in n.kwargs.items() if not isinstance(v, fx.Node)},
    )  # noqa: E501
    return consts(a) == consts(b)


def map_edit(edit: NodeEdit, nodes: NodeMap) -> NodeEdit:
    if isinstance(edit, DropNode):
        return DropNode(nodes(edit.node))
    if isinstance(edit, ReplaceNode):
        return ReplaceNode(nodes(edit.node), edit.module, edit.name)
    mapped = [nodes(n) for n in edit.nodes]
    return ReplaceSpan(mapped, _map_source(edit, mapped), nodes(edit.result), edit.module, edit.name)


def _map_source(edit: ReplaceSpan, mapped: list[fx.Node]) -> fx.Node:
    """The span's input in the new trace, found where a span node reads it: the source may lie outside the owner
    (the part's placeholder, or a node of an ancestor's trace), so it is not mapped itself."""
    for old, new in zip(edit.nodes, mapped):
        for i, arg in enumerate(old.args):
            if arg is edit.source:
                return new.args[i]
    raise KancError(f"no node of the span reads {edit.source.name} (internal error)")


# ---- applying edits ------------------------------------------------------------------------------------------


def _unique_name(gm: fx.GraphModule, name: str) -> str:
    taken = {n for n, _ in gm.named_modules()} | {n for n, _ in gm.named_parameters()} | set(dir(gm))
    if name not in taken:
        return name
    i = 1
    while f"{name}_{i}" in taken:
        i += 1
    return f"{name}_{i}"


def apply_node_edit(gm: fx.GraphModule, edit: NodeEdit) -> str | None:
    """Apply one node edit to ``gm``'s graph; returns the name of an added submodule, if any."""
    graph = gm.graph
    if isinstance(edit, DropNode):
        edit.node.replace_all_uses_with(edit.node.args[0])
        graph.erase_node(edit.node)
        return None
    if isinstance(edit, ReplaceSpan) and edit.module is None:
        edit.result.replace_all_uses_with(edit.source)
        _erase_span(graph, edit.nodes)
        return None
    name = _unique_name(gm, edit.name)
    gm.add_submodule(name, edit.module.train(gm.training))
    if isinstance(edit, ReplaceNode):
        with graph.inserting_before(edit.node):
            new = graph.call_module(name, (edit.node.args[0],))
        edit.node.replace_all_uses_with(new)
        graph.erase_node(edit.node)
        return name
    with graph.inserting_before(edit.result):
        new = graph.call_module(name, (edit.source,))
    edit.result.replace_all_uses_with(new)
    _erase_span(graph, edit.nodes)
    return name


def _erase_span(graph: fx.Graph, nodes: list[fx.Node]) -> None:
    for node in reversed(nodes):
        if node.users:
            raise KancError(f"{node.name} is still used after replacing the block (internal error)")
        graph.erase_node(node)


def finish_graph(gm: fx.GraphModule) -> fx.GraphModule:
    """Drop dead parameter reads, lint, recompile, and forget submodules nothing calls any more."""
    for node in list(gm.graph.nodes):
        if node.op == "get_attr" and not node.users:
            gm.graph.erase_node(node)
        elif isinstance(node.type, str):
            node.type = None  # a string annotation (from __future__ import annotations) breaks pickling the module
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    return gm


def retrace_owner(model: nn.Module, owner: str) -> fx.GraphModule:
    """A fresh GraphModule of the module at ``owner``, keeping its training flag."""
    module = get_module(model, owner)
    gm = module if isinstance(module, fx.GraphModule) and _is_flat(module) else trace_module(module)
    gm.train(module.training)
    return gm


def _is_flat(gm: fx.GraphModule) -> bool:
    return any(n.op == "call_function" and type(n.target).__name__ == "OpOverload" for n in gm.graph.nodes)
