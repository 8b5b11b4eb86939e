"""Which modules the tracer keeps whole (leaves), and what a linear-like module computes.

Leaves: linear-like modules (nn.Linear, Hugging Face's Conv1D with its (in, out) weight, a 1x1 Conv2d),
activation modules (torch's and, when transformers is importable, every class of
``transformers.activations.ACT2CLS``), and kanc's own layers, so converted models trace with them intact.
transformers is never required nor imported by kanc: its classes are looked up only once it is loaded (a model
holding them has loaded it).
"""

from __future__ import annotations

import math
import operator
import sys
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor, fx, nn
from torch.nn import functional as F

LINEAR_KINDS = ("linear", "conv1d", "conv1x1")

# torch activation modules that act elementwise (PReLU only with a single shared slope).
TORCH_ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.GELU,
    nn.SiLU,
    nn.ReLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.Mish,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.LeakyReLU,
    nn.ELU,
    nn.CELU,
    nn.SELU,
    nn.Softplus,
    nn.ReLU6,
    nn.Hardtanh,
    nn.Softsign,
    nn.Tanhshrink,
    nn.LogSigmoid,
    nn.PReLU,
)


def _transformers_loaded() -> bool:
    """A model can only hold transformers' classes once transformers is imported; importing it costs ~1 s."""
    return "transformers" in sys.modules


def hf_activation_classes() -> tuple[type[nn.Module], ...]:
    """transformers' activation classes (ACT2CLS), or () when transformers is not loaded."""
    return _hf_activation_classes() if _transformers_loaded() else ()


@lru_cache(maxsize=1)
def _hf_activation_classes() -> tuple[type[nn.Module], ...]:
    try:
        from transformers.activations import ACT2CLS
    except Exception:  # noqa: BLE001 - transformers is optional; any import failure means "not there"
        return ()
    classes = {v[0] if isinstance(v, tuple) else v for v in ACT2CLS.values()}
    return tuple(c for c in classes if isinstance(c, type) and issubclass(c, nn.Module))


def hf_conv1d_class() -> type[nn.Module] | None:
    return _hf_conv1d_class() if _transformers_loaded() else None


@lru_cache(maxsize=1)
def _hf_conv1d_class() -> type[nn.Module] | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except Exception:  # noqa: BLE001
        return None
    return Conv1D


def is_activation_module(module: nn.Module) -> bool:
    """An elementwise activation module: torch's, transformers', or any module computing an elementwise function."""
    if isinstance(module, nn.PReLU):
        return module.num_parameters == 1
    return isinstance(module, TORCH_ACTIVATIONS + hf_activation_classes()) or is_elementwise_module(module)


# What an elementwise forward may call: arithmetic, pointwise math and dtype casts, on its input and scalars.
ELEMENTWISE_FUNCTIONS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.pow, operator.neg, operator.gt,
    operator.lt, operator.ge, operator.le, torch.add, torch.sub, torch.mul, torch.div, torch.pow, torch.neg,
    torch.tanh, torch.erf, torch.sigmoid, torch.exp, torch.log1p, torch.abs, torch.clamp, torch.where,
    torch.relu, torch.sqrt, torch.rsqrt, torch.square, torch.maximum, torch.minimum,
    F.gelu, F.silu, F.relu, F.tanh, F.sigmoid, F.softplus, F.mish, F.elu, F.leaky_relu, F.hardtanh,
}  # fmt: skip
ELEMENTWISE_METHODS = {
    "add", "sub", "mul", "div", "pow", "neg", "tanh", "erf", "sigmoid", "exp", "abs", "clamp", "clamp_min",
    "clamp_max", "relu", "sqrt", "square", "float", "half", "bfloat16", "to", "type_as", "__mul__", "__add__",
}  # fmt: skip


def is_elementwise_module(module: nn.Module) -> bool:
    """A module whose forward is one elementwise function of its single input (scalar parameters only), calling
    at most activation modules of its own.

    Custom activation modules (BLOOM's BloomGelu, minGPT's NewGELU, a user's QuickGELU, timm's StarReLU
    ``scale * self.relu(x) ** 2 + bias``) qualify; anything with a reduction, a reshape, a second input or a
    per-channel parameter does not. Decided from the module traced alone in eval mode; cached per class, parameter
    shapes and child classes.
    """
    if linear_kind(module) is not None:
        return False
    children = tuple(module.children())
    if not all(is_activation_module(c) for c in children):
        return False
    shapes = tuple(tuple(t.shape) for t in (*module.parameters(recurse=False), *module.buffers(recurse=False)))
    if any(math.prod(s) != 1 for s in shapes):
        return False
    key = (type(module), shapes, tuple(type(c) for c in children))
    if key not in _ELEMENTWISE_CACHE:
        _ELEMENTWISE_CACHE[key] = _traces_elementwise(module)
    return _ELEMENTWISE_CACHE[key]


_ELEMENTWISE_CACHE: dict[tuple, bool] = {}


class _ActivationLeaves(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return is_activation_module(m) or super().is_leaf_module(m, module_qualified_name)


def _traces_elementwise(module: nn.Module) -> bool:
    cls = type(module)
    if cls.forward is nn.Module.forward or cls.__module__.startswith("torch.nn"):
        return False
    training = module.training
    module.train(False)  # trace the inference path (BLOOM's GELU calls a custom autograd function when training)
    try:
        graph = _ActivationLeaves().trace(module)
    except Exception:  # noqa: BLE001 - whatever does not trace is not a simple elementwise function
        return False
    finally:
        module.train(training)
    return _elementwise_graph(graph, dict(module.named_children()))


def _elementwise_graph(graph: fx.Graph, children: dict[str, nn.Module]) -> bool:
    nodes = list(graph.nodes)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    output = nodes[-1]
    if len(placeholders) != 1 or not isinstance(output.args[0], fx.Node) or output.args[0].op == "placeholder":
        return False
    for n in nodes:
        if n.op == "call_function" and n.target not in ELEMENTWISE_FUNCTIONS:
            return False
        if n.op == "call_method" and n.target not in ELEMENTWISE_METHODS:
            return False
        if n.op == "call_module" and (n.target not in children or len(n.args) != 1 or n.kwargs):
            return False
    return True


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


# kanc classes that are plain MLPs (the baseline kanc.nn.Mlp), not converted layers: traced and converted like any.
_KANC_PLAIN = {("kanc.nn.mlp", "Mlp")}


def is_kanc_layer(module: nn.Module) -> bool:
    """A layer defined by kanc itself (kanc.nn, kanc.passes): already converted, never matched again."""
    cls = type(module)
    return cls.__module__.startswith("kanc.") and (cls.__module__, cls.__qualname__) not in _KANC_PLAIN


def linear_kind(module: nn.Module) -> str | None:
    """ "linear", "conv1d" (HF Conv1D), "conv1x1" (a pointwise Conv2d), "lora" (a peft LoRA layer over a Linear or
    Conv1D: a linear map too, W + scale B A, that kanc converts through but never replaces) or None."""
    if isinstance(module, nn.Linear):
        return "linear"
    if lora_base(module) is not None:
        return "lora"
    conv1d = hf_conv1d_class()
    # _parameters, not .weight: during tracing fx turns parameter reads into proxies
    weight = module._parameters.get("weight") if conv1d is not None and isinstance(module, conv1d) else None
    if weight is not None and weight.dim() == 2:
        return "conv1d"
    if isinstance(module, nn.Conv2d) and _pointwise(module):
        return "conv1x1"
    return None


def lora_base(module: nn.Module) -> nn.Module | None:
    """The base layer of a peft ``lora.Linear`` whose adapters are plain LoRA (no DoRA or other variant)."""
    cls = type(module)
    if not (cls.__module__.startswith("peft.") and cls.__name__ == "Linear" and hasattr(module, "get_delta_weight")):
        return None
    if getattr(module, "lora_variant", None) or not hasattr(module, "base_layer"):
        return None
    base = module.base_layer
    return base if linear_kind(base) in ("linear", "conv1d") else None


def _lora_weights(module: nn.Module) -> LinearWeights:
    """The effective (out, in) weight of a LoRA layer: its base weight plus every active adapter's delta."""
    base = linear_weights(module.base_layer)
    if module.merged or module.disable_adapters:
        return base
    weight = base.weight
    for name in module.active_adapters:
        if name in module.lora_A:
            delta = module.get_delta_weight(name)
            weight = weight + (delta.T if module.fan_in_fan_out else delta)
    return LinearWeights(weight, base.bias)


def _pointwise(conv: nn.Conv2d) -> bool:
    return (
        tuple(conv.kernel_size) == (1, 1)
        and tuple(conv.stride) == (1, 1)
        and conv.groups == 1
        and (conv.padding == "valid" or tuple(conv.padding) == (0, 0))
        and conv.padding_mode == "zeros"
    )


def is_leaf(module: nn.Module) -> bool:
    """Kept whole by kanc's tracer: linear-like layers, activations, token norms (timm's and Hugging Face's LayerNorm
    and RMSNorm classes too, so a norm in a block is one step) and kanc's layers."""
    kept = linear_kind(module) is not None or is_activation_module(module) or is_token_norm(module)
    return kept or is_kanc_layer(module)


@dataclass(frozen=True)
class LinearWeights:
    """A linear-like layer as y = x W^T + b over channels: ``weight`` (out, in), ``bias`` (out) or None."""

    weight: Tensor
    bias: Tensor | None

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]


def linear_weights(module: nn.Module) -> LinearWeights:
    """The (out, in) weight and bias of a linear-like module (views, not copies; a LoRA layer's are computed)."""
    kind = linear_kind(module)
    if kind == "lora":
        return _lora_weights(module)
    if kind == "linear":
        return LinearWeights(module.weight, module.bias)
    if kind == "conv1d":
        return LinearWeights(module.weight.T, module.bias)
    if kind == "conv1x1":
        return LinearWeights(module.weight[:, :, 0, 0], module.bias)
    raise TypeError(f"{type(module).__name__} is not a linear-like module")
