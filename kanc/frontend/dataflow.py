"""Dataflow across module boundaries, held in a networkx graph.

Inside a traced part, fx gives the dataflow. Between parts (children of a module that did not trace), it is
read from the parent's source: ``h = self.a(x); y = self.b(h, x)`` says that a's output flows only into b's
first argument when ``self.a`` is called once and ``h`` is read once. That is what lets a block split over
two modules (BERT's intermediate/output) be converted without crossing a residual: the residual
(``x`` above) is another argument, never the hidden activation. ``dataflow_graph`` joins both views into one
networkx DiGraph, which ``kanc inspect --graph`` writes as GraphML or DOT.
"""

from __future__ import annotations

import ast
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache

import networkx as nx
from torch import fx, nn

from kanc.frontend.source import class_methods, self_attr, self_calls
from kanc.frontend.tracing import Trace, TracedPart


@dataclass(frozen=True)
class Flow:
    """``self.<producer>(...)``'s result flows only into positional argument ``arg`` of ``self.<consumer>(...)``."""

    producer: str
    consumer: str
    arg: int


def child_flows(module: nn.Module) -> tuple[Flow, ...]:
    """Flows between the children of ``module`` read from its class's source (empty if the source is unavailable)."""
    return _class_flows(type(module))


@lru_cache(maxsize=256)
def _class_flows(cls: type) -> tuple[Flow, ...]:
    functions = class_methods(cls)
    calls = Counter(name for fn in functions for name, _ in self_calls(fn))
    flows = {flow for fn in functions for flow in _function_flows(fn)}
    return tuple(sorted((f for f in flows if calls[f.producer] == 1), key=lambda f: (f.producer, f.consumer)))


def _function_flows(fn: ast.FunctionDef) -> set[Flow]:
    flows: set[Flow] = set()
    loads = Counter(n.id for n in ast.walk(fn) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load))
    stores = Counter(n.id for n in ast.walk(fn) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store))
    produced: dict[str, str] = {}  # variable -> producer child
    for node in ast.walk(fn):
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            producer = self_attr(node.value.func) if isinstance(node.value, ast.Call) else None
            if producer:
                produced[node.targets[0].id] = producer
    for consumer, call in self_calls(fn):
        for i, arg in enumerate(call.args):
            if isinstance(arg, ast.Call) and (producer := self_attr(arg.func)):
                flows.add(Flow(producer, consumer, i))
            elif isinstance(arg, ast.Name) and arg.id in produced and loads[arg.id] == 1 and stores[arg.id] == 1:
                flows.add(Flow(produced[arg.id], consumer, i))
    return flows


# ---- the networkx view ---------------------------------------------------------------------------------------


def node_id(part: TracedPart, node: fx.Node) -> str:
    return f"{'<recorded>' if part.recorded else part.path or '<root>'}::{node.name}"


def _placeholders(part: TracedPart) -> list[fx.Node]:
    return [n for n in part.graph_module.graph.nodes if n.op == "placeholder"]


def _output(part: TracedPart) -> fx.Node:
    return next(n for n in part.graph_module.graph.nodes if n.op == "output")


def dataflow_graph(trace: Trace) -> nx.DiGraph:
    """One DiGraph for the model: fx nodes of every traced part, joined by the flows between sibling parts."""
    g = nx.DiGraph()
    for part in trace.parts:
        _add_part(g, part)
    for failure in trace.failures:
        _add_flows(g, trace, failure.path)
    return g


def _add_part(g: nx.DiGraph, part: TracedPart) -> None:
    modules = dict(part.graph_module.named_modules())
    for node in part.graph_module.graph.nodes:
        attrs = {"part": part.path, "op": node.op, "target": _target_text(node)}
        if node.op == "call_module":
            attrs["module"] = part.absolute(str(node.target))
            attrs["module_type"] = type(modules[node.target]).__name__
        g.add_node(node_id(part, node), **attrs)
        for user in node.users:
            g.add_edge(node_id(part, node), node_id(part, user), kind="fx")


def _target_text(node: fx.Node) -> str:
    target = node.target
    if isinstance(target, str):
        return target
    return getattr(target, "__qualname__", None) or getattr(target, "__name__", None) or str(target)


def _add_flows(g: nx.DiGraph, trace: Trace, parent_path: str) -> None:
    parent = trace.model.get_submodule(parent_path) if parent_path else trace.model
    for flow in child_flows(parent):
        src = trace.part(_join(parent_path, flow.producer))
        dst = trace.part(_join(parent_path, flow.consumer))
        if src is None or dst is None:
            continue
        inputs = _placeholders(dst)
        if flow.arg < len(inputs):
            g.add_edge(node_id(src, _output(src)), node_id(dst, inputs[flow.arg]), kind="module", arg=flow.arg)


def _join(parent: str, child: str) -> str:
    return f"{parent}.{child}" if parent else child


def sole_consumer(g: nx.DiGraph, part: TracedPart) -> str | None:
    """The one graph node fed by ``part``'s output across a module boundary, if there is exactly one."""
    succ = list(g.successors(node_id(part, _output(part))))
    return succ[0] if len(succ) == 1 else None


def write_graph(g: nx.DiGraph, path: str) -> None:
    """Write GraphML (``.graphml``) or Graphviz DOT (``.dot``/``.gv``), without pydot."""
    if path.endswith(".graphml"):
        nx.write_graphml(_stringified(g), path)
    elif path.endswith((".dot", ".gv")):
        with open(path, "w") as f:
            f.write(to_dot(g))
    else:
        raise ValueError(f"graph file must end in .graphml or .dot, got {path}")


def _stringified(g: nx.DiGraph) -> nx.DiGraph:
    out = nx.DiGraph()
    for n, attrs in g.nodes(data=True):
        out.add_node(n, **{k: str(v) for k, v in attrs.items()})
    for a, b, attrs in g.edges(data=True):
        out.add_edge(a, b, **{k: str(v) for k, v in attrs.items()})
    return out


def _quote(text: str) -> str:
    return '"' + str(text).replace("\\", "\\\\").replace('"', '\\"') + '"'


def to_dot(g: nx.DiGraph) -> str:
    """DOT text: one cluster per part, blocks coloured, module-boundary edges dashed."""
    lines = ["digraph kanc {", "  rankdir=TB;", "  node [shape=box, fontsize=10];"]
    parts: dict[str, list[str]] = {}
    for n, attrs in g.nodes(data=True):
        parts.setdefault(attrs.get("part", ""), []).append(n)
    for i, (part, nodes) in enumerate(sorted(parts.items())):
        lines.append(f"  subgraph cluster_{i} {{ label={_quote(part or '<root>')};")
        for n in nodes:
            attrs = g.nodes[n]
            label = attrs.get("module") or attrs.get("target", n)
            style = f", style=filled, fillcolor={_quote('#cde7ff')}" if attrs.get("block") else ""
            lines.append(f"    {_quote(n)} [label={_quote(label)}{style}];")
        lines.append("  }")
    for a, b, attrs in g.edges(data=True):
        style = " [style=dashed]" if attrs.get("kind") == "module" else ""
        lines.append(f"  {_quote(a)} -> {_quote(b)}{style};")
    lines.append("}")
    return "\n".join(lines) + "\n"
