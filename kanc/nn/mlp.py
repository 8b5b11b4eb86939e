"""MLP blocks: the GR-KAN MLP (KAT layout) and a plain Linear-act-Linear baseline with timm's names."""

from __future__ import annotations

from torch import Tensor, nn

from kanc.nn.fit import ACTIVATION_FUNCTIONS, canonical_name
from kanc.nn.init import init_grkan_linear_
from kanc.nn.pair import check_pair, run_pair
from kanc.nn.rational import ActInit, GRKANLinear

_ACT_MODULES = {
    "gelu": lambda: nn.GELU(),
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "silu": nn.SiLU,
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "identity": nn.Identity,
}


def activation_module(name: str) -> nn.Module:
    """nn.Module for a named activation (the names of kanc.nn.fit.ACTIVATION_FUNCTIONS)."""
    key = canonical_name(name)
    assert key in ACTIVATION_FUNCTIONS
    return _ACT_MODULES[key]()


class GRKANMlp(nn.Module):
    """KAT's MLP: fc1 = Linear(F1(x)) with F1 the identity, fc2 = Linear(F2(h)) with F2 fitted to ``act_init``.

    ``init="variance"`` applies KAT's variance-preserving init (fc1 gain 1, fc2 gain 1/E[F2^2]);
    ``init="default"`` keeps nn.Linear's default.

    ``placement`` is where F2 runs on the kernel path (``kanc.codegen.grkan_mlp``): "prologue" (default) in fc2's
    matmul prologue, each layer its own op; "epilogue" once in fc1's epilogue, fc2 a plain matmul (refused with
    ``drop > 0``: F2 would run before the dropout); "auto" the faster of the two as measured on a GPU and cached,
    the prologue while the dropout is active and wherever the epilogue kernels cannot run (the CPU).
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int,
        out_features: int | None = None,
        groups: int = 8,
        act_init: ActInit = "gelu",
        degrees: tuple[int, int] = (5, 4),
        bias: bool = True,
        drop: float = 0.0,
        init: str = "variance",
        placement: str = "prologue",
    ) -> None:
        super().__init__()
        out_features = out_features or in_features
        self.fc1 = GRKANLinear(in_features, hidden_features, bias, groups, "identity", degrees)
        self.drop1 = nn.Dropout(drop)
        self.fc2 = GRKANLinear(hidden_features, out_features, bias, groups, act_init, degrees)
        self.drop2 = nn.Dropout(drop)
        check_pair(self.fc1, self.fc2, placement, self.drop1)
        self.placement = placement
        if init == "variance":
            self.reset_variance_()
        elif init != "default":
            raise ValueError(f"init must be 'variance' or 'default', got {init!r}")

    def reset_variance_(self) -> None:
        """KAT's S3 init: each layer's weight variance is 1 / (fan_in E[F(x)^2]) of its own rational."""
        init_grkan_linear_(self.fc1)
        init_grkan_linear_(self.fc2)

    def forward(self, x: Tensor) -> Tensor:
        placement = getattr(self, "placement", "prologue")  # a block pickled before placements existed
        return self.drop2(run_pair(self.fc1, self.fc2, x, placement, self.drop1))


class Mlp(nn.Module):
    """Linear -> act -> dropout -> Linear -> dropout, with timm's attribute names (fc1, act, fc2)."""

    def __init__(
        self,
        in_features: int,
        hidden_features: int,
        out_features: int | None = None,
        act: str = "gelu",
        bias: bool = True,
        drop: float = 0.0,
    ) -> None:
        super().__init__()
        out_features = out_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features, bias)
        self.act = activation_module(act)
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_features, out_features, bias)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))
