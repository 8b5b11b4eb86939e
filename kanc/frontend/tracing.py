"""Hierarchical torch.fx tracing: the whole model if it traces, else each child on its own, recursively.

Arbitrary models do not trace whole (Hugging Face transformers 5.x do not; neither does data-dependent
Python control flow), so ``trace_hierarchical`` tries the model first and, where ``symbolic_trace`` fails,
records why and descends into the children. Linear-like modules, activation modules and kanc's layers are
leaves (``kanc.frontend.leaves.is_leaf``). A GraphModule of aten ops (``ExportedProgram.module()``) is used
as it is: it is already a graph.
"""

from __future__ import annotations

import inspect
import math
import threading
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from kanc.errors import one_line
from kanc.frontend.leaves import is_leaf, linear_kind
from kanc.frontend.recording import code_site
from kanc.frontend.source import chain_graph, inline_chains
from kanc.text import ellipsize

# torch.fx traces by patching torch.nn.Module.__call__ (and more) for the whole process: a module run on another
# thread while a trace is under way goes through the tracer. Whoever runs modules beside the main thread (the layer
# walk's drift thread, kanc.checkpoint.stream) holds this lock while they run, and every trace holds it.
TRACING = threading.RLock()


class LeafTracer(fx.Tracer):
    """fx.Tracer that keeps linear-like, activation and kanc modules whole (as call_module nodes)."""

    def __init__(self) -> None:
        super().__init__(autowrap_modules=(math,))
        self.record_stack_traces = True  # each node's file:line, which skips name (kanc.frontend.recording.site_of)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return is_leaf(m) or super().is_leaf_module(m, module_qualified_name)


def trace_module(module: nn.Module) -> fx.GraphModule:
    """Trace ``module`` alone with LeafTracer (raises whatever tracing raises)."""
    with TRACING:
        graph = LeafTracer().trace(module)
    name = type(module).__name__
    return fx.GraphModule(module, graph, class_name=name if name.isidentifier() else "GraphModule")


@dataclass
class TracedPart:
    """A module that traced: its path in the model ("" for the root) and its graph.

    ``source`` parts are partial graphs read from the source of a module that did not trace
    (``kanc.frontend.source``): they hold only its inline MLP chains, are never run, and allow only module swaps.
    A ``recorded`` part is the graph of a real execution of the whole model; it allows swaps and call-site edits.
    """

    path: str
    module: nn.Module
    graph_module: fx.GraphModule
    aten: bool = False
    source: bool = False
    recorded: bool = False  # the whole model's recorded execution (kanc.frontend.recording): read, never run
    boundaries: dict = field(default_factory=dict, repr=False)  # recorded: module path -> [(input, output nodes)]

    def absolute(self, relative: str) -> str:
        """Model path of a path relative to this part."""
        if self.aten or not self.path:
            return relative
        return f"{self.path}.{relative}" if relative else self.path


@dataclass
class TraceFailure:
    """A module that did not trace, and why (its children were tried instead)."""

    path: str
    type_name: str
    reason: str
    container: bool = False  # ModuleList / ModuleDict: no forward of its own, nothing to report


@dataclass
class Trace:
    """The model cut into traced parts, plus the failures that made the cut."""

    model: nn.Module
    parts: list[TracedPart] = field(default_factory=list)
    failures: list[TraceFailure] = field(default_factory=list)

    @property
    def aten(self) -> bool:
        return any(p.aten for p in self.parts)

    def part(self, path: str) -> TracedPart | None:
        return next((p for p in self.parts if p.path == path and not p.recorded), None)

    def reasons(self) -> dict[str, str]:
        """path -> why it did not trace (containers left out)."""
        return {f.path: f.reason for f in self.failures if not f.container}


def is_aten_graph(module: nn.Module) -> bool:
    """A GraphModule whose calls are aten OpOverloads (what ExportedProgram.module() returns)."""
    if not isinstance(module, fx.GraphModule):
        return False
    return any(n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload) for n in module.graph.nodes)


def trace_hierarchical(model: nn.Module, read_source: bool = True) -> Trace:
    """Trace ``model`` whole, else its children recursively; leaves and subtrees without linears are not traced.

    ``read_source``: read inline MLP chains from the source of modules that do not trace (not needed when a
    recorded execution sees them)."""
    trace = Trace(model)
    if is_aten_graph(model):
        trace.parts.append(TracedPart("", model, model, aten=True))
        return trace
    _visit(trace, "", model, read_source)
    return trace


def _visit(trace: Trace, path: str, module: nn.Module, read_source: bool) -> None:
    if is_leaf(module) or not _worth_tracing(module):
        return
    try:
        trace.parts.append(TracedPart(path, module, trace_module(module)))
        return
    except Exception as e:  # noqa: BLE001 - any tracing failure means: try the children
        container = isinstance(module, nn.ModuleList | nn.ModuleDict) or type(module).forward is nn.Module.forward
        trace.failures.append(TraceFailure(path, type(module).__name__, _reason(e, module), container))
        chains = [] if container or not read_source else inline_chains(module)
        if chains:
            trace.parts.append(TracedPart(path, module, chain_graph(module, chains), source=True))
    for name, child in module.named_children():
        _visit(trace, f"{path}.{name}" if path else name, child, read_source)


def _worth_tracing(module: nn.Module) -> bool:
    """Has a linear-like descendant: without one there is no MLP block to find."""
    return any(linear_kind(m) is not None for m in module.modules())


def _reason(e: BaseException, module: nn.Module) -> str:
    text = one_line(e)
    wrapper = _varargs_wrapper(module)
    if wrapper is not None and "co_varnames" in text:  # what torch.fx raises, not what it means
        text = f"torch.fx cannot trace the (*args, **kwargs) decorator at {wrapper} ({text.rpartition(': ')[2]})"
    return ellipsize(text, 200, keep="start")


def _varargs_wrapper(module: nn.Module) -> str | None:
    """``file:line`` of a ``functools.wraps`` decorator taking ``(*args, **kwargs)`` around the module's forward.

    torch.fx builds the root's placeholders from the wrapped function's parameters but rewrites the wrapper's code
    object with that many arguments, which fails ("co_varnames is too small"): every Hugging Face forward decorated
    with ``deprecate_kwarg`` meets it (transformers 5)."""
    forward = getattr(type(module), "forward", None)
    flags = getattr(getattr(forward, "__code__", None), "co_flags", 0)
    varargs = flags & (inspect.CO_VARARGS | inspect.CO_VARKEYWORDS)
    if forward is None or inspect.unwrap(forward) is forward or not varargs:
        return None
    return code_site(forward)
