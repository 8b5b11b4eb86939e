"""Library hazards, handled by name: code outside the converted modules that would bypass or undo a conversion.

- ``copy_model``: ``copy.deepcopy`` goes through ``__setstate__``, and some classes change themselves there
  (PyTorch's ``TransformerDecoderLayer`` puts ``F.relu`` back as ``self.activation`` when its activation is a
  module, so the copy computes another function). The copy keeps exactly the attributes the original has.
- ``guard_fast_paths``: PyTorch's ``TransformerEncoderLayer`` (and the ``TransformerEncoder`` around it) take a fused
  C++ path in eval mode without grad that reads ``linear1.weight`` / ``linear2.weight`` and applies its own
  activation: a converted layer would be bypassed (GR-KAN) or crash (SNNK has no ``linear1.weight``). The flags
  that gate that path are cleared on every layer holding a converted block.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from types import BuiltinFunctionType, FunctionType
from typing import Any

from torch import nn

from kanc.errors import KancError
from kanc.frontend.leaves import is_kanc_layer
from kanc.numerics import rel_error

COPY_TOLERANCE = 1e-6


def copy_model(model: nn.Module) -> nn.Module:
    """``copy.deepcopy(model)`` with every module's plain attributes as the original has them.

    Attributes a ``__setstate__`` added are removed, and functions it replaced are put back (functions are never
    deep-copied, so a copy holding another function than the original was changed by ``__setstate__``).
    """
    twin = copy.deepcopy(model)
    for orig, new in zip(model.modules(), twin.modules()):
        _restore_attributes(orig, new)
    return twin


def _restore_attributes(orig: nn.Module, new: nn.Module) -> None:
    for key in [k for k in new.__dict__ if k not in orig.__dict__]:
        del new.__dict__[key]
    for key, value in orig.__dict__.items():
        if isinstance(value, FunctionType | BuiltinFunctionType) and new.__dict__.get(key) is not value:
            new.__dict__[key] = value


def check_copy(twin: nn.Module, inputs: Any, expected: list) -> None:
    """Raise when the copy ``twin`` does not compute the ``expected`` (name, tensor) outputs of the original (no grad,
    eval): a class whose copy differs from it would make every number kanc reports about another model."""
    from kanc.passes.verify import run_outputs

    got = dict(run_outputs(twin, inputs, "no_grad"))
    for name, ref in expected:
        if name in got and ref.is_floating_point() and rel_error(got[name], ref) > COPY_TOLERANCE:
            raise KancError(
                f"a deep copy of the model computes another function (output {name} differs by "
                f"{rel_error(got[name], ref):.2e}): a class in it changes itself when copied; "
                "convert in place (kanc.compile(..., inplace=True)) to keep the original's behaviour"
            )


def guard_fast_paths(model: nn.Module) -> list[str]:
    """Turn off PyTorch's fused Transformer paths wherever a layer holds a kanc layer; returns the paths changed.

    ``TransformerEncoderLayer.activation_relu_or_gelu = 0`` makes its forward take the Python path (the check
    comes before any weight is read); ``TransformerEncoder.use_nested_tensor = False`` keeps the encoder from
    converting its input to a nested tensor for that path.
    """
    changed = []
    for path, module in model.named_modules():
        if isinstance(module, nn.TransformerEncoderLayer) and _holds_kanc(module.modules()):
            if getattr(module, "activation_relu_or_gelu", 0):
                module.activation_relu_or_gelu = 0
                changed.append(path)
        elif isinstance(module, nn.TransformerEncoder) and _holds_kanc(module.modules()):
            if getattr(module, "use_nested_tensor", False):
                module.use_nested_tensor = False
                changed.append(path)
    return changed


def _holds_kanc(modules: Iterable[nn.Module]) -> bool:
    return any(is_kanc_layer(m) for m in modules)
