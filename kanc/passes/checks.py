"""MLP shapes as data: what a block is (``MLPBlock``) and the checks that recognise one around an activation.

Every check is anchored at an activation node and returns an ``MLPBlock`` (a hit), a ``Miss`` (the shape
almost matched: the reason is counted and reported), or None (the row does not apply). The table itself,
pairing each check with its rewrites, is ``kanc.passes.table.PATTERNS``.
"""

from __future__ import annotations

import copy
import operator
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import networkx as nx
import torch
from torch import Tensor, fx, nn
from torch.nn import functional as F

from kanc.frontend.activations import (
    ActSpec,
    elementwise_region,
    function_activation,
    is_mul,
    module_activation,
    norm_width,
    passthrough_kind,
    region_activation,
)
from kanc.frontend.dataflow import node_id, sole_consumer
from kanc.frontend.leaves import LinearWeights, linear_kind, linear_weights
from kanc.frontend.tracing import Trace, TracedPart

_ATEN_LINEAR = torch.ops.aten.linear.default


# ---- what the checks look at ---------------------------------------------------------------------------------


@dataclass(eq=False)
class Linear:
    """A linear-like node: a module call (Linear, HF Conv1D, 1x1 Conv2d) or an aten.linear on parameters."""

    node: fx.Node
    part: TracedPart = field(repr=False)
    path: str
    kind: str  # linear | conv1d | conv1x1 | aten
    module: nn.Module | None = field(repr=False)

    @property
    def weights(self) -> LinearWeights:
        if self.module is not None:
            return linear_weights(self.module)
        w, b = (self.part.graph_module.get_parameter(a.target) if a is not None else None for a in _aten_wb(self.node))
        return LinearWeights(w, b)

    @property
    def in_features(self) -> int:
        return self.weights.in_features

    @property
    def out_features(self) -> int:
        return self.weights.out_features

    @property
    def input(self) -> fx.Node | None:
        arg = self.node.args[0] if self.node.args else None
        return arg if isinstance(arg, fx.Node) else None

    @property
    def channels_first(self) -> bool:
        return self.kind == "conv1x1"


def _aten_wb(node: fx.Node) -> tuple[fx.Node | None, fx.Node | None]:
    w = node.args[1]
    b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    return w, b


@dataclass(eq=False)
class Act:
    """The activation of a block: one node (a module, function or method call), or an elementwise ``region`` of
    several nodes (an activation written as arithmetic) whose last node is ``node``."""

    node: fx.Node
    part: TracedPart = field(repr=False)
    spec: ActSpec
    path: str | None  # model path of the activation module; None for functions and methods
    shared: bool = False  # the module is called elsewhere too: remove it by editing the graph, not by a swap
    region: tuple[fx.Node, ...] = ()
    entry: fx.Node | None = None  # the region's input

    @property
    def input(self) -> object:
        """What the activation is applied to."""
        if self.entry is not None:
            return self.entry
        return self.node.args[0] if self.node.args else None

    @property
    def nodes(self) -> tuple[fx.Node, ...]:
        return self.region or (self.node,)

    def reads_all_of(self, node: fx.Node) -> bool:
        """Every use of ``node`` is inside this activation (fc1 feeds nothing else)."""
        return bool(node.users) and set(node.users) <= set(self.nodes)


@dataclass(eq=False)
class Passthrough:
    node: fx.Node
    kind: str  # dropout | identity | norm
    module: nn.Module | None = field(repr=False)
    path: str | None


@dataclass(eq=False)
class MLPBlock:
    """One MLP block: x -> fc1 -> act -> between -> fc2 (plain), or act(fc1 x) * up(x) (gated), or a split block.

    For gated blocks ``fc1`` is the gate and ``up`` the other factor; for ``glu_chunk`` blocks ``fc1`` computes both
    halves (``gate_index`` says which one the activation sees). ``owner`` is the innermost module whose forward
    contains every node; ``name`` is what include/exclude globs and reports use.
    """

    pattern: str
    fc1: Linear
    act: Act
    fc2: Linear
    between: list[Passthrough] = field(default_factory=list)
    pre: list[Passthrough] = field(default_factory=list)  # identities between fc1 and the activation
    up: Linear | None = None
    mul: fx.Node | None = None
    chunk: fx.Node | None = None
    gate_index: int = 0
    split: tuple[str, str] | None = None  # (producer part, consumer part)
    owner: str = ""
    name: str = ""

    @property
    def in_features(self) -> int:
        return self.fc1.in_features

    @property
    def hidden(self) -> int:
        """Width the activation acts on."""
        return self.fc1.out_features // 2 if self.chunk is not None else self.fc1.out_features

    @property
    def out_features(self) -> int:
        return self.fc2.out_features

    @property
    def gated(self) -> bool:
        return self.up is not None or self.chunk is not None

    @property
    def channels_first(self) -> bool:
        return self.fc1.channels_first

    @property
    def key(self) -> tuple[str, str, str]:
        """Identity across re-traces: pattern and the model paths of fc1 and fc2."""
        return self.pattern, self.fc1.path, self.fc2.path

    @property
    def norms(self) -> list[Passthrough]:
        return [p for p in self.between if p.kind == "norm"]

    def linears(self) -> list[Linear]:
        return [lin for lin in (self.fc1, self.up, self.fc2) if lin is not None]

    def nodes(self) -> list[fx.Node]:
        """The block's nodes in its (single) graph, in graph order; empty for split blocks."""
        if self.split is not None:
            return []
        found = {self.fc1.node, *self.act.nodes, self.fc2.node, *(p.node for p in self.between + self.pre)}
        found |= {n for n in (self.mul, self.chunk) if n is not None}
        if self.up is not None:
            found.add(self.up.node)
        if self.chunk is not None:
            found |= set(self.chunk.users)
        return [n for n in self.fc1.node.graph.nodes if n in found]

    def shape_text(self) -> str:
        mid = f"2x{self.hidden}" if self.gated else str(self.hidden)
        return f"{self.in_features} -> {mid} -> {self.out_features}"

    def reference(self, dtype: torch.dtype = torch.float64) -> Callable[[Tensor], Tensor]:
        """The original block on rows (N, in_features), in ``dtype`` and eval mode (dropout off).

        Its weights are read from the original layers (the rewrites swap modules, they never change them); only a
        dtype other than theirs makes copies."""
        return _reference(self, dtype)


@dataclass(frozen=True)
class Miss:
    """A near miss: the row applied but did not match; ``depth`` ranks how far the check got."""

    code: str
    message: str
    depth: int = 0


class View:
    """What the checks may ask about a traced part's nodes."""

    def __init__(self, part: TracedPart, trace: Trace, graph: nx.DiGraph, aliased: set[int]) -> None:
        self.part, self.trace, self.graph = part, trace, graph
        self.modules = dict(part.graph_module.named_modules())
        self.calls = Counter(n.target for n in part.graph_module.graph.nodes if n.op == "call_module")
        self.aliased = aliased

    def module(self, node: fx.Node) -> nn.Module | None:
        return self.modules.get(node.target) if node.op == "call_module" else None

    def linear(self, node: object) -> Linear | None:
        if not isinstance(node, fx.Node):
            return None
        module = self.module(node)
        if module is not None:
            kind = linear_kind(module)
            return Linear(node, self.part, self.part.absolute(node.target), kind, module) if kind else None
        if node.op == "call_function" and node.target is _ATEN_LINEAR:
            w, b = _aten_wb(node)
            if isinstance(w, fx.Node) and w.op == "get_attr" and (b is None or getattr(b, "op", "") == "get_attr"):
                return Linear(
                    node, self.part, w.target.rsplit(".", 1)[0] if "." in w.target else w.target, "aten", None
                )
        return None

    def act(self, node: fx.Node) -> Act | None:
        module = self.module(node)
        if module is not None:
            spec = module_activation(module)
            shared = self.calls[node.target] > 1 or id(module) in self.aliased
            return Act(node, self.part, spec, self.part.absolute(node.target), shared) if spec else None
        spec = function_activation(node)
        if spec is not None:
            return Act(node, self.part, spec, None)
        found = elementwise_region(node)
        if found is None:
            return None
        entry, region = found
        return Act(node, self.part, region_activation(entry, region), None, region=region, entry=entry)

    def passthrough(self, node: fx.Node) -> Passthrough | None:
        module = self.module(node)
        kind = passthrough_kind(node, module)
        if kind is None:
            return None
        return Passthrough(node, kind, module, self.part.absolute(node.target) if module is not None else None)

    def shared(self, lin: Linear) -> bool:
        """Called more than once in this graph, or reachable under two model paths (tied/shared weights)."""
        if lin.module is None:
            return False
        return self.calls[lin.node.target] > 1 or id(lin.module) in self.aliased

    def linear_before(self, node: object) -> tuple[Linear, list[Passthrough]] | None:
        """The linear layer feeding ``node``, possibly through Identity modules (timm's ConvMlp without a norm)."""
        pre: list[Passthrough] = []
        while isinstance(node, fx.Node):
            lin = self.linear(node)
            if lin is not None:
                return lin, pre[::-1]
            step = self.passthrough(node)
            if step is None or step.kind != "identity" or len(node.users) != 1 or not node.args:
                return None
            pre.append(step)
            node = node.args[0]
        return None

    def scope(self, node: fx.Node) -> str:
        return node_scope(self.part, node)


def node_scope(part: TracedPart, node: fx.Node) -> str:
    """Model path of the module whose forward created ``node`` (from fx's nn_module_stack)."""
    stack = list((node.meta.get("nn_module_stack") or {}).values())
    paths = [p[0] if isinstance(p, tuple) else str(p) for p in stack]
    if node.op == "call_module" and paths:
        paths = paths[:-1]
    rel = paths[-1] if paths else ""
    return rel if part.aten else part.absolute(rel)


# ---- walking the hidden activation to fc2 --------------------------------------------------------------------


def _single_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def walk_to_fc2(view: View, start: fx.Node, depth: int) -> tuple[Linear, list[Passthrough]] | Miss:
    """From the hidden activation ``start`` through dropout/identity/norm to the linear that consumes it."""
    between: list[Passthrough] = []
    cur = start
    while True:
        user = _single_user(cur)
        if user is None:
            names = ", ".join(u.name for u in cur.users) or "nothing"
            return Miss("hidden_reused", f"{cur.name} is used by {names}: not a single path to fc2", depth)
        lin = view.linear(user)
        if lin is not None and lin.input is cur:
            return lin, between
        step = view.passthrough(user)
        if step is not None and user.args and user.args[0] is cur:
            between.append(step)
            cur = user
            continue
        if user.op == "output":
            return Miss("ends_module", f"{cur.name} is returned by {view.part.path or '<root>'}", depth)
        return Miss("no_fc2", f"{cur.name} goes to {user.name} ({describe(view, user)}), not to a linear layer", depth)


def describe(view: View, node: fx.Node) -> str:
    module = view.module(node)
    if module is not None:
        return type(module).__name__
    return getattr(node.target, "__name__", str(node.target))


def _check_fc2(block_fc1_hidden: int, fc1: Linear, fc2: Linear, between: list[Passthrough], depth: int) -> Miss | None:
    if fc2.channels_first != fc1.channels_first:
        return Miss(
            "mixed_layout", f"{fc1.path} and {fc2.path} are not both channels-first or both channels-last", depth
        )
    if fc2.in_features != block_fc1_hidden:
        return Miss(
            "width", f"{fc2.path} takes {fc2.in_features} features but the activation has {block_fc1_hidden}", depth
        )
    for step in between:
        width = norm_width(step.module) if step.kind == "norm" else None
        if width is not None and width != block_fc1_hidden:
            return Miss("width", f"norm {step.path} has width {width}, not {block_fc1_hidden}", depth)
    return None


def _shared_miss(view: View, parts: list, depth: int) -> Miss | None:
    for p in parts:
        if view.shared(p):
            label = getattr(p, "path", None) or p.node.name
            return Miss(
                "shared_module",
                f"{label} is called more than once or shared: converting it would change the other uses",
                depth,
            )
    return None


# ---- the checks ----------------------------------------------------------------------------------------------


def check_plain(view: View, act: Act, kinds: tuple[str, ...]) -> MLPBlock | Miss | None:
    """fc1 -> (identity)* -> act -> (dropout | identity | norm)* -> fc2, both layers of one of ``kinds``."""
    before = view.linear_before(act.input)
    if before is None or before[0].kind not in kinds or _is_gate(act):
        return None
    fc1, pre = before
    if len(fc1.node.users) != 1 and not act.reads_all_of(fc1.node):
        others = ", ".join(u.name for u in fc1.node.users if u not in act.nodes)
        return Miss("fc1_reused", f"{fc1.path}'s output is also used by {others}: a residual would be crossed", 1)
    walked = walk_to_fc2(view, act.node, 2)
    if isinstance(walked, Miss):
        return walked
    fc2, between = walked
    if fc2.kind not in kinds:
        return Miss("mixed_layout", f"{fc1.path} is {fc1.kind} but {fc2.path} is {fc2.kind}", 3)
    miss = _check_fc2(fc1.out_features, fc1, fc2, between, 3) or _shared_miss(view, [fc1, fc2], 3)
    return miss or MLPBlock("", fc1, act, fc2, between, pre)


def _is_gate(act: Act) -> bool:
    user = _single_user(act.node)
    return user is not None and is_mul(user)


def check_gated(view: View, act: Act) -> MLPBlock | Miss | None:
    """act(gate(x)) * up(x) -> (dropout | identity | norm)* -> down (LLaMA, GeGLU, timm SwiGLU)."""
    gate = view.linear(act.input)
    mul = _single_user(act.node)
    if gate is None or mul is None or not is_mul(mul):
        return None
    other = mul.args[1] if mul.args[0] is act.node else mul.args[0]
    up = view.linear(other)
    if up is None:
        return Miss(
            "gate_partner", f"{act.node.name} is multiplied by {getattr(other, 'name', other)}, not a linear", 1
        )
    if up.input is not gate.input:
        return Miss("gate_inputs", f"{gate.path} and {up.path} read different inputs", 2)
    if not act.reads_all_of(gate.node) or len(up.node.users) != 1:
        return Miss("fc1_reused", f"{gate.path} or {up.path} feeds more than the gated product", 2)
    if up.out_features != gate.out_features or up.kind != gate.kind:
        return Miss("width", f"{gate.path} and {up.path} differ in width or kind", 2)
    walked = walk_to_fc2(view, mul, 3)
    if isinstance(walked, Miss):
        return walked
    down, between = walked
    miss = _check_fc2(gate.out_features, gate, down, between, 4) or _shared_miss(view, [gate, up, down], 4)
    return miss or MLPBlock("", gate, act, down, between, up=up, mul=mul)


def _chunk_source(node: object) -> tuple[fx.Node, int] | None:
    """(chunk node, index) for ``getitem(x.chunk(2, dim=-1), index)``."""
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target is operator.getitem):
        return None
    chunk, index = node.args
    if not isinstance(chunk, fx.Node) or not isinstance(index, int):
        return None
    is_chunk = (chunk.op == "call_method" and chunk.target == "chunk") or (
        chunk.op == "call_function" and chunk.target is torch.chunk
    )
    if not is_chunk:
        return None
    chunks = chunk.args[1] if len(chunk.args) > 1 else chunk.kwargs.get("chunks")
    dim = chunk.args[2] if len(chunk.args) > 2 else chunk.kwargs.get("dim", 0)
    return (chunk, index) if chunks == 2 and dim == -1 else None


def check_glu_chunk(view: View, act: Act) -> MLPBlock | Miss | None:
    """fc1(x).chunk(2, dim=-1) -> act(a) * b (or a * act(b)) -> ... -> fc2 (timm GluMlp)."""
    source = _chunk_source(act.input)
    mul = _single_user(act.node)
    if source is None or mul is None or not is_mul(mul):
        return None
    chunk, index = source
    fc1 = view.linear(chunk.args[0])
    if fc1 is None:
        return Miss("gate_partner", f"{chunk.name} does not split a linear layer's output", 1)
    other = mul.args[1] if mul.args[0] is act.node else mul.args[0]
    partner = _chunk_source(other)
    if partner is None or partner[0] is not chunk or partner[1] != 1 - index:
        return Miss("gate_partner", f"{act.node.name} is multiplied by something other than the other half", 2)
    if len(fc1.node.users) != 1 or len(chunk.users) != 2 or not act.reads_all_of(act.input) or len(other.users) != 1:
        return Miss("fc1_reused", f"{fc1.path}'s halves are used outside the gated product", 2)
    if fc1.out_features % 2:
        return Miss("width", f"{fc1.path} has an odd width {fc1.out_features}", 2)
    walked = walk_to_fc2(view, mul, 3)
    if isinstance(walked, Miss):
        return walked
    fc2, between = walked
    miss = _check_fc2(fc1.out_features // 2, fc1, fc2, between, 4) or _shared_miss(view, [fc1, fc2], 4)
    return miss or MLPBlock("", fc1, act, fc2, between, mul=mul, chunk=chunk, gate_index=index)


def check_split(view: View, act: Act) -> MLPBlock | Miss | None:
    """fc1 -> act returned by one module, whose output feeds only fc2 at the start of the next (BERT)."""
    before = view.linear_before(act.input)
    if before is None or view.part.aten or _is_gate(act):
        return None
    fc1, pre = before
    tail = _walk_to_output(view, act.node)
    if tail is None:
        return None
    if len(fc1.node.users) != 1 and not act.reads_all_of(fc1.node):
        return Miss("fc1_reused", f"{fc1.path}'s output is also used elsewhere", 3)
    target = sole_consumer(view.graph, view.part)
    if target is None:
        where = view.part.path or "<root>"
        message = f"{where} returns {fc1.path} -> {act.spec.name}, and no next module is seen consuming it alone"
        return Miss("split_flow", message, 3)
    consumer = view.graph.nodes[target]["part"]
    part = view.trace.part(consumer)
    placeholder = next(n for n in part.graph_module.graph.nodes if node_id(part, n) == target)
    other = View(part, view.trace, view.graph, view.aliased)
    walked = walk_to_fc2(other, placeholder, 4)
    if isinstance(walked, Miss):
        return Miss("split_residual", f"in {consumer}: {walked.message}", 4)
    fc2, between = walked
    between = tail + between
    miss = _check_fc2(fc1.out_features, fc1, fc2, between, 5)
    miss = miss or _shared_miss(view, [fc1], 5) or _shared_miss(other, [fc2], 5)
    if miss:
        return miss
    return MLPBlock("", fc1, act, fc2, between, pre, split=(view.part.path, consumer))


def _walk_to_output(view: View, start: fx.Node) -> list[Passthrough] | None:
    """Passthroughs from ``start`` to the graph's output, if the output returns exactly that value."""
    tail, cur = [], start
    while True:
        user = _single_user(cur)
        if user is None:
            return None
        if user.op == "output":
            return tail if user.args[0] is cur else None
        step = view.passthrough(user)
        if step is None or step.kind == "norm":
            return None
        tail.append(step)
        cur = user


# ---- the original block as a function (fidelity, SNNK targets) -----------------------------------------------


def _row_linear(lin: Linear, dtype: torch.dtype) -> Callable[[Tensor], Tensor]:
    w = lin.weights.weight.detach().to(dtype)
    b = lin.weights.bias.detach().to(dtype) if lin.weights.bias is not None else None
    return lambda x: F.linear(x, w, b)


def _row_norm(step: Passthrough, channels_first: bool, dtype: torch.dtype) -> Callable[[Tensor], Tensor]:
    if step.kind != "norm":
        return lambda x: x
    params = [*step.module.parameters(), *step.module.buffers()]
    same = all(t.dtype == dtype for t in params if t.is_floating_point())
    twin = step.module if same else copy.deepcopy(step.module).to(dtype).eval()
    if channels_first:
        return lambda x: twin(x[:, :, None, None])[:, :, 0, 0] if x.dim() == 2 else twin(x)
    return twin


def _reference(block: MLPBlock, dtype: torch.dtype = torch.float64) -> Callable[[Tensor], Tensor]:
    fc1, fc2 = _row_linear(block.fc1, dtype), _row_linear(block.fc2, dtype)
    up = _row_linear(block.up, dtype) if block.up is not None else None
    steps = [_row_norm(s, block.channels_first, dtype) for s in block.between]
    act = block.act.spec.fn
    half, index = block.hidden, block.gate_index

    def fn(x: Tensor) -> Tensor:
        x = x.to(dtype)
        if up is not None:
            h = act(fc1(x)) * up(x)
        elif block.chunk is not None:
            a, b = fc1(x).split(half, dim=-1)
            h = act(a) * b if index == 0 else a * act(b)
        else:
            h = act(fc1(x))
        for step in steps:
            h = step(h)
        return fc2(h)

    return fn
