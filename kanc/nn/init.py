"""Variance-preserving initialization for GR-KAN layers (KAT's S3, actually applied).

For y = W F(x) with x ~ N(0, 1) and Var(W) = gain / fan_in, Var(y) = gain * E[F(x)^2]; the gain
1 / E[F(x)^2] keeps unit variance through a stack. E[.] is computed by Gauss-Hermite quadrature,
not by sampling: 1/E[GELU^2] = 2.351716, 1/E[SiLU^2] = 2.810761, identity 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor, nn

from kanc.codegen.rational import rational_ref
from kanc.nn.fit import ACTIVATION_FUNCTIONS, canonical_name

QUADRATURE_NODES = 201


@lru_cache(maxsize=1)
def _hermite_e() -> tuple[Tensor, Tensor]:
    """Nodes and weights for the weight exp(-x^2/2), normalised to a N(0, 1) expectation."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(QUADRATURE_NODES)
    return torch.from_numpy(nodes), torch.from_numpy(weights / math.sqrt(2 * math.pi))


def gaussian_second_moment(fn: Callable[[Tensor], Tensor]) -> float:
    """E[fn(x)^2] for x ~ N(0, 1), by Gauss-Hermite quadrature in float64."""
    nodes, weights = _hermite_e()
    with torch.no_grad():
        return float((weights * fn(nodes).double() ** 2).sum())


def _rational_fn(module: nn.Module) -> Callable[[Tensor], Tensor]:
    """A GroupRational as a function applying every group to the same scalar inputs, averaged over groups."""
    num, den = (t.detach().double() for t in module.coefficients())

    def fn(x: Tensor) -> Tensor:
        per_group = rational_ref(x.reshape(-1, 1).expand(-1, num.shape[0]), num, den)  # (N, G): one channel/group
        return per_group.pow(2).mean(1).sqrt()  # RMS over groups, so the squared mean is the channel average

    return fn


def variance_gain(rational: nn.Module | str | Callable[[Tensor], Tensor]) -> float:
    """1 / E[F(x)^2], x ~ N(0, 1): the weight gain that keeps unit variance after F.

    ``rational`` is a GroupRational (averaged over its groups, which hold equal channel counts),
    an activation name ("gelu", "silu", ...) or any callable on tensors.
    """
    if isinstance(rational, str):
        fn = ACTIVATION_FUNCTIONS[canonical_name(rational)]
    elif isinstance(rational, nn.Module) and hasattr(rational, "coefficients"):
        fn = _rational_fn(rational)
    elif callable(rational):
        fn = rational
    else:
        raise TypeError(f"variance_gain takes a GroupRational, a name or a callable, not {type(rational).__name__}")
    moment = gaussian_second_moment(fn)
    if not moment > 0:
        raise ValueError("E[F(x)^2] is zero: the function is zero on N(0, 1), no gain preserves variance")
    return 1.0 / moment


def init_grkan_linear_(layer: nn.Module, gain: float | None = None) -> nn.Module:
    """Weights ~ N(0, gain / fan_in), bias zero; gain defaults to the layer's own rational's gain."""
    gain = variance_gain(layer.rational) if gain is None else gain
    with torch.no_grad():
        layer.weight.normal_(0.0, math.sqrt(gain / layer.weight.shape[1]))
        if layer.bias is not None:
            layer.bias.zero_()
    return layer
