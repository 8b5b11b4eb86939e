"""MLP shapes as data: what a block is (``MLPBlock``) and the checks that recognise one around an activation.

Every check is anchored at an activation node and returns an ``MLPBlock`` (a hit), a ``Miss`` (the shape
almost matched: the reason is counted and reported), or None (the row does not apply). The table itself,
pairing each check with its rewrites, is ``kanc.passes.table.PATTERNS``.
"""

from __future__ import annotations

import copy
import math
import operator
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

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
    passthrough_kind,
    region_activation,
)
from kanc.frontend.dataflow import node_id, sole_consumer
from kanc.frontend.leaves import LinearWeights, linear_kind, linear_weights, lora_base, norm_width
from kanc.frontend.tracing import Trace, TracedPart
from kanc.numerics import cast_once

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

    @property
    def trains(self) -> bool:
        """Whether the layer's own weight or bias requires grad: a LoRA layer's base layer's (its adapters train
        either way), a module's parameters, or the tensors of an aten.linear. What a conversion adds in its place
        trains the same way."""
        if self.module is not None:
            base = lora_base(self.module) or self.module
            return any(p.requires_grad for p in base.parameters(recurse=False))
        return any(t is not None and t.requires_grad for t in (self.weights.weight, self.weights.bias))


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
    """A step that keeps each token's channels apart: dropout and identities (no-ops in eval), a token norm, or a
    scale (a product with a constant, a scalar or a per-channel parameter: x-transformers' ``mult_bias``)."""

    node: fx.Node
    kind: str  # dropout | identity | norm | scale
    module: nn.Module | None = field(repr=False)
    path: str | None
    factor: Tensor | float | None = field(default=None, repr=False)  # scale: what the value is multiplied by


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
    pre: list[Passthrough] = field(default_factory=list)  # passthroughs (identity, dropout, norm) fc1 -> activation
    chain: tuple[fx.Node, ...] = ()  # other ops between fc1 and the activation (reshapes, a depthwise conv)
    chain_rowwise: bool = False  # the chain keeps every token's channels apart (recorded shapes say so); ``pre``
    # then holds its norms in order
    concat: fx.Node | None = None  # fc2 reads the hidden features concatenated with others (Flux's single blocks)
    up: Linear | None = None
    mul: fx.Node | None = None
    chunk: fx.Node | None = None
    gate_index: int = 0
    split: tuple[str, str] | None = None  # (producer part, consumer part)
    calls: int = 1  # times the block runs in its graph (one module called twice: every call is this block)
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
        """Norms between the activation and fc2."""
        return [p for p in self.between if p.kind == "norm"]

    @property
    def scales(self) -> list[Passthrough]:
        """Scales between the activation and fc2."""
        return [p for p in self.between if p.kind == "scale"]

    @property
    def rowwise(self) -> bool:
        """fc1 -> ... -> fc2 is a function of each token's features alone (what SNNK and the block reference need)."""
        return self.concat is None and (not self.chain or self.chain_rowwise)

    @property
    def reference_width(self) -> int:
        """Width of the rows ``reference`` takes: the block's input, or the activation's input when not rowwise."""
        return self.in_features if self.rowwise else self.hidden

    def linears(self) -> list[Linear]:
        return [lin for lin in (self.fc1, self.up, self.fc2) if lin is not None]

    def nodes(self) -> list[fx.Node]:
        """The block's nodes in its (single) graph, in graph order; empty for split blocks."""
        if self.split is not None:
            return []
        found = {self.fc1.node, *self.act.nodes, self.fc2.node, *(p.node for p in self.between + self.pre)}
        found |= {n for n in (self.mul, self.chunk, self.concat) if n is not None} | set(self.chain)
        if self.up is not None:
            found.add(self.up.node)
        if self.chunk is not None:
            found |= set(self.chunk.users)
        return [n for n in self.fc1.node.graph.nodes if n in found]

    def shape_text(self) -> str:
        mid = f"2x{self.hidden}" if self.gated else str(self.hidden)
        return f"{self.in_features} -> {mid} -> {self.out_features}"

    def reference(
        self, dtype: torch.dtype = torch.float64, act: Callable[[Tensor], Tensor] | None = None
    ) -> Callable[[Tensor], Tensor]:
        """The original block on rows (N, ``reference_width``), in ``dtype`` and eval mode (dropout off): from its
        input, or from the activation's input when the block is not rowwise. ``act`` replaces the activation.

        Its weights are read from the original layers (the rewrites swap modules, they never change them); only a
        dtype other than theirs makes copies."""
        return _reference(self, dtype, act)

    def pre_activation(self, dtype: torch.dtype = torch.float64) -> Callable[[Tensor], Tensor] | None:
        """Rows of the block's input -> what the activation receives; None when the block is not rowwise."""
        return _pre_activation(self, dtype) if self.rowwise else None


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

    def scale(self, node: fx.Node, value: fx.Node) -> Passthrough | None:
        """``value * c`` (or ``c * value``, ``value / c``) with c a number or a scalar or per-channel parameter."""
        if node.op not in ("call_function", "call_method") or node.kwargs or len(node.args) != 2:
            return None
        div = node.target in (operator.truediv, torch.div, "div")
        if not (is_mul(node) or div):
            return None
        if node.args[0] is value:
            other = node.args[1]
        elif node.args[1] is value and not div:
            other = node.args[0]
        else:
            return None
        factor = self._constant(other)
        if factor is None:
            return None
        return Passthrough(node, "scale", None, None, 1 / factor if div else factor)

    def _constant(self, value: object) -> Tensor | float | None:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if not (isinstance(value, fx.Node) and value.op == "get_attr"):
            return None
        tensor = _fetch(self.part.graph_module, str(value.target))
        if not isinstance(tensor, Tensor) or not tensor.is_floating_point():
            return None
        return tensor if tensor.dim() <= 1 or all(d == 1 for d in tensor.shape[:-1]) else None

    def shared(self, lin: Linear, calls: bool = False) -> bool:
        """Reachable under two model paths (tied/shared weights), or with ``calls`` called more than once in this
        graph (a block called k times is told apart later: find_mlp_blocks keeps it when its k calls match)."""
        if lin.module is None:
            return False
        return (calls and self.calls[lin.node.target] > 1) or id(lin.module) in self.aliased

    def linear_before(self, node: object) -> Before | None:
        """The linear layer feeding ``node``: through passthroughs (identity, dropout, norm; each read once), else
        through a short chain of reshapes, norms and a depthwise conv that only fc1 feeds (LeViT's BatchNorm over
        flattened tokens, PVTv2's depthwise conv)."""
        pre: list[Passthrough] = []
        cur = node
        while isinstance(cur, fx.Node):
            lin = self.linear(cur)
            if lin is not None:
                return Before(lin, pre[::-1])
            step = self.passthrough(cur)
            if step is None or len(cur.users) != 1 or not cur.args or not isinstance(cur.args[0], fx.Node):
                break
            pre.append(step)
            cur = cur.args[0]
        return self._chain_before(node) if isinstance(node, fx.Node) else None

    def _chain_before(self, node: fx.Node) -> Before | None:
        region: list[fx.Node] = []
        linears: list[Linear] = []
        stack = [node]
        while stack:
            cur = stack.pop()
            lin = self.linear(cur)
            if lin is not None:
                linears += [lin] if all(lin.node is not other.node for other in linears) else []
                continue
            if cur in region:
                continue
            if len(region) >= MAX_CHAIN or not self._chain_op(cur):
                return None
            region.append(cur)
            data = cur.args[0] if cur.args else None  # the other arguments are shapes, weights, dims
            if not isinstance(data, fx.Node) or data.op in ("get_attr", "placeholder"):
                return None
            stack.append(data)
        if len(linears) != 1 or not region:
            return None
        fc1, inside = linears[0], set(region)
        outside = lambda n: {u for u in n.users if u not in inside and not metadata_read(u)}
        if outside(fc1.node) or any(outside(n) for n in region if n is not node):
            return None  # something outside the chain reads into it: not fc1's private path to the activation
        chain = tuple(n for n in node.graph.nodes if n in inside)
        pre = [p for n in chain if (p := self.passthrough(n)) is not None]  # its norms, in order
        return Before(fc1, pre, chain, _rowwise(self, fc1, chain))

    def _chain_op(self, node: fx.Node) -> bool:
        if node.op == "call_module":
            module = self.module(node)
            return module is not None and (passthrough_kind(node, module) is not None or _depthwise(module))
        if node.op == "call_method":
            return node.target in CHAIN_METHODS
        return node.op == "call_function" and node.target in CHAIN_FUNCTIONS

    def scope(self, node: fx.Node) -> str:
        return node_scope(self.part, node)


MAX_CHAIN = 12  # ops between fc1 and the activation: enough for a reshape, a norm or a conv and the way back
CHAIN_METHODS = {
    "view", "reshape", "reshape_as", "view_as", "flatten", "unflatten", "transpose", "permute", "contiguous",
    "movedim", "squeeze", "unsqueeze",
}  # fmt: skip
CHAIN_FUNCTIONS = {
    torch.flatten, torch.reshape, torch.transpose, torch.permute, torch.movedim, torch.squeeze, torch.unsqueeze,
    F.layer_norm, F.batch_norm, F.group_norm, F.rms_norm,
}  # fmt: skip


@dataclass
class Before:
    """What feeds an activation: fc1, the passthroughs between, and any other chain of ops (see linear_before)."""

    fc1: Linear
    pre: list[Passthrough]
    chain: tuple[fx.Node, ...] = ()
    rowwise: bool = True


METADATA = ("shape", "size", "dim", "ndim", "dtype", "device", "is_cuda", "layout", "requires_grad")


def metadata_read(node: fx.Node) -> str | None:
    """The attribute a read of a tensor's metadata takes (``x.shape``, ``x.size()``, ``x.dtype``; a recorded run writes
    each as ``getattr(x, name)``), or None for anything that reads values."""
    if node.op == "call_method":
        return str(node.target) if node.target in METADATA else None
    attr = node.args[1] if node.op == "call_function" and node.target is getattr and len(node.args) > 1 else None
    return attr if attr in METADATA else None


def _depthwise(module: nn.Module) -> bool:
    conv = isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d)
    return conv and module.groups == module.in_channels == module.out_channels


def _rowwise(view: View, fc1: Linear, chain: tuple[fx.Node, ...]) -> bool:
    """Every op of the chain is a reshape or a token norm module that keeps the last dimension and the element count
    (the recording's shapes say so): LeViT's ``bn(x.flatten(0, 1)).reshape_as(x)``."""
    shape = fc1.node.meta.get("shape")
    if shape is None or fc1.channels_first:
        return False
    for node in chain:
        out = node.meta.get("shape")
        if out is None or out[-1] != shape[-1] or math.prod(out) != math.prod(shape):
            return False
        if node.op == "call_module" and view.passthrough(node) is None:
            return False
        if node.op == "call_function" and node.target not in (torch.flatten, torch.reshape):
            return False
    return True


def _fetch(gm: fx.GraphModule, target: str) -> object:
    value: object = gm
    for name in target.split("."):
        value = getattr(value, name, None)
    return value


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


class ToFc2(NamedTuple):
    """Where a hidden value goes: fc2, the passthroughs on the way, and the concatenation fc2 reads it through."""

    fc2: Linear
    between: list[Passthrough]
    concat: fx.Node | None = None


def walk_to_fc2(view: View, start: fx.Node, depth: int) -> ToFc2 | Miss:
    """From the hidden activation ``start`` through dropout/identity/norm/scale steps to the linear that consumes it,
    possibly concatenated with other features along the channels first (Flux's single-stream blocks)."""
    between: list[Passthrough] = []
    cur, concat = start, None
    while True:
        user = _single_user(cur)
        if user is None:
            names = ", ".join(u.name for u in cur.users) or "nothing"
            return Miss("hidden_reused", f"{cur.name} is used by {names}: not a single path to fc2", depth)
        lin = view.linear(user)
        if lin is not None and lin.input is cur:
            return ToFc2(lin, between, concat)
        step = view.passthrough(user)
        if step is not None and user.args and user.args[0] is cur:
            between.append(step)
            cur = user
            continue
        step = view.scale(user, cur) if concat is None else None
        if step is not None:
            between.append(step)
            cur = user
            continue
        if concat is None and _channel_concat(user, cur):
            cur = concat = user
            continue
        if user.op == "output":
            return Miss("ends_module", f"{cur.name} is returned by {view.part.path or '<root>'}", depth)
        return Miss("no_fc2", f"{cur.name} goes to {user.name} ({describe(view, user)}), not to a linear layer", depth)


def _walk_no_concat(view: View, start: fx.Node, depth: int) -> ToFc2 | Miss:
    walked = walk_to_fc2(view, start, depth)
    if isinstance(walked, ToFc2) and walked.concat is not None:
        return Miss("concat", f"{walked.fc2.path} reads {start.name} concatenated with other features", depth)
    return walked


def _channel_concat(node: fx.Node, value: fx.Node) -> bool:
    """``torch.cat([..., value, ...], dim=<last>)``, the last dimension known from a recorded shape or dim=-1."""
    if node.op != "call_function" or node.target not in (torch.cat, torch.concat, torch.concatenate):
        return False
    parts = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    shape = value.meta.get("shape")
    last = dim == -1 or (shape is not None and isinstance(dim, int) and dim == len(shape) - 1)
    return isinstance(parts, list | tuple) and sum(p is value for p in parts) == 1 and last


def describe(view: View, node: fx.Node) -> str:
    module = view.module(node)
    if module is not None:
        return type(module).__name__
    return getattr(node.target, "__name__", str(node.target))


def _check_fc2(
    hidden: int, fc1: Linear, fc2: Linear, between: list[Passthrough], depth: int, fc2_width: int | None = None
) -> Miss | None:
    if fc2.channels_first != fc1.channels_first:
        return Miss(
            "mixed_layout", f"{fc1.path} and {fc2.path} are not both channels-first or both channels-last", depth
        )
    if (fc2.in_features if fc2_width is None else fc2_width) != hidden:
        return Miss("width", f"{fc2.path} takes {fc2.in_features} features but the activation has {hidden}", depth)
    for step in between:
        width = norm_width(step.module) if step.kind == "norm" else None
        if width is not None and width != hidden:
            return Miss("width", f"norm {step.path} has width {width}, not {hidden}", depth)
        factor = step.factor if step.kind == "scale" else None
        if isinstance(factor, Tensor) and factor.numel() not in (1, hidden):
            return Miss("width", f"{step.node.name} scales by {tuple(factor.shape)}, not per channel", depth)
    return None


def _shared_miss(view: View, parts: list, depth: int, calls: bool = False) -> Miss | None:
    for p in parts:
        if view.shared(p, calls):
            label = getattr(p, "path", None) or p.node.name
            return Miss(
                "shared_module",
                f"{label} is called more than once or shared: converting it would change the other uses",
                depth,
            )
    return None


# ---- the checks ----------------------------------------------------------------------------------------------


def check_plain(view: View, act: Act, kinds: tuple[str, ...]) -> MLPBlock | Miss | None:
    """fc1 -> (passthroughs | a chain) -> act -> (dropout | identity | norm | scale)* -> [concat ->] fc2, both
    layers of one of ``kinds``."""
    before = view.linear_before(act.input)
    if before is None or before.fc1.kind not in kinds or _is_gate(view, act):
        return None
    fc1 = before.fc1
    if before.chain and not act.reads_all_of(act.input):
        return Miss("fc1_reused", f"the value {act.node.name} reads is also used elsewhere", 1)
    if not before.chain and len(fc1.node.users) != 1 and not act.reads_all_of(fc1.node):
        others = ", ".join(u.name for u in fc1.node.users if u not in act.nodes)
        return Miss("fc1_reused", f"{fc1.path}'s output is also used by {others}: a residual would be crossed", 1)
    walked = walk_to_fc2(view, act.node, 2)
    if isinstance(walked, Miss):
        return walked
    fc2, between, concat = walked
    if fc2.kind not in kinds:
        return Miss("mixed_layout", f"{fc1.path} is {fc1.kind} but {fc2.path} is {fc2.kind}", 3)
    if concat is not None and before.chain:
        return Miss("concat", f"{fc2.path} reads {act.node.name} concatenated with other features", 3)
    width = fc2.in_features if concat is None else fc1.out_features
    miss = _check_fc2(fc1.out_features, fc1, fc2, between, 3, width) or _shared_miss(view, [fc1, fc2], 3)
    if miss:
        return miss
    return MLPBlock("", fc1, act, fc2, between, before.pre, before.chain, before.rowwise and bool(before.chain), concat)


def _is_gate(view: View, act: Act) -> bool:
    """The activation is multiplied by another value (a gated block), not scaled by a constant."""
    user = _single_user(act.node)
    return user is not None and is_mul(user) and view.scale(user, act.node) is None


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
    if up.out_features != gate.out_features or up.channels_first != gate.channels_first:
        return Miss("width", f"{gate.path} and {up.path} differ in width or kind", 2)
    walked = _walk_no_concat(view, mul, 3)
    if isinstance(walked, Miss):
        return walked
    down, between, _ = walked
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
    walked = _walk_no_concat(view, mul, 3)
    if isinstance(walked, Miss):
        return walked
    fc2, between, _ = walked
    miss = _check_fc2(fc1.out_features // 2, fc1, fc2, between, 4) or _shared_miss(view, [fc1, fc2], 4)
    return miss or MLPBlock("", fc1, act, fc2, between, mul=mul, chunk=chunk, gate_index=index)


def check_split(view: View, act: Act) -> MLPBlock | Miss | None:
    """fc1 -> act returned by one module, whose output feeds only fc2 at the start of the next (BERT)."""
    before = view.linear_before(act.input)
    if before is None or before.chain or view.part.aten or _is_gate(view, act):
        return None
    fc1, pre = before.fc1, before.pre
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
    walked = _walk_no_concat(other, placeholder, 4)
    if isinstance(walked, Miss):
        return Miss("split_residual", f"in {consumer}: {walked.message}", 4)
    fc2, between, _ = walked
    between = tail + between
    miss = _check_fc2(fc1.out_features, fc1, fc2, between, 5)
    miss = miss or _shared_miss(view, [fc1], 5, calls=True) or _shared_miss(other, [fc2], 5, calls=True)
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
    w = cast_once(lin.weights.weight, dtype)  # shared with other users of the same cast (kanc.numerics)
    b = cast_once(lin.weights.bias, dtype) if lin.weights.bias is not None else None
    return lambda x: F.linear(x, w, b)


def _row_step(step: Passthrough, channels_first: bool, dtype: torch.dtype) -> Callable[[Tensor], Tensor]:
    if step.kind == "scale":
        factor = step.factor.detach().to(dtype).reshape(-1) if isinstance(step.factor, Tensor) else step.factor
        return lambda x: x * factor
    if step.kind != "norm":
        return lambda x: x
    params = [*step.module.parameters(), *step.module.buffers()]
    same = all(t.dtype == dtype for t in params if t.is_floating_point())
    twin = step.module if same else copy.deepcopy(step.module).to(dtype).eval()
    if channels_first:
        return lambda x: twin(x[:, :, None, None])[:, :, 0, 0] if x.dim() == 2 else twin(x)
    return twin


def _pre_activation(block: MLPBlock, dtype: torch.dtype) -> Callable[[Tensor], Tensor]:
    """Rows of the block's input -> what its activation receives (the gate half of a chunked fc1)."""
    fc1 = _row_linear(block.fc1, dtype)
    pre = [_row_step(s, block.channels_first, dtype) for s in block.pre]
    half, index = block.hidden, block.gate_index

    def fn(x: Tensor) -> Tensor:
        h = fc1(x.to(dtype))
        if block.chunk is not None:
            return h.split(half, dim=-1)[index]
        for step in pre:
            h = step(h)
        return h

    return fn


def _reference(
    block: MLPBlock, dtype: torch.dtype = torch.float64, act: Callable[[Tensor], Tensor] | None = None
) -> Callable[[Tensor], Tensor]:
    fc1, fc2 = _row_linear(block.fc1, dtype), _row_linear(block.fc2, dtype)
    up = _row_linear(block.up, dtype) if block.up is not None else None
    pre_activation = _pre_activation(block, dtype)
    steps = [_row_step(s, block.channels_first, dtype) for s in block.between]
    act = act if act is not None else block.act.spec.fn
    half, index, rowwise = block.hidden, block.gate_index, block.rowwise

    def fn(x: Tensor) -> Tensor:
        x = x.to(dtype)
        if not rowwise:  # rows of the activation's input: what lies between fc1 and it is not per row
            h = act(x)
        elif up is not None:
            h = act(fc1(x)) * up(x)
        elif block.chunk is not None:
            a, b = fc1(x).split(half, dim=-1)
            h = act(a) * b if index == 0 else a * act(b)
        else:
            h = act(pre_activation(x))
        for step in steps:
            h = step(h)
        return fc2(h)

    return fn
