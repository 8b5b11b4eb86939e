"""Activations as they appear in graphs: modules, functions, tensor methods and aten ops.

``activation_spec`` names the elementwise function a node applies and gives a float64-safe callable for it, so
a pass can fit a rational to it or compute calibration targets. Names of kanc's shipped fits (gelu,
gelu_tanh, silu, relu, tanh, sigmoid, identity) are used where the function is exactly that one; any other
elementwise activation keeps a descriptive name and is fitted from its callable.
"""

from __future__ import annotations

import copy
import functools
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, fx, nn
from torch.nn import functional as F

from kanc.frontend.leaves import (
    ELEMENTWISE_FUNCTIONS,
    ELEMENTWISE_METHODS,
    hf_activation_classes,
    is_activation_module,
    is_token_norm,
)

SHIPPED = ("identity", "gelu", "gelu_tanh", "silu", "relu", "tanh", "sigmoid")


@dataclass(frozen=True)
class ActSpec:
    """An elementwise activation: ``name`` (a shipped fit's name when ``shipped``), ``fn`` on tensors, ``key`` to cache
    fits by (equal keys mean the same function)."""

    name: str
    fn: Callable[[Tensor], Tensor] = field(compare=False, repr=False)
    shipped: bool
    key: str

    @property
    def init(self) -> str | Callable[[Tensor], Tensor]:
        """What kanc.nn.GroupRational's ``init`` takes for this activation."""
        return self.name if self.shipped else self.fn


def _shipped(name: str) -> ActSpec:
    from kanc.nn.fit import ACTIVATION_FUNCTIONS

    return ActSpec(name, ACTIVATION_FUNCTIONS[name], True, name)


def _custom(name: str, fn: Callable[[Tensor], Tensor], key: str | None = None) -> ActSpec:
    """A non-shipped activation, unless it computes a shipped function exactly (BLOOM's and ESM's hand-written
    GELUs are GELU): then it takes that function's name and shipped fit."""
    same = _same_as_shipped(fn)
    return _shipped(same) if same is not None else ActSpec(name, fn, False, key or name)


_PROBE = torch.linspace(-8.0, 8.0, 4001, dtype=torch.float64)


def _same_as_shipped(fn: Callable[[Tensor], Tensor]) -> str | None:
    from kanc.nn.fit import ACTIVATION_FUNCTIONS

    try:
        with torch.no_grad():
            y = fn(_PROBE).double()
    except Exception:  # noqa: BLE001 - a function that cannot run on float64 probes is just not a shipped one
        return None
    for name in SHIPPED:
        if name != "identity" and torch.allclose(y, ACTIVATION_FUNCTIONS[name](_PROBE), rtol=1e-6, atol=1e-7):
            return name
    return None


def _gelu(approximate: Any) -> ActSpec | None:
    if approximate in (None, "none"):
        return _shipped("gelu")
    if approximate == "tanh":
        return _shipped("gelu_tanh")
    return None


# ---- modules -------------------------------------------------------------------------------------------------


def _hf_module_name(module: nn.Module) -> str | None:
    """Shipped name of a transformers activation class that computes exactly a shipped function."""
    name = type(module).__name__
    if name == "GELUActivation":
        return "gelu"  # erf GELU (the python variant is the same formula)
    if name in ("NewGELUActivation", "GELUTanh", "PytorchGELUTanh"):
        return "gelu_tanh"
    if name == "SiLUActivation":
        return "silu"
    if name == "LinearActivation":
        return "identity"
    return None


def _module_fn(module: nn.Module) -> Callable[[Tensor], Tensor]:
    """The module as a function of float64 tensors (a float64 copy when it holds parameters or buffers)."""
    if not any(True for _ in module.parameters()) and not any(True for _ in module.buffers()):
        return module
    twin = copy.deepcopy(module).double().eval()
    return lambda x: twin(x.double()).to(x.dtype)


def module_activation(module: nn.Module) -> ActSpec | None:
    if not is_activation_module(module):
        return None
    if isinstance(module, nn.GELU):
        return _gelu(module.approximate)
    exact = {nn.SiLU: "silu", nn.ReLU: "relu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid"}.get(type(module))
    exact = exact or (_hf_module_name(module) if isinstance(module, hf_activation_classes()) else None)
    if exact is not None:
        return _shipped(exact)
    label = f"{type(module).__name__}({module.extra_repr()})" if module.extra_repr() else type(module).__name__
    params = ",".join(f"{float(p.detach().flatten()[0]):.6g}" for p in module.parameters())
    return _custom(label, _module_fn(module), f"{label}[{params}]")


# ---- functions, methods, aten ops ----------------------------------------------------------------------------

# fn -> positional index of the keyword args that matter, for the non-shipped ones
_FN_SHIPPED: dict[Any, str] = {
    F.silu: "silu",
    F.relu: "relu",
    torch.relu: "relu",
    torch.relu_: "relu",
    F.relu_: "relu",
    torch.tanh: "tanh",
    F.tanh: "tanh",
    torch.sigmoid: "sigmoid",
    F.sigmoid: "sigmoid",
}
_FN_OTHER: dict[Any, str] = {
    F.mish: "mish",
    F.hardswish: "hardswish",
    F.hardsigmoid: "hardsigmoid",
    F.leaky_relu: "leaky_relu",
    F.elu: "elu",
    F.celu: "celu",
    F.selu: "selu",
    torch.selu: "selu",
    F.softplus: "softplus",
    F.relu6: "relu6",
    F.hardtanh: "hardtanh",
    F.softsign: "softsign",
    F.tanhshrink: "tanhshrink",
    F.logsigmoid: "logsigmoid",
}
_METHODS = {"relu": "relu", "relu_": "relu", "sigmoid": "sigmoid", "tanh": "tanh", "sigmoid_": "sigmoid"}


def _aten_tables() -> tuple[dict[Any, str], dict[Any, Callable]]:
    aten = torch.ops.aten
    shipped = {
        aten.silu.default: "silu",
        aten.relu.default: "relu",
        aten.tanh.default: "tanh",
        aten.sigmoid.default: "sigmoid",
        aten.silu_.default: "silu",
        aten.relu_.default: "relu",
    }
    other = {
        aten.hardswish.default: F.hardswish,
        aten.mish.default: F.mish,
        aten.leaky_relu.default: F.leaky_relu,
        aten.elu.default: F.elu,
        aten.softplus.default: F.softplus,
        aten.hardtanh.default: F.hardtanh,
    }
    return shipped, other


_ATEN_SHIPPED, _ATEN_OTHER = _aten_tables()
_DROP_KWARGS = ("inplace",)


def _constant_args(node: fx.Node) -> tuple[tuple, dict] | None:
    """The node's arguments after the input, if they are all constants (else it is not a pure activation)."""
    rest, kwargs = node.args[1:], {k: v for k, v in node.kwargs.items() if k not in _DROP_KWARGS}
    if any(isinstance(a, fx.Node) for a in (*rest, *kwargs.values())):
        return None
    return tuple(rest), kwargs


def _partial(fn: Callable, name: str, rest: tuple, kwargs: dict) -> ActSpec:
    if not rest and not kwargs:
        return _custom(name, fn)
    detail = ", ".join([*(repr(a) for a in rest), *(f"{k}={v!r}" for k, v in sorted(kwargs.items()))])
    label = f"{name}({detail})"
    return _custom(label, functools.partial(_call_rest, fn, rest, kwargs), label)


def _call_rest(fn: Callable, rest: tuple, kwargs: dict, x: Tensor) -> Tensor:
    return fn(x, *rest, **kwargs)


def function_activation(node: fx.Node) -> ActSpec | None:
    """ActSpec of a call_function / call_method node applied to its first argument, else None."""
    if not node.args or not isinstance(node.args[0], fx.Node):
        return None
    const = _constant_args(node)
    if const is None:
        return None
    rest, kwargs = const
    target = node.target
    if node.op == "call_method":
        name = _METHODS.get(target) if isinstance(target, str) else None
        return _shipped(name) if name and not rest and not kwargs else None
    if node.op != "call_function":
        return None
    if target in (F.gelu, torch.ops.aten.gelu.default):
        return _gelu(kwargs.get("approximate", rest[0] if rest else "none")) if len(rest) <= 1 else None
    shipped = _FN_SHIPPED.get(target) or _ATEN_SHIPPED.get(target)
    if shipped is not None:
        return _shipped(shipped) if not rest else None
    if target in _FN_OTHER:
        return _partial(target, _FN_OTHER[target], rest, kwargs)
    if target in _ATEN_OTHER:
        return _partial(_ATEN_OTHER[target], str(target).split(".")[-2], rest, kwargs)
    return None


# ---- activations written as arithmetic --------------------------------------------------------------------------

_AFFINE = {operator.add, operator.sub, operator.truediv, operator.neg, torch.add, torch.sub, torch.div, torch.neg}
_AFFINE_METHODS = {  # casts and arithmetic that stay affine in the input
    "float",
    "half",
    "bfloat16",
    "to",
    "type_as",
    "add",
    "sub",
    "div",
    "neg",
    "__add__",
}


def is_elementwise(node: fx.Node) -> bool:
    """A call of an elementwise op (arithmetic, pointwise math, casts) on tensors and constants."""
    if node.op == "call_function":
        return node.target in ELEMENTWISE_FUNCTIONS
    return node.op == "call_method" and node.target in ELEMENTWISE_METHODS


def elementwise_region(exit_node: fx.Node) -> tuple[fx.Node, tuple[fx.Node, ...]] | None:
    """(entry, region) when ``exit_node`` ends a maximal elementwise region computing a nonlinear function of one
    entry tensor: ``x * 0.5 * (1 + torch.erf(x / math.sqrt(2)))`` written in a model (ESM's gelu), fx inlined.

    Every region node reads only the entry, other region nodes and constants; only the exit is read outside
    the region; no larger region ending at one of the exit's users contains it (``1 + erf(...)`` above is not an
    activation of its own); and it is not affine (a rescaling is not an activation).
    """
    found = _grow(exit_node)
    if found is None:
        return None
    entry, region = found
    for user in exit_node.users:
        larger = _grow(user)
        if larger is not None and exit_node in larger[1]:
            return None  # anchored at the larger region's own exit
    if all(_affine(n) for n in region):
        return None
    return entry, region


def _grow(exit_node: fx.Node) -> tuple[fx.Node, tuple[fx.Node, ...]] | None:
    """The elementwise region ending at ``exit_node`` with a single entry, if any (no maximality or affinity test)."""
    if not is_elementwise(exit_node):
        return None
    region, stack = {exit_node}, [exit_node]
    while stack:  # every elementwise ancestor ...
        for arg in stack.pop().all_input_nodes:
            if arg not in region and is_elementwise(arg):
                region.add(arg)
                stack.append(arg)
    changed = True
    while changed:  # ... less those read outside the region (until none is)
        leaking = {n for n in region - {exit_node} if any(u not in region for u in n.users)}
        region -= leaking
        changed = bool(leaking)
    entries = {a for n in region for a in n.all_input_nodes if a not in region}
    if len(entries) != 1 or len(region) < 2:
        return None
    return entries.pop(), tuple(n for n in exit_node.graph.nodes if n in region)


def _affine(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _AFFINE_METHODS or (node.target == "mul" and _one_constant(node))
    if node.target in (operator.mul, torch.mul):
        return _one_constant(node)
    return node.target in _AFFINE


def _one_constant(node: fx.Node) -> bool:
    return sum(isinstance(a, fx.Node) for a in node.args) == 1


def region_activation(entry: fx.Node, region: tuple[fx.Node, ...]) -> ActSpec:
    """The region as an activation: a function of one tensor, named after its ops."""
    graph = fx.Graph()
    env = {entry: graph.placeholder("x")}
    for node in region:
        env[node] = graph.node_copy(node, lambda n: env[n])
    graph.output(env[region[-1]])
    fn = fx.GraphModule(nn.Module(), graph)
    ops = ",".join(_op_name(n) for n in region)
    return _custom(f"inline({ops})", fn, f"inline:{graph.python_code('self').src}")


def _op_name(node: fx.Node) -> str:
    return node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))


# ---- gated products and passthrough ops ------------------------------------------------------------------------

MUL_TARGETS = (operator.mul, torch.mul, torch.ops.aten.mul.Tensor)


def is_mul(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target == "mul"
    return node.op == "call_function" and node.target in MUL_TARGETS and len(node.args) == 2 and not node.kwargs


_DROPOUT_FUNCTIONS = (F.dropout, torch.dropout, torch.ops.aten.dropout.default, torch.ops.aten.clone.default)
_NOOP_METHODS = ("contiguous", "clone")


def passthrough_kind(node: fx.Node, module: nn.Module | None) -> str | None:
    """ "dropout" / "identity" (no-ops in eval) or "norm" (a per-token norm module), else None."""
    if node.op == "call_module" and module is not None:
        if isinstance(module, nn.Dropout | nn.Dropout1d | nn.Dropout2d | nn.AlphaDropout):
            return "dropout"
        if isinstance(module, nn.Identity):
            return "identity"
        return "norm" if is_token_norm(module) else None
    if node.op == "call_function" and node.target in _DROPOUT_FUNCTIONS:
        return "dropout"
    if node.op == "call_method" and node.target in _NOOP_METHODS:
        return "identity"
    return None
