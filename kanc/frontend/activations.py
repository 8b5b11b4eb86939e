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

from kanc.frontend.leaves import hf_activation_classes, is_activation_module

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
    return ActSpec(name, fn, False, key or name)


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


def is_token_norm(module: nn.Module) -> bool:
    """A norm over the channel dimension of each token alone (LayerNorm, RMSNorm and look-alikes, BatchNorm)."""
    if isinstance(module, nn.LayerNorm | nn.RMSNorm):
        return len(tuple(module.normalized_shape)) == 1
    if isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d):
        return True  # per channel; kanc compares and fits in eval mode, where it is an affine map
    name = type(module).__name__
    return name.endswith(("RMSNorm", "LayerNorm")) and not name.endswith("2d")


def norm_width(module: nn.Module) -> int | None:
    """The channel count a token norm acts on, when it can be read off the module."""
    shape = getattr(module, "normalized_shape", None)
    if shape is not None:
        return int(tuple(shape)[-1]) if isinstance(shape, tuple | list | torch.Size) else int(shape)
    for attr in ("num_features", "hidden_size"):
        if isinstance(getattr(module, attr, None), int):
            return getattr(module, attr)
    weight = getattr(module, "weight", None)
    return int(weight.shape[-1]) if isinstance(weight, Tensor) and weight.dim() == 1 else None
