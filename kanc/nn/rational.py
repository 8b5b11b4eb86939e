"""GR-KAN layers: the group-rational activation and the GR-KAN linear layer, Linear(F(x))."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from kanc.codegen import grkan_linear, group_rational
from kanc.nn.fit import rational_coefficients

ActInit = str | Callable[[Tensor], Tensor]


class GroupRational(nn.Module):
    """Safe (version-A) rational activation with per-group coefficients over the last dimension.

    Gradient convention: d|b|/db = +1 at b = 0 (as KAT's kernels), so the identity init (b = 0) learns its
    denominator; the reference and every kernel agree (``kanc.codegen.rational.abs_grad_sign``).

    Args:
        channels: size of the last dimension C.
        groups: G contiguous channel groups (C % G == 0); group of channel c is c // (C // G).
        degrees: (m, n), numerator and denominator degrees.
        init: name of a shipped fit ("identity", "gelu", "gelu_tanh", "silu", "relu", "tanh",
            "sigmoid") or a callable to fit.
        shared_numerator: KAT checkpoint layout, one numerator row shared by all groups.
    """

    def __init__(
        self,
        channels: int,
        groups: int = 8,
        degrees: tuple[int, int] = (5, 4),
        init: ActInit = "identity",
        shared_numerator: bool = False,
    ) -> None:
        super().__init__()
        if groups <= 0 or channels <= 0 or channels % groups != 0:
            raise ValueError(f"channels ({channels}) must be a positive multiple of groups ({groups})")
        self.channels, self.groups, self.degrees = channels, groups, tuple(degrees)
        self.shared_numerator = shared_numerator
        self.init = init if isinstance(init, str) else getattr(init, "__name__", "callable")
        num, den = rational_coefficients(init, self.degrees)
        self.numerator = nn.Parameter(num.reshape(1, -1).repeat(1 if shared_numerator else groups, 1))
        self.denominator = nn.Parameter(den.reshape(1, -1).repeat(groups, 1))

    def coefficients(self) -> tuple[Tensor, Tensor]:
        """(numerator (G, m+1), denominator (G, n)), with a shared numerator expanded to G rows."""
        return self.numerator.expand(self.groups, -1), self.denominator

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.channels:
            raise ValueError(f"GroupRational expects last dimension {self.channels}, got {tuple(x.shape)}")
        return group_rational(x, *self.coefficients())

    def extra_repr(self) -> str:
        shared = ", shared_numerator=True" if self.shared_numerator else ""
        return f"{self.channels}, groups={self.groups}, degrees={self.degrees}, init={self.init!r}{shared}"


class GRKANLinear(nn.Module):
    """GR-KAN linear layer: y = F(x) W^T + b, the group rational in front of the matmul.

    Parameters are ``weight`` (out, in), ``bias`` (out) as in nn.Linear, and ``rational``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        groups: int = 8,
        act_init: ActInit = "identity",
        degrees: tuple[int, int] = (5, 4),
        shared_numerator: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.rational = GroupRational(in_features, groups, degrees, act_init, shared_numerator)
        kw = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **kw))
        self.bias = nn.Parameter(torch.empty(out_features, **kw)) if bias else None
        self.rational.to(device=device)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's default init (kaiming-uniform weight, uniform bias)."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"GRKANLinear expects last dimension {self.in_features}, got {tuple(x.shape)}")
        return grkan_linear(x, *self.rational.coefficients(), self.weight, self.bias)  # fused kernel where allowed

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
