"""Which modules the tracer keeps whole (leaves), and what a linear-like module computes.

Leaves: linear-like modules (nn.Linear, Hugging Face's Conv1D with its (in, out) weight, a 1x1 Conv2d),
activation modules (torch's and, when transformers is importable, every class of
``transformers.activations.ACT2CLS``), and kanc's own layers, so converted models trace with them intact.
transformers is never required nor imported by kanc: its classes are looked up only once it is loaded (a model
holding them has loaded it).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from functools import lru_cache

from torch import Tensor, nn

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
    """An elementwise activation module (torch or transformers)."""
    if isinstance(module, nn.PReLU):
        return module.num_parameters == 1
    return isinstance(module, TORCH_ACTIVATIONS + hf_activation_classes())


# kanc classes that are plain MLPs (the baseline kanc.nn.Mlp), not converted layers: traced and converted like any.
_KANC_PLAIN = {("kanc.nn.mlp", "Mlp")}


def is_kanc_layer(module: nn.Module) -> bool:
    """A layer defined by kanc itself (kanc.nn, kanc.passes): already converted, never matched again."""
    cls = type(module)
    return cls.__module__.startswith("kanc.") and (cls.__module__, cls.__qualname__) not in _KANC_PLAIN


def linear_kind(module: nn.Module) -> str | None:
    """ "linear", "conv1d" (HF Conv1D), "conv1x1" (a pointwise Conv2d) or None."""
    if isinstance(module, nn.Linear):
        return "linear"
    conv1d = hf_conv1d_class()
    # _parameters, not .weight: during tracing fx turns parameter reads into proxies
    weight = module._parameters.get("weight") if conv1d is not None and isinstance(module, conv1d) else None
    if weight is not None and weight.dim() == 2:
        return "conv1d"
    if isinstance(module, nn.Conv2d) and _pointwise(module):
        return "conv1x1"
    return None


def _pointwise(conv: nn.Conv2d) -> bool:
    return (
        tuple(conv.kernel_size) == (1, 1)
        and tuple(conv.stride) == (1, 1)
        and conv.groups == 1
        and (conv.padding == "valid" or tuple(conv.padding) == (0, 0))
        and conv.padding_mode == "zeros"
    )


def is_leaf(module: nn.Module) -> bool:
    """Kept whole by kanc's tracer."""
    return linear_kind(module) is not None or is_activation_module(module) or is_kanc_layer(module)


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
    """The (out, in) weight and bias of a linear-like module (views, not copies)."""
    kind = linear_kind(module)
    if kind == "linear":
        return LinearWeights(module.weight, module.bias)
    if kind == "conv1d":
        return LinearWeights(module.weight.T, module.bias)
    if kind == "conv1x1":
        return LinearWeights(module.weight[:, :, 0, 0], module.bias)
    raise TypeError(f"{type(module).__name__} is not a linear-like module")
