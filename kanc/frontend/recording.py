"""Discovery that sees what runs: a real execution of the model recorded as an fx graph.

``record_execution(model, inputs)`` runs the model once (eval, no grad) under a ``TorchFunctionMode`` with global
module hooks, and writes every call it sees into an ``fx.Graph`` that the pattern table reads like any trace:

- leaf modules (linear-like, activations, kanc's layers, torch.nn's childless modules such as Dropout and the
  norms) are ``call_module`` nodes targeted by their model path; nothing inside them is recorded;
- every other torch function or tensor method with a tensor result is a ``call_function`` / ``call_method`` node,
  its tensor arguments tied to the nodes that produced them (tensor identity); parameters and buffers are
  ``get_attr`` nodes, anything else a placeholder;
- each node carries ``nn_module_stack`` (as fx writes it), ``call_site`` (the file, line, method and ``self`` of
  the Python frame that made the call, which the call-site rewrite and the skips name) and ``shape`` (of the
  tensor it computed); a call returning several tensors (``x.chunk(2)``) is followed by one getitem node each.

So control flow, optional arguments, nested expressions and wrappers that do not trace no longer hide a block:
only the path the inputs took is seen. The graph is never run (``RecordedGraphModule`` generates no code).
"""

from __future__ import annotations

import inspect
import operator
import os
import re
import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, fx, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from kanc.frontend.leaves import is_leaf

_TORCH_DIR = os.path.dirname(torch.__file__)
_TORCH_MODULES = os.path.join(_TORCH_DIR, "nn", "modules") + os.sep  # torch.nn's own layers are model code
_TORCH_MODULE_PY = os.path.join(_TORCH_MODULES, "module.py")
_KANC_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_DUNDER = {"__getitem__": operator.getitem, "__matmul__": operator.matmul}


@dataclass(frozen=True)
class CallSite:
    """Where a recorded call was made: the first frame outside torch and kanc."""

    filename: str
    lineno: int
    function: str
    code: Any = None  # the frame's code object (which method, exactly)
    owner: Any = None  # the frame's ``self``, when it is a module

    def __str__(self) -> str:
        return f"{_short(self.filename)}:{self.lineno} ({self.function})"


def _short(path: str) -> str:
    marker = f"{os.sep}site-packages{os.sep}"
    if marker in path:
        return path.split(marker, 1)[1]
    return os.path.relpath(path) if path.startswith(os.getcwd()) else path


def site_of(node: fx.Node) -> str | None:
    """``file:line (function)`` of the model code that made ``node``: a recorded call site, or the innermost frame of
    the stack trace fx records while tracing symbolically."""
    site = node.meta.get("call_site")
    if site is not None:
        return str(site)
    frames = [f for f in _FRAME.findall(node.meta.get("stack_trace") or "") if _model_code(f[0])]
    if not frames:
        return None
    filename, lineno, function = frames[-1]
    return f"{_short(filename)}:{lineno} ({function})"


def module_site(module: nn.Module) -> str | None:
    """``file:line (forward)`` of a module class's forward (under its decorators), when its source can be found."""
    forward = getattr(type(module), "forward", None)
    site = code_site(inspect.unwrap(forward)) if forward is not None else None
    return f"{site} ({type(module).__name__}.forward)" if site else None


def code_site(fn: Any) -> str | None:
    """``file:line`` where the Python function ``fn`` is defined (site-packages paths shortened), else None."""
    code = getattr(fn, "__code__", None)
    if code is None or code.co_filename.startswith("<"):
        return None
    return f"{_short(code.co_filename)}:{code.co_firstlineno}"


_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\S+)')


class RecordedGraphModule(fx.GraphModule):
    """The recording as a GraphModule over the model's own modules; it is read, never run (no code generated)."""

    def recompile(self) -> Any:  # noqa: D102 - nothing to generate: the graph is not executable
        return None


def record_leaf(module: nn.Module) -> bool:
    """Recorded as one call_module node: kanc's leaves, and torch.nn's childless modules (Dropout, norms, ...)."""
    if is_leaf(module):
        return True
    torch_nn = type(module).__module__.startswith("torch.nn")
    return torch_nn and next(module.children(), None) is None


class _Recorder(TorchFunctionMode):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.graph = fx.Graph()
        self.paths = {id(m): p for p, m in model.named_modules(remove_duplicate=False)}
        self.params = {id(t): n for n, t in [*model.named_parameters(), *model.named_buffers()]}
        self.values: dict[int, fx.Node] = {}
        self.keep: list[Any] = []  # every recorded tensor stays alive, so ids are never reused
        self.stack: list[nn.Module] = []
        self.leaf_depth = 0
        self.inputs = 0
        self.param_uses: list[tuple[str, fx.Node]] = []
        self.entered: list[list[fx.Node]] = []  # per open module call: the nodes of its tensor arguments
        self.boundaries: dict[str, list[tuple[list[fx.Node], list[fx.Node]]]] = {}
        self.leaves = {id(m): record_leaf(m) for m in model.modules()}  # decided before the mode is on
        self.quiet = False  # kanc's own code is running (a leaf test in a hook): its torch calls are not the model's

    # ---- values ------------------------------------------------------------------------------------------------

    def node_for(self, t: Tensor) -> fx.Node:
        node = self.values.get(id(t))
        if node is not None:
            return node
        name = self.params.get(id(t))
        if name is not None:
            node = self.graph.get_attr(name)
        else:
            node = self.graph.placeholder(f"input_{self.inputs}")
            self.inputs += 1
        self.bind(t, node)
        return node

    def bind(self, value: Any, node: fx.Node) -> None:
        for t in tree_flatten(value)[0]:
            if isinstance(t, Tensor):
                self.values[id(t)] = node
                self.keep.append(t)

    def arg(self, value: Any) -> Any:
        if isinstance(value, Tensor):
            return self.node_for(value)
        if isinstance(value, tuple | list):
            return type(value)(self.arg(v) for v in value)
        if isinstance(value, dict):
            return {k: self.arg(v) for k, v in value.items()}
        return value

    # ---- nodes -------------------------------------------------------------------------------------------------

    def meta(self, node: fx.Node, extra: nn.Module | None = None) -> None:
        stack = [*self.stack, extra] if extra is not None else self.stack
        entries = {}
        for m in stack:
            path = self.paths.get(id(m))
            if path is not None and path:
                entries[path] = (path, type(m))
        node.meta["nn_module_stack"] = entries
        node.meta["call_site"] = call_site()

    def add(self, op: str, target: Any, args: tuple, kwargs: dict, out: Any, module: nn.Module | None = None) -> None:
        node = self.graph.create_node(op, target, self.arg(tuple(args)), self.arg(dict(kwargs)))
        self.meta(node, module)
        for a in tree_flatten((args, kwargs))[0]:
            if isinstance(a, Tensor) and id(a) in self.params:
                self.param_uses.append((self.params[id(a)], node))
        if isinstance(out, tuple | list) and any(isinstance(t, Tensor) for t in out):
            for i, item in enumerate(out):  # x.chunk(2): each part is its own getitem node, as fx writes it
                part = self.graph.call_function(operator.getitem, (node, i))
                part.meta.update(node.meta, shape=tuple(item.shape) if isinstance(item, Tensor) else None)
                self.bind(item, part)
            return
        node.meta["shape"] = tuple(out.shape) if isinstance(out, Tensor) else None
        self.bind(out, node)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.quiet:
            return out
        if self.leaf_depth or not any(isinstance(t, Tensor) for t in tree_flatten(out)[0]):
            if not self.leaf_depth and self.stack:  # inside the model's forward (kanc's own reads are not)
                self._note_param_reads(func, args)
            return out
        op, target, args = _op(func, args)
        if target is not None:
            self.add(op, target, args, kwargs, out)
        return out

    def _note_param_reads(self, func: Any, args: tuple) -> None:
        """A parameter read that computes no tensor (``fc1.weight.dtype``, ``.shape``, ``.tolist()``) outside its own
        module: remembered as a use, ``getattr(param, name)`` with the attribute's or the method's name."""
        name = getattr(func, "__name__", None)
        if name == "__get__":  # a property: its descriptor's name
            name = getattr(getattr(func, "__self__", None), "__name__", None)
        name = name or "attribute"
        for a in args:
            if isinstance(a, Tensor) and id(a) in self.params:
                node = self.graph.create_node("call_function", getattr, (self.node_for(a), name), {})
                self.meta(node)
                self.param_uses.append((self.params[id(a)], node))

    # ---- module hooks ------------------------------------------------------------------------------------------

    def is_leaf(self, module: nn.Module) -> bool:
        known = self.leaves.get(id(module))
        if known is not None:
            return known
        self.quiet = True  # a module made while the model runs (not cached: its id may be reused)
        try:
            return record_leaf(module)
        finally:
            self.quiet = False

    def pre_hook(self, module: nn.Module, args: tuple) -> None:
        if self.leaf_depth:
            if self.is_leaf(module):
                self.leaf_depth += 1
            return
        if self.is_leaf(module) and id(module) in self.paths:
            self.leaf_depth += 1
            return
        self.stack.append(module)
        self.entered.append([self.node_for(a) for a in tree_flatten(args)[0] if isinstance(a, Tensor)])

    def hook(self, module: nn.Module, args: tuple, out: Any) -> None:
        if self.leaf_depth:
            if self.is_leaf(module):
                self.leaf_depth -= 1
                if not self.leaf_depth and id(module) in self.paths:
                    self.add("call_module", self.paths[id(module)], args, {}, out, module)
            return
        if self.stack and self.stack[-1] is module:
            self.stack.pop()
            inputs = self.entered.pop()
            flat = [t for t in tree_flatten(out)[0] if isinstance(t, Tensor)]
            outputs = [self.values[id(t)] for t in flat if id(t) in self.values]
            path = self.paths.get(id(module))
            if path:
                self.boundaries.setdefault(path, []).append((inputs, outputs))


def _op(func: Any, args: tuple) -> tuple[str, Any, tuple]:
    """(op, target, args) for an fx node of this call; target None for calls that are not tensor computations."""
    objclass = getattr(func, "__objclass__", None)
    name = getattr(func, "__name__", "")
    if objclass is not None and issubclass(objclass, torch._C.TensorBase):
        if name in _DUNDER:
            return "call_function", _DUNDER[name], args
        if name.startswith("__") and name.endswith("__"):
            base = name.strip("_").removeprefix("r") if name.startswith("__r") else name.strip("_")
            fn = getattr(operator, base, None) or getattr(operator, f"{base}_", None)
            if fn is None:
                return "call_method", name, args
            return "call_function", fn, (args[1], args[0]) if name.startswith("__r") else args
        return "call_method", name, args
    if objclass is not None:
        return "call_function", None, args  # descriptors (.shape, .dtype, ...): no tensor computed
    return "call_function", func, args


def call_site() -> CallSite | None:
    """The innermost frame outside torch's and kanc's own files."""
    frame = sys._getframe(1)
    while frame is not None:
        filename = frame.f_code.co_filename
        if _model_code(filename):
            owner = frame.f_locals.get("self")
            owner = owner if isinstance(owner, nn.Module) else None
            return CallSite(filename, frame.f_lineno, frame.f_code.co_name, frame.f_code, owner)
        frame = frame.f_back
    return None


def _model_code(filename: str) -> bool:
    if filename.startswith(_TORCH_MODULES):
        return filename != _TORCH_MODULE_PY
    return not (filename.startswith(_TORCH_DIR) or filename.startswith(_KANC_DIR) or filename.startswith("<"))


@dataclass
class Recording:
    """A recorded execution: the graph module, and the parameters read outside their own modules."""

    graph_module: RecordedGraphModule
    param_uses: list[tuple[str, fx.Node]]
    boundaries: dict[str, list[tuple[list[fx.Node], list[fx.Node]]]]  # module path -> (inputs, outputs) per call


def record_execution(model: nn.Module, call: Any) -> Recording:
    """Run ``call()`` (which runs ``model``) once under the recorder; the recorded graph of what ran."""
    recorder = _Recorder(model)
    handles = [
        nn.modules.module.register_module_forward_pre_hook(recorder.pre_hook),
        nn.modules.module.register_module_forward_hook(recorder.hook),
    ]
    try:
        with recorder:
            out = call()
    finally:
        for h in handles:
            h.remove()
    flat = [t for t in tree_flatten(out)[0] if isinstance(t, Tensor)]
    outputs = [recorder.values[id(t)] for t in flat if id(t) in recorder.values]
    recorder.graph.output(tuple(outputs))
    name = type(model).__name__
    gm = RecordedGraphModule(model, recorder.graph, class_name=name if name.isidentifier() else "GraphModule")
    return Recording(gm, recorder.param_uses, recorder.boundaries)
